"""One round of local training at a site: global weights in, new weights and aggregate numbers out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedseg.client.budget import BudgetFile, PrivacyRefused, RoundPlan, SiteBudget
from fedseg.client.localbn import keep_own, own_start, shared_only
from fedseg.client.policy import PrivacyPolicy
from fedseg.common.data.preprocess import PreparedCase
from fedseg.common.engine.train import TrainReport, train_model
from fedseg.common.fl.packing import pack_arrays, unpacked
from fedseg.common.fl.protocol import LocalResult, TrainTask
from fedseg.common.fl.weights import arrays_from_model, encode_arrays, load_arrays
from fedseg.common.nn.model import build_model
from fedseg.common.privacy.dpsgd import train_private, unsupported

log = logging.getLogger(__name__)

#: A training progress callback: (step, total, loss, patches/s).
StepCallback = Callable[[int, int, float, float], None]


class TrainingDiverged(RuntimeError):
    """More local steps than ``max_skipped_steps`` had a non-finite loss or gradient: the site sends no weights."""


class BudgetExceeded(TimeoutError):
    """The task's time budget (the site's ``max_seconds`` or the round's deadline) ran out: no reply from this work."""


#: Name of the thread a task's work runs on (see :class:`Watchdog`).
WORKER_THREAD = "fedseg-task"
#: Longest grace between the budget and the hard stop (see :attr:`Watchdog.grace`).
MAX_GRACE = 30.0

T = TypeVar("T")


