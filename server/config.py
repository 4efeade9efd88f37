"""The server's configuration models: :class:`ServerConfig` and the :class:`RunSpec` handed to the ServerApp.

:mod:`fedseg.server.configfile` reads them from one TOML file plus ``key=value`` overrides.

Example ``server.toml`` (every key optional; relative paths are relative to the file)::

    rounds = 20
    min_sites = 2
    round_timeout = 1800
    output_dir = "runs/fed-1"
    transport = "fp16"        # weights travel in half precision (fp32 | fp16 | bf16); aggregated in fp32

    [strategy]
    name = "fedprox"          # fedavg fedprox fedadam fedyogi median trimmed-mean krum multi-krum bulyan
    proximal_mu = 0.01
    max_update_ratio = 2.5    # reject updates longer than 2.5 x the round's median update norm (0 = off)
    min_update_cosine = 0     # reject an update pointing away from most other updates (-1 = off)
    clip_norm = 0             # clip every accepted update to this L2 norm (0 = off)
    bn = "pooled"             # BatchNorm: pooled by the server, or "local" (FedBN: each site keeps its own)

    [model]
    feature_scale = 4

    [train]
    steps = 250
    lr = 1e-4
    patch_size = [96, 160, 160]

    [validation]
    data = "/data/central"    # central validation set (any layout fed-eval reads)

    [metrics]                 # Prometheus /metrics of fed-server start (off without a port)
    port = 9300
    host = "127.0.0.1"

    [tls]                     # omit for plain HTTP on loopback (elsewhere only with insecure = true)
    ca = "certs/ca.crt"
    cert = "certs/server.pem"
    key = "certs/server.key"

Keys are snake_case, like the nested model/train/preprocess configs they share with ``fed-eval``.

The ServerApp runs in its own process (``flwr-serverapp``), so ``fed-server start`` hands it a
:class:`RunSpec` as JSON under the single run-config key ``config-json`` (see :data:`RUN_CONFIG_KEY`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.device import DeviceName
from fedseg.common.fl.protocol import BatchNormMode
from fedseg.common.nn.model import ModelConfig
from fedseg.common.privacy.config import PrivacyConfig
from fedseg.common.runtime.processes import host_port, is_loopback

#: The one run-config key that carries the :class:`RunSpec` JSON to the ServerApp and ClientApps.
RUN_CONFIG_KEY = "config-json"

StrategyName = Literal[
    "fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"
]
#: How much a reply counts in the aggregate (:mod:`fedseg.server.run.weighting`).
Weighting = Literal["cases", "equal", "capped"]
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class StrategyConfig(BaseModel):
    """How the server combines site updates.

    ``fedavg`` and ``fedprox`` average weights by number of training cases; ``fedprox`` also sends μ so that
    sites add μ/2·‖w − w_global‖². ``fedadam``/``fedyogi`` treat the averaged update as a pseudo-gradient
    for a server-side Adam/Yogi step with learning rate ``server_lr`` (Reddi et al. 2021). The robust choices
    are Flower's: ``median`` (coordinate-wise), ``trimmed-mean`` (``trim_beta`` cut at each end), ``krum`` /
    ``multi-krum`` (``num_malicious`` assumed attackers, ``krum_select`` kept) and ``bulyan``.

    Every reply is validated first (see :mod:`fedseg.server.run.replies`): ``max_update_ratio``,
    ``max_update_norm``, ``max_examples`` bound what a single site can do; ``min_update_cosine`` rejects an
    update unless at least half of the round's other updates have a cosine of at least this with it (a reversed
    update, e.g. a sign-flip attacker's, has negative cosines with the honest ones; checked with three or more
    replies only, over the weights the strategy aggregates, not BatchNorm running statistics; −1 = off);
    ``clip_norm`` clips each accepted update. BatchNorm running statistics never go through the chosen strategy:
    with ``bn = "pooled"`` they are averaged by case count with the law of total variance
    (:mod:`fedseg.server.run.bn`); with ``bn = "local"`` (FedBN, Li et al. 2021) every BatchNorm tensor (γ, β and
    the running statistics) stays at its site and the global model keeps the BatchNorm tensors it started with.
    """

    model_config = _FROZEN

    name: StrategyName = Field(default="fedavg", description="the aggregation rule (FedAvg family or a robust rule)")
    proximal_mu: float = Field(default=0.01, ge=0, description="FedProx μ")
    server_lr: float = Field(default=0.01, gt=0, description="FedAdam/FedYogi η")
    beta_1: float = Field(default=0.9, ge=0, lt=1, description="FedAdam/FedYogi first-moment decay")
    beta_2: float = Field(default=0.99, ge=0, lt=1, description="FedAdam/FedYogi second-moment decay")
    tau: float = Field(default=1e-3, gt=0, description="FedAdam/FedYogi adaptivity τ")
    trim_beta: float = Field(default=0.2, ge=0, lt=0.5, description="trimmed-mean: fraction cut at each end")
    num_malicious: int = Field(
        default=1, ge=0, description="krum/multi-krum/bulyan: attackers tolerated (Krum's guarantee needs n >= 2f + 3)"
    )
    krum_select: int = Field(default=2, ge=1, description="multi-krum: replies averaged")
    max_update_ratio: float = Field(
        default=2.5, ge=0, description="reject ‖w_site − w_global‖ above this × the round's median; 0 = off"
    )
    max_update_norm: float = Field(default=0.0, ge=0, description="absolute bound on ‖w_site − w_global‖; 0 = off")
    min_update_ratio: float = Field(
        default=0.01,
        ge=0,
        lt=1,
        description="reject ‖w_site − w_global‖ below this × the round's median (a free-rider); a zero update is "
        "always rejected; 0 = off",
    )
    max_bn_update_ratio: float = Field(
        default=3.0,
        ge=0,
        description="reject a change of the BatchNorm running statistics above this × the round's median (bn = "
        "pooled; screened apart from the weights); 0 = off",
    )
    min_bn_cosine: float = Field(
        default=-1.0,
        ge=-1,
        lt=1,
        description="reject a BatchNorm statistics change below this cosine with half the others; -1 = off",
    )
    min_update_cosine: float = Field(
        default=0.0, ge=-1, lt=1, description="reject an update below this cosine with half the others; -1 = off"
    )
    clip_norm: float = Field(default=0.0, ge=0, description="clip each accepted update to this norm; 0 = off")
    max_examples: int = Field(default=100_000, ge=1, description="cap on a reply's num-examples (training cases)")
    weighting: Weighting = Field(
        default="capped",
        description="aggregation weight of a reply: cases (as declared), equal, or capped (cases, at most "
        "max_weight_ratio x the round's low median); a site pinned in sites.toml counts its pin",
    )
    max_weight_ratio: float = Field(
        default=2.0, ge=1, description="capped: largest weight as a multiple of the round's low-median cases"
    )
    bn: BatchNormMode = Field(
        default="pooled", description="pooled: the server pools BatchNorm; local: each site keeps its own (FedBN)"
    )
    screen: Literal["loss", "fltrust", "off"] = Field(
        default="loss",
        description="loss: score every reply's model on patches of the central validation set and reject one far "
        "worse than the round's median (needs validation.data; off without it); fltrust: the loss screen, then "
        "weight every reply by its cosine with an update the server trains on root_data, rescaled to that "
        "update's norm (needs root_data)",
    )
    root_data: Path | None = Field(
        default=None,
        description="fltrust: the server's own small labelled root set (a dataset folder, never validation.data)",
    )
    root_steps: int | None = Field(
        default=None, ge=1, description="fltrust: steps of the server's reference update; default the sites' steps"
    )
    root_cases: int | None = Field(default=None, ge=1, description="fltrust: root cases used; default all")
    screen_cases: int = Field(default=2, ge=1, description="loss screen: validation cases, one patch each")
    max_loss_ratio: float = Field(
        default=100.0,
        gt=1,
        description="loss screen: reject a reply whose loss exceeds this × the round's median (global model included)",
    )


class ValidationConfig(BaseModel):
    """The central validation set scored after every round (preprocessed once, cached in the output folder)."""

    model_config = _FROZEN

    data: Path | None = Field(default=None, description="dataset folder; none = no central validation")
    labels: str | None = Field(
        default=None, description="label manifest file or built-in name; default data/labels.toml, else 1..4"
    )
    patch_size: tuple[int, int, int] | None = Field(default=None, description="sliding window; default train's")
    device: DeviceName = Field(default="cpu", description="where the server scores the global model")
    max_cases: int | None = Field(default=None, ge=1, description="score only the first N cases; none = all")
    overlap: bool = Field(
        default=True,
        description="score round r while the sites train round r+1 (its row and checkpoint are still round r's)",
    )


class TLSConfig(BaseModel):
    """Certificates for HTTPS on the SuperLink port (CA, server certificate, private key)."""

    model_config = _FROZEN

    ca: Path = Field(description="the CA certificate sites trust (fed-server certs writes ca.crt)")
    cert: Path = Field(description="the server certificate, for the names sites dial")
    key: Path = Field(description="the server certificate's private key")


class GatewayConfig(BaseModel):
    """What one request may cost the fleet-only gateway before the SuperLink sees who sent it
    (:mod:`fedseg.server.control.gateway`): bodies received at once hold at most ``max_uploads × max_body_mib``."""

    model_config = _FROZEN

    max_body_mib: int = Field(
        default=64, ge=6, le=4096, description="largest request body in MiB (413 beyond; Flower sends 5 MiB chunks)"
    )
    max_uploads: int = Field(default=32, ge=1, le=4096, description="request bodies received at once (503 beyond)")


class MetricsConfig(BaseModel):
    """Prometheus ``/metrics`` of ``fed-server start`` (off unless a port is set)."""

    model_config = _FROZEN

    port: int | None = Field(default=None, ge=1, le=65535, description="serve /metrics here; none = off")
    host: str = Field(default="127.0.0.1", description="address to bind; loopback unless exposed on purpose")


class ServerConfig(BaseModel):
    """Everything ``fed-server start`` needs; validated once, then passed around typed."""

    model_config = _FROZEN

    rounds: int = Field(default=10, ge=1, description="federated rounds in total (a resumed run counts on)")
    min_sites: int = Field(default=2, ge=1, description="sites that must be connected before a round starts")
    fraction: float = Field(default=1.0, gt=0, le=1, description="fraction of connected sites sampled per round")
    min_replies: int = Field(default=1, ge=1, description="fewer valid replies keep the previous global model")
    round_timeout: float = Field(default=3600.0, gt=0, description="seconds to wait for site replies")
    site_wait_timeout: float = Field(default=3600.0, gt=0, description="seconds to wait for min_sites")
    output_dir: Path = Field(
        default=Path("runs/fedseg"), description="the run folder: history, metrics.csv, checkpoints, logs"
    )
    host: str = Field(default="127.0.0.1", description="public address the gateway binds (loopback by default)")
    port: int = Field(default=9092, ge=1, le=65535, description="public port: the fleet-only gateway")
    internal_port: int = Field(
        default=0, ge=0, le=65535, description="the SuperLink's loopback port (Control API); 0 = any free port"
    )
    insecure: bool = Field(default=False, description="allow plain HTTP on a non-loopback host")
    database: Path | None = Field(default=None, description="SuperLink state database; default in memory")
    supernode_auth: bool | None = Field(
        default=None, description="only keys in sites_file may join (needs tls); default: on unless host is loopback"
    )
    sites_file: Path = Field(default=Path("sites.toml"), description="allowed sites (fed-server sites add)")
    seed: int = Field(default=0, description="seeds the initial weights and the sites' training")
    cross_site_every: int | None = Field(
        default=None, ge=0, description="sites score the global model every N rounds and after the last (0: last only)"
    )
    transport: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="precision of the weights on the wire (fp16/bf16 halve the bytes)"
    )
    strategy: StrategyConfig = StrategyConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    validation: ValidationConfig = ValidationConfig()
    tls: TLSConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    gateway: GatewayConfig = GatewayConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ServerConfig:
        if self.min_replies > self.min_sites:
            raise ValueError(f"min_replies ({self.min_replies}) cannot exceed min_sites ({self.min_sites})")
        s = self.strategy
        if s.name == "bulyan" and self.min_sites < 4 * s.num_malicious + 3:
            raise ValueError(f"bulyan needs min_sites >= 4 x num_malicious + 3 = {4 * s.num_malicious + 3}")
        if s.screen == "fltrust":
            if s.root_data is None:
                raise ValueError("strategy.screen = 'fltrust' needs strategy.root_data (the server's root set)")
            if self.validation.data is not None and s.root_data.resolve() == self.validation.data.resolve():
                raise ValueError("strategy.root_data must not be validation.data: one trains, the other scores")
        if self.supernode_auth and self.tls is None:
            raise ValueError("supernode_auth needs a [tls] table (Flower refuses node authentication over HTTP)")
        _check_privacy(self)
        return self

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink, as sites dial it."""
        return host_port(self.host, self.port)

    @property
    def node_auth(self) -> bool:
        """Whether only registered site keys may join: as configured, else on for a non-loopback host with TLS."""
        if self.supernode_auth is not None:
            return self.supernode_auth
        return not self.loopback and self.tls is not None

    @property
    def loopback(self) -> bool:
        """Whether the SuperLink listens on loopback only."""
        return is_loopback(self.host)

    @property
    def validation_patch(self) -> tuple[int, int, int]:
        """Sliding-window size for central validation."""
        return self.validation.patch_size or self.train.patch_size


