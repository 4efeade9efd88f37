"""The message contract between our ServerApp and ClientApp (both sides import it).

A train message carries the global weights (ArrayRecord ``arrays``) and a ConfigRecord ``config`` with
Flower's ``server-round`` (plus ``proximal-mu`` under FedProx) and our :class:`TrainTask` as JSON under
``fedseg-task``. A reply carries the new weights (``arrays``), a MetricRecord ``metrics`` with the averaging
weight ``num-examples`` (training cases) and aggregate numbers only, and a ConfigRecord ``site`` with the
site name and ``annotated``, one flag per global class (background first): the classes the site labels, used
for class-aware averaging of the output head. A site whose local training failed on purpose (too many
non-finite steps) replies with only the ``site`` ConfigRecord, carrying the reason under ``failure``
(:func:`failure_content`); so does a site whose policy refuses the task, or whose time limit stopped the work
before it had anything to send. A site whose policy lowered the task (fewer steps, a smaller batch, a shorter
deadline, a time limit) says so under ``policy`` in the ``site`` record (:func:`policy_note`), in train, failure
and evaluate replies alike. Under ``privacy.mode = "dp-sgd"`` a train reply's metrics also carry the site's
cumulative ``epsilon`` for this federation and the ``delta`` it is counted at (absent without DP), and its
``train-loss`` (0) and ``train-samples`` (the expected count) say nothing of its cases: only the DP weights do. No
image, label or per-case value ever leaves a site. Under ``bn = "local"`` (FedBN)
the BatchNorm entries of a reply are the ones the site received: its own stay in its Flower context
(:mod:`fedseg.client.localbn`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.errors import ConfigError
from fedseg.common.nn.model import ModelConfig
from fedseg.common.privacy.config import PrivacyConfig

RecordT = TypeVar("RecordT", ArrayRecord, MetricRecord, ConfigRecord)

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SITE_KEY = "site"
TASK_KEY = "fedseg-task"
ROUND_KEY = "server-round"
PROX_KEY = "proximal-mu"
WEIGHT_KEY = "num-examples"
FAILURE_KEY = "failure"
ANNOTATED_KEY = "annotated"
POLICY_KEY = "policy"
METRIC_KEYS = (WEIGHT_KEY, "train-loss", "train-samples", "train-seconds")
#: Metrics of a DP-SGD reply: the site's cumulative ε for the federation, and the δ it is counted at.
EPSILON_KEY = "epsilon"
DELTA_KEY = "delta"
PRIVACY_METRIC_KEYS = (EPSILON_KEY, DELTA_KEY)

#: Precision of the weights on the wire both ways (:func:`fedseg.common.fl.weights.encode_arrays`).
Transport = Literal["fp32", "fp16", "bf16"]
#: Who owns the BatchNorm tensors: the server pools them, or every site keeps its own (FedBN).
BatchNormMode = Literal["pooled", "local"]


class TrainTask(BaseModel):
    """What a site must do in a round: build this model, preprocess like this, train with this budget.

    ``deadline`` is the server's round timeout: a reply later than that is dropped, so the site replies by then
    (its policy may lower it; :class:`fedseg.client.training.Watchdog` enforces it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig
    train: TrainConfig
    preprocess: PreprocessConfig
    deadline: float = Field(gt=0, description="seconds; the server's round timeout")
    round_offset: int = Field(default=0, ge=0, description="added to Flower's round: global round of a resumed run")
    transport: Transport = Field(default="fp32", description="precision of the weights on the wire, both ways")
    bn: BatchNormMode = Field(
        default="pooled", description="local: the site trains and evaluates with its own BatchNorm tensors (FedBN)"
    )
    packed: bool = Field(
        default=False, description="the weights travel as one array both ways (fedseg.common.fl.packing)"
    )
    last_round: int | None = Field(
        default=None, ge=1, description="the run's last global round, so a site can say when the run is done"
    )
    privacy: PrivacyConfig = Field(
        default=PrivacyConfig(), description="differential privacy asked of the sites (their policy may add more)"
    )


def task_config(task: TrainTask) -> ConfigRecord:
    """The ConfigRecord sent with every train message."""
    return ConfigRecord({TASK_KEY: task.model_dump_json()})


def read_task(config: ConfigRecord) -> tuple[TrainTask, int]:
    """Decode a train message's ConfigRecord: the task (μ from ``proximal-mu`` applied) and the global round.

    Raises:
        ConfigError: the task is missing or invalid (a server with another fedseg version).
    """
    raw = config.get(TASK_KEY)
    if not isinstance(raw, str):
        raise ConfigError(f"train message has no '{TASK_KEY}'; the server is not a fedseg server of this version")
    try:
        task = TrainTask.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"train task from the server is invalid ({where}: {first['msg']}); update fedseg") from None
    mu = config.get(PROX_KEY)
    if isinstance(mu, int | float) and mu > 0:
        task = task.model_copy(update={"train": task.train.model_copy(update={"prox_mu": float(mu)})})
    server_round = config.get(ROUND_KEY, 0)
    flower_round = int(server_round) if isinstance(server_round, int | float) else 0
    return task, task.round_offset + flower_round


def task_transport(config: ConfigRecord) -> Transport:
    """The transport a train ConfigRecord asks for (fp32 when it carries no valid task)."""
    try:
        return read_task(config)[0].transport
    except ConfigError:
        return "fp32"


