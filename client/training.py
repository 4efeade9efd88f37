"""One round of local training at a site: global weights in, new weights and aggregate numbers out."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

import torch
from flwr.app import ArrayRecord, RecordDict

from fedseg.client.localbn import keep_own, own_start, shared_only
from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.train import TrainReport, train_model
from fedseg.common.fl.packing import pack_arrays, unpacked
from fedseg.common.fl.protocol import LocalResult, TrainTask
from fedseg.common.fl.weights import arrays_from_model, encode_arrays, load_arrays
from fedseg.common.nn.model import build_model

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """More local steps than ``max_skipped_steps`` had a non-finite loss or gradient: the site sends no weights."""


class DeadlineExceeded(TimeoutError):
    """Local training ran past the server's round timeout (its reply would be dropped anyway)."""


def _raise_deadline(signum: int, frame: FrameType | None) -> None:
    raise DeadlineExceeded("local training passed the server's round timeout; the server has moved on")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`DeadlineExceeded` inside the block after ``seconds`` (main thread on POSIX; else no-op)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_deadline)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def train_locally(
    arrays: ArrayRecord,
    task: TrainTask,
    cases: Sequence[PreparedCase],
    device: torch.device | str,
    seed: int,
    on_step: Callable[[int, int, float, float], None] | None = None,
    state: RecordDict | None = None,
    time_limit: float | None = None,
) -> tuple[ArrayRecord, LocalResult]:
    """Load the global weights, train with the shared trainer for the task's budget, return the new weights.

    Args:
        arrays: global weights (keyed by state-dict name, or packed into one array), in any transport precision.
        task: model, training budget (FedProx μ included) and preprocessing of this round.
        cases: the site's prepared, labelled cases.
        device: where to train.
        seed: this round's seed at this site (patch sampling, augmentation).
        on_step: progress callback (step, total, loss, patches/s), e.g. the site's telemetry.
        state: the site's ``context.state``; under ``task.bn == "local"`` it keeps the site's own BatchNorm
            tensors across rounds (:mod:`fedseg.client.localbn`). None: BatchNorm as received, nothing kept.
        time_limit: the site's ``max_seconds``: training stops after the step that passes it, and the weights
            trained so far are returned (the result's ``policy`` says so).

    Returns:
        The trained weights (in ``task.transport`` precision, packed when ``task.packed``; under ``bn = "local"``
        with the received BatchNorm entries) and the numbers the server may see: cases, mean loss, patches, seconds.

    Raises:
        IncompatibleModelError: the weights do not fit ``task.model``.
        TrainingDiverged: more than ``task.train.max_skipped_steps`` steps were skipped as non-finite.
    """
    own_bn = state if task.bn == "local" else None
    model = build_model(task.model)
    arrays = unpacked(arrays, model.state_dict(), task.transport)
    load_arrays(model, own_start(arrays, own_bn) if own_bn is not None else arrays)
    cfg = task.train.model_copy(update={"seed": seed})
    report = train_model(model, cases, cfg, device, progress=False, on_step=on_step, time_limit=time_limit)
    if report.skipped_steps > cfg.max_skipped_steps:
        raise TrainingDiverged(
            f"{report.skipped_steps} of {report.steps} local steps had a non-finite loss or gradient "
            f"(max_skipped_steps {cfg.max_skipped_steps})"
        )
    log.info(
        "trained %d steps on %d cases in %.1f s, mean loss %.4f%s",
        report.steps,
        len(cases),
        report.seconds,
        report.mean_loss,
        _unusual_steps(report),
    )
    annotated = tuple(any(c < len(k.annotated) and k.annotated[c] for k in cases) for c in range(task.model.n_classes))
    stopped: tuple[str, ...] = ()
    if report.time_limited and time_limit is not None:
        where = f"step {report.steps} of {cfg.total_steps}"
        stopped = (f"stopped at {where} after {report.seconds:.1f} s (max_seconds {time_limit:g})",)
    result = LocalResult(
        cases=len(cases),
        loss=report.mean_loss,
        samples=report.samples,
        seconds=report.seconds,
        annotated=annotated,
        policy=stopped,
    )
    trained = arrays_from_model(model.cpu())
    reply = encode_arrays(trained, task.transport)
    if own_bn is not None:
        keep_own(trained, own_bn)
        reply = shared_only(reply, arrays)
    return (pack_arrays(reply) if task.packed else reply), result


def _unusual_steps(report: TrainReport) -> str:
    """The log line's tail for steps retried in fp32 or skipped; empty when every step went normally."""
    parts = []
    if report.fp32_retries:
        parts.append(f"{report.fp32_retries} computed again in fp32 (not finite in bf16)")
    if report.skipped_steps:
        parts.append(f"{report.skipped_steps} skipped (not finite)")
    return "".join(f", {p}" for p in parts)