class Watchdog:
    """A task's wall-clock budget from its arrival, enforced even inside a step that never ends.

    Why a thread: a check between steps cannot stop one step that runs for minutes (a 512³ patch), and a signal
    (``SIGALRM``) cannot either, since Python runs its handler only between bytecodes, i.e. after the running
    torch operation returns. A child process could be killed, but the ClientApp is a forked, threaded process
    (Flower's heartbeat), so a fork might inherit a held lock, a fresh process pays the imports again, and the
    weights would have to travel back. So :meth:`run` runs the work (preprocessing included) on a worker thread
    and waits for it at most ``seconds`` + :attr:`grace`: torch, SimpleITK and numpy release the GIL in their
    long calls, so the handler wakes on time and replies whatever the worker is doing.

    The abandoned worker is cancelled too: :meth:`enter` puts a forward pre-hook on every module of the model and
    a gradient hook on every parameter, which raise at the next module the worker enters or the next gradient it
    computes, so it stops within about one layer's forward or backward and the CPU is free again. One still
    preprocessing has no hook: it finishes the cases (their cache files are written atomically) and stops before
    its model's first step. The worker is not a daemon thread: an exiting interpreter waits for it (Flower's exit
    forces the ClientApp out 5 s after the reply in any case, a forked one leaves at once), since a daemon thread
    still inside torch at interpreter shutdown aborts the process ("FATAL: exception not rethrown").

    Within the budget the work stops itself: training before a step that would end past it
    (:class:`~fedseg.common.engine.train.TimeLimit`), replying with the weights trained so far. Once the
    work has finished its loop it calls :meth:`settle` and is then waited for (encoding the weights is bounded
    by the policy's model size); a worker that the watchdog has already given up cannot settle, so it never
    writes the site's state after the handler has replied.

    Args:
        seconds: the budget.
        limit: what sets it, as messages say it (``max_seconds 900``, ``deadline 3600 s``).
        started: :func:`time.monotonic` instant the task arrived (default: now).
    """

    def __init__(self, seconds: float, limit: str, started: float | None = None) -> None:
        self.seconds = seconds
        self.limit = limit
        self.started = time.monotonic() if started is None else started
        self.stage = "starting"
        self._lock = threading.Lock()
        self._cancelled = False
        self._settled = False

    @property
    def grace(self) -> float:
        """Seconds past the budget before the hard stop: 1 s + 5 % of the budget, at most :data:`MAX_GRACE`."""
        return min(MAX_GRACE, 1.0 + 0.05 * self.seconds)

    def elapsed(self) -> float:
        """Seconds since the task arrived."""
        return time.monotonic() - self.started

    def remaining(self) -> float:
        """Seconds of the budget left (negative once it has passed)."""
        return self.seconds - self.elapsed()

    def message(self) -> str:
        """Why the work was stopped, in one line."""
        return f"stopped by the site's time limit ({self.limit}) after {self.elapsed():.1f} s, while {self.stage}"

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` in an abandoned worker."""
        if self._cancelled:
            raise BudgetExceeded(self.message())

    def enter(self, model: nn.Module, stage: str) -> float:
        """The work's loop over ``model`` starts (it is now at ``stage``): make every module of ``model`` (forward)
        and every parameter (backward) raise :class:`BudgetExceeded` once the work is abandoned; returns the seconds
        left for the loop.

        Raises:
            BudgetExceeded: nothing is left (the stage before took it all).
        """
        self.check()
        left = self.remaining()
        if left <= 0:
            raise BudgetExceeded(self.message())
        for module in model.modules():
            module.register_forward_pre_hook(lambda _module, _args: self.check())
        for param in model.parameters():
            param.register_hook(lambda _grad: self.check())  # type: ignore[no-untyped-call]  # untyped in torch
        self.stage = stage
        return left

    def progress(self, on_step: Callable[[int, int, float, float], None] | None) -> StepCallback:
        """``on_step`` (may be None) that also keeps :attr:`stage` current and is silent once abandoned."""

        def step(done: int, total: int, loss: float, speed: float) -> None:
            self.check()
            self.stage = f"training (step {done + 1} of {total})"
            if on_step is not None:
                on_step(done, total, loss, speed)

        return step

    def settle(self) -> None:
        """The work's loop is over: from now on it is waited for. Raises :class:`BudgetExceeded` if abandoned."""
        with self._lock:
            self.check()
            self._settled = True

    def run(self, work: Callable[[], T]) -> T:
        """``work()`` on a worker thread, its result or exception, or :class:`BudgetExceeded` at the hard stop."""
        done = threading.Event()
        outcome: list[T] = []
        failure: list[BaseException] = []

        def target() -> None:
            try:
                outcome.append(work())
            except BaseException as err:  # handed to the waiting thread (or dropped, once abandoned)
                failure.append(err)
            finally:
                done.set()

        threading.Thread(target=target, name=WORKER_THREAD).start()
        if not done.wait(max(0.0, self.remaining() + self.grace)):
            with self._lock:
                self._cancelled = not self._settled
            if self._cancelled:
                log.warning("%s; the work is abandoned", self.message())
                raise BudgetExceeded(self.message())
            done.wait()
        if failure:
            raise failure[0]
        return outcome[0]


def train_locally(
    arrays: ArrayRecord,
    task: TrainTask,
    cases: Sequence[PreparedCase],
    device: torch.device | str,
    seed: int,
    on_step: StepCallback | None = None,
    state: RecordDict | None = None,
    watchdog: Watchdog | None = None,
    budget: SiteBudget | None = None,
) -> tuple[ArrayRecord, LocalResult]:
    """Load the global weights, train with the shared trainer for the task's budget, return the new weights.

    Under ``task.privacy.mode = "dp-sgd"`` the training is patient-level DP-SGD
    (:func:`~fedseg.common.privacy.dpsgd.train_private`) within the site's ``budget``: the round is planned (and
    refused when it would pass ``max_epsilon``) before it trains, its steps are spent after, and the result carries
    the site's cumulative ε and its δ. Its loss is 0 and its samples the expected count (steps × q × cases): the
    mean training loss and the Poisson batch sizes are statistics of the cases that DP does not cover (the site log
    has the real loss).

    Args:
        arrays: global weights (keyed by state-dict name, or packed into one array), in any transport precision.
        task: model, training budget (FedProx μ included) and preprocessing of this round.
        cases: the site's prepared, labelled cases.
        device: where to train.
        seed: this round's seed at this site (patch sampling, augmentation).
        on_step: progress callback (step, total, loss, patches/s), e.g. the site's telemetry.
        state: the site's ``context.state``; under ``task.bn == "local"`` it keeps the site's own BatchNorm
            tensors across rounds (:mod:`fedseg.client.localbn`). None: BatchNorm as received, nothing kept.
        watchdog: the task's time budget (run this function under its :meth:`Watchdog.run`): training stops
            before a step that would end past it, and the weights trained so far are returned (the result's
            ``policy`` says so). None: no time limit.
        budget: the site's privacy budget (DP-SGD tasks); None: the default policy, counted in memory only.

    Returns:
        The trained weights (in ``task.transport`` precision, packed when ``task.packed``; under ``bn = "local"``
        with the received BatchNorm entries) and the numbers the server may see: cases, mean loss, patches, seconds.

    Raises:
        IncompatibleModelError: the weights do not fit ``task.model``.
        TrainingDiverged: more than ``task.train.max_skipped_steps`` steps were skipped as non-finite.
        BudgetExceeded: the budget was used up before training, or the watchdog has given this work up.
        PrivacyRefused: a DP-SGD round the site will not train (past ``max_epsilon``, a model DP cannot train).
    """
    own_bn = state if task.bn == "local" else None
    model = build_model(task.model)
    arrays = unpacked(arrays, model.state_dict(), task.transport)
    load_arrays(model, own_start(arrays, own_bn) if own_bn is not None else arrays)
    cfg = task.train.model_copy(update={"seed": seed})
    budget = budget or SiteBudget(PrivacyPolicy(), BudgetFile(None))
    plan = _private_plan(task, model, len(cases), budget)
    time_limit = None
    if watchdog is not None:
        time_limit = watchdog.enter(model, f"training (step 1 of {cfg.total_steps})")
        on_step = watchdog.progress(on_step)
    if plan is None:
        report = train_model(model, cases, cfg, device, progress=False, on_step=on_step, time_limit=time_limit)
    else:
        report = train_private(model, cases, cfg, plan.settings, device, on_step=on_step, time_limit=time_limit)
    if watchdog is not None:
        watchdog.settle()
    spent = budget.spend(plan, report.steps) if plan is not None else None  # recorded before the reply leaves
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
    if report.time_limited and watchdog is not None:
        where = f"step {report.steps} of {cfg.total_steps}"
        stopped = (f"stopped at {where} after {watchdog.elapsed():.1f} s ({watchdog.limit})",)
    loss, samples = report.mean_loss, report.samples
    if plan is not None:  # under DP the weights are all that speaks for the cases: no non-private statistic leaves
        loss, samples = 0.0, round(plan.settings.sample_rate * len(cases) * report.steps)
    result = LocalResult(
        cases=len(cases),
        loss=loss,
        samples=samples,
        seconds=report.seconds,
        annotated=annotated,
        policy=(*(plan.notes if plan is not None else ()), *stopped),
        epsilon=spent,
        delta=plan.delta if plan is not None else None,
    )
    trained = arrays_from_model(model.cpu())
    reply = encode_arrays(trained, task.transport)
    if own_bn is not None:
        keep_own(trained, own_bn)
        reply = shared_only(reply, arrays)
    return (pack_arrays(reply) if task.packed else reply), result


def _private_plan(task: TrainTask, model: nn.Module, cases: int, budget: SiteBudget) -> RoundPlan | None:
    """The DP-SGD round the site will train (None: the task asks for no DP), or why it will not.

    Raises:
        PrivacyRefused: a model or config DP-SGD cannot train, or a round past the site's budget.
    """
    mode = task.privacy.mode
    if mode in ("off", "client-dp"):
        return None  # under client-dp the server clips and noises the updates: the site trains as without DP
    reason = unsupported(model, task.train)
    if reason is not None:
        raise PrivacyRefused(reason)
    return budget.plan(task, cases)


def _unusual_steps(report: TrainReport) -> str:
    """The log line's tail for steps retried in fp32 or skipped; empty when every step went normally."""
    parts = []
    if report.fp32_retries:
        parts.append(f"{report.fp32_retries} computed again in fp32 (not finite in bf16)")
    if report.skipped_steps:
        parts.append(f"{report.skipped_steps} skipped (not finite)")
    return "".join(f", {p}" for p in parts)