def round_seed(base: int, server_round: int, site: str) -> int:
    """A seed that differs per round and per site but repeats for the same (base, round, site)."""
    digest = int(hashlib.sha256(site.encode()).hexdigest()[:8], 16)
    return (base + 1_000_003 * server_round + digest) % 2**31


@dataclass(frozen=True)
class LocalResult:
    """Aggregate numbers of one site's local training in one round (``annotated``: its classes, background first;
    ``policy``: what the site's policy changed in the task; ``epsilon`` and ``delta``: under DP-SGD the site's
    cumulative ε for the federation after this round, at δ ``delta``)."""

    cases: int
    loss: float
    samples: int
    seconds: float
    annotated: tuple[bool, ...] | None = None
    policy: tuple[str, ...] = ()
    epsilon: float | None = None
    delta: float | None = None


def reply_content(arrays: ArrayRecord, result: LocalResult, site: str) -> RecordDict:
    """The RecordDict of a train reply."""
    metrics = MetricRecord(
        {
            WEIGHT_KEY: result.cases,
            "train-loss": result.loss,
            "train-samples": result.samples,
            "train-seconds": result.seconds,
        }
    )
    if result.epsilon is not None and result.delta is not None:
        metrics[EPSILON_KEY] = result.epsilon
        metrics[DELTA_KEY] = result.delta
    site_record = _site_record(site, result.policy)
    if result.annotated is not None:
        site_record[ANNOTATED_KEY] = [bool(a) for a in result.annotated]
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics, SITE_KEY: site_record})


def _site_record(site: str, policy: tuple[str, ...]) -> ConfigRecord:
    """A reply's ``site`` record: the name, and what the site's policy did (when it did anything)."""
    record = ConfigRecord({"name": site})
    if policy:
        record[POLICY_KEY] = "; ".join(policy)
    return record


def failure_content(site: str, reason: str, policy: tuple[str, ...] = ()) -> RecordDict:
    """The RecordDict of a reply that carries no weights (or scores), only why the site could not do the task
    (and, under ``policy``, what its policy did: a refusal is both)."""
    record = _site_record(site, policy)
    record[FAILURE_KEY] = reason
    return RecordDict({SITE_KEY: record})


def record_of(content: RecordDict, key: str, kind: type[RecordT]) -> RecordT | None:
    """``content[key]`` if it is a ``kind`` record, else None, read straight from the content.

    Flower's typed views (``content.array_records`` and the like) hold every record of their kind in a reference
    cycle, so a message's weights outlive the message until Python's cyclic garbage collector happens to run:
    measured on the ServerApp, up to three replies of the paper-size model stayed in memory after they were let go.
    """
    record = content.get(key)
    return record if isinstance(record, kind) else None


def record_keys(content: RecordDict, kind: type[ArrayRecord | MetricRecord | ConfigRecord]) -> set[str]:
    """The keys of ``content``'s records of type ``kind`` (without Flower's typed views: see :func:`record_of`)."""
    return {key for key, record in content.items() if isinstance(record, kind)}


def policy_note(content: RecordDict) -> str:
    """What the site's policy changed in the task, as the reply says it ("" when nothing)."""
    record = content.config_records.get(SITE_KEY)
    value = record.get(POLICY_KEY) if record is not None else None
    return value[:300] if isinstance(value, str) else ""


def annotated_of(content: RecordDict) -> tuple[bool, ...] | None:
    """The annotated-class flags a reply's ``site`` record carries, or None (an older site, or none sent)."""
    record = content.config_records.get(SITE_KEY)
    value = record.get(ANNOTATED_KEY) if record is not None else None
    if not isinstance(value, list) or not value:
        return None
    flags = tuple(v for v in value if isinstance(v, bool))
    return flags if len(flags) == len(value) and flags[0] else None


def evaluate_content(scores: dict[str, float | int], cases: int, site: str, policy: tuple[str, ...] = ()) -> RecordDict:
    """The RecordDict of an evaluate (cross-site validation) reply: aggregate scores and ``num-examples`` (and what
    the site's policy did, e.g. fewer cases scored within its time limit)."""
    metrics = MetricRecord({WEIGHT_KEY: cases, **scores})
    return RecordDict({METRICS_KEY: metrics, SITE_KEY: _site_record(site, policy)})


#: The metrics a site returns per organ in cross-site validation (see :mod:`fedseg.client.crosssite`).
CROSS_SITE_METRICS = ("dice", "hd95")


def metric_key(metric: str, organ: str, stat: str) -> str:
    """The evaluate-reply key of one statistic, e.g. ``dice-liver-mean``."""
    return f"{metric}-{organ}-{stat}"


def read_scores(metrics: dict[str, float | int]) -> dict[str, dict[str, dict[str, float]]]:
    """Invert the cross-site keys: ``{organ: {metric: {"mean", "sd", "n"}}}`` (missing stats left out)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        parts = key.split("-")
        if len(parts) < 3 or parts[0] not in CROSS_SITE_METRICS or parts[-1] not in ("mean", "sd", "n"):
            continue
        organ = "-".join(parts[1:-1])
        table.setdefault(organ, {}).setdefault(parts[0], {})[parts[-1]] = float(value)
    return table
