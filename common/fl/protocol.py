"""The message contract between our ServerApp and ClientApp (both sides import it).

A train message carries the global weights (ArrayRecord ``arrays``) and a ConfigRecord ``config`` with
Flower's ``server-round`` (plus ``proximal-mu`` under FedProx) and our :class:`TrainTask` as JSON under
``fedseg-task``. A reply carries the new weights (``arrays``), a MetricRecord ``metrics`` with the averaging
weight ``num-examples`` (training cases) and aggregate numbers only, and a ConfigRecord ``site`` with the
site name. No image, label or per-case value ever leaves a site.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.errors import ConfigError
from fedseg.common.nn.model import ModelConfig

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SITE_KEY = "site"
TASK_KEY = "fedseg-task"
ROUND_KEY = "server-round"
PROX_KEY = "proximal-mu"
WEIGHT_KEY = "num-examples"
METRIC_KEYS = (WEIGHT_KEY, "train-loss", "train-samples", "train-seconds")

#: Precision of the weights on the wire both ways (:func:`fedseg.common.fl.weights.encode_arrays`).
Transport = Literal["fp32", "fp16", "bf16"]


class TrainTask(BaseModel):
    """What a site must do in a round: build this model, preprocess like this, train with this budget.

    ``deadline`` is the server's round timeout: a reply later than that is dropped, so the site stops
    training (and its ClientApp process) once it has passed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig
    train: TrainConfig
    preprocess: PreprocessConfig
    deadline: float = Field(gt=0, description="seconds; the server's round timeout")
    round_offset: int = Field(default=0, ge=0, description="added to Flower's round: global round of a resumed run")
    transport: Transport = Field(default="fp32", description="precision of the weights on the wire, both ways")


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
    """Aggregate numbers of one site's local training in one round."""

    cases: int
    loss: float
    samples: int
    seconds: float


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
    return RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics, SITE_KEY: ConfigRecord({"name": site})})