def _check_privacy(cfg: ServerConfig) -> None:
    """Refuse privacy settings the sites could not train (one line each)."""
    mode = cfg.privacy.mode
    if mode == "client-dp":
        _check_client_dp(cfg)
    if mode == "dp-sgd" and cfg.model.norm == "batch":
        raise ValueError(
            "privacy.mode = 'dp-sgd' cannot train model.norm = 'batch' (per-case gradients cannot pass BatchNorm); "
            "use model.norm=group"
        )
    if mode == "dp-sgd" and cfg.train.pseudo_weight > 0:
        raise ValueError("privacy.mode = 'dp-sgd' does not combine with train.pseudo_weight > 0; set it to 0")


def _check_client_dp(cfg: ServerConfig) -> None:
    """Client-level DP noises the mean of clipped, equally weighted updates: refuse what would break that."""
    s = cfg.strategy
    why = "privacy.mode = 'client-dp' "
    if s.name not in ("fedavg", "fedprox"):
        raise ValueError(
            why
            + f"needs strategy.name = fedavg or fedprox, not {s.name}: the noise is calibrated to a mean of clipped "
            "updates (a robust rule's output, or a server optimiser step, has another sensitivity)"
        )
    if s.weighting != "equal":
        raise ValueError(why + "needs strategy.weighting = 'equal': one site's share of the mean must be 1/n")
    if cfg.model.norm == "batch":
        raise ValueError(
            why + "cannot pool BatchNorm statistics (they would be clipped and noised); use model.norm=group"
        )
    if cfg.transport != "fp32":
        raise ValueError(why + "needs transport = 'fp32' (updates are clipped as they arrive)")
    if cfg.min_replies != cfg.min_sites:
        raise ValueError(
            why + f"needs min_replies = min_sites ({cfg.min_sites}): a mean of fewer updates than the noise assumes "
            "would leak more than the accountant counts"
        )


class RunSpec(BaseModel):
    """What the ServerApp process receives: the config plus where this run starts (for ``--resume``)."""

    model_config = _FROZEN

    config: ServerConfig
    first_round: int = Field(default=1, ge=1, description="global number of the first round of this run")
    initial_checkpoint: Path | None = Field(default=None, description="start from these weights")

    @property
    def num_rounds(self) -> int:
        """Rounds this run executes (``config.rounds`` is the total over all resumed runs)."""
        return self.config.rounds - self.first_round + 1
