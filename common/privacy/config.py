"""What the server asks of the sites' privacy (``[privacy]`` in server.toml, sent in every train task).

Imports pydantic only: the wire contract (:mod:`fedseg.common.fl.protocol`) carries it, and must not load torch's
training machinery to do so.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PrivacyMode = Literal["off", "dp-sgd", "client-dp"]
DEFAULT_NOISE_MULTIPLIER = 1.0
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_DELTA = 1e-5
DEFAULT_UPDATE_CLIP_NORM = 1.0


class PrivacyConfig(BaseModel):
    """The privacy a federation trains with; the site's policy has the last word (:mod:`fedseg.client.budget`).

    Under ``dp-sgd`` every site trains with patient-level DP-SGD: each step samples every case with probability
    q = batch_size / cases (Poisson), takes one patch per sampled case, clips each case's gradient to
    ``max_grad_norm`` and adds Gaussian noise of standard deviation ``noise_multiplier × max_grad_norm``.

    Noise: when ``epsilon`` is set it wins and ``noise_multiplier`` is ignored: each site derives the noise
    multiplier that spends ``epsilon`` (at ``delta``) over the run's ``rounds × steps`` at its own q. Either way a
    site raises the noise to its own ``min_noise_multiplier`` and lowers the clip norm to its own ``max_grad_norm``
    (site policy), and refuses a round that would take it past its ``max_epsilon``.

    ``federation`` and ``rounds`` are filled in by the server for every task (:meth:`for_run`); a site keeps its
    ε under ``federation`` unless its policy names its own key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: PrivacyMode = Field(
        default="off",
        description="off; dp-sgd: patient-level DP-SGD at every site (needs model.norm = group or instance); "
        "client-dp: site-level DP of the updates: the server clips every site's update to update_clip_norm and "
        "noises their mean (Flower's server-side fixed clipping)",
    )
    noise_multiplier: float = Field(
        default=DEFAULT_NOISE_MULTIPLIER,
        gt=0,
        description="noise standard deviation / max_grad_norm per DP-SGD step (ignored when epsilon is set)",
    )
    max_grad_norm: float = Field(
        default=DEFAULT_MAX_GRAD_NORM, gt=0, description="every case's gradient is clipped to this L2 norm"
    )
    update_clip_norm: float = Field(
        default=DEFAULT_UPDATE_CLIP_NORM,
        gt=0,
        description="client-dp: every site's update (its weights minus the global ones) is clipped to this L2 norm",
    )
    delta: float = Field(default=DEFAULT_DELTA, gt=0, lt=1, description="the δ every site's ε is counted at")
    epsilon: float | None = Field(
        default=None,
        gt=0,
        description="target ε per site for the whole run: each site derives its noise multiplier from it (wins "
        "over noise_multiplier); none: noise_multiplier as given",
    )
    federation: str = Field(
        default="",
        max_length=200,
        description="the name sites keep their ε under; empty: the server names it after its output folder, "
        "which --resume keeps",
    )
    rounds: int | None = Field(
        default=None, ge=1, description="set by the server: the run's rounds, over which epsilon is spread"
    )

    @property
    def enabled(self) -> bool:
        """Whether the task asks for any differential privacy."""
        return self.mode != "off"

    def for_run(self, rounds: int, output_dir: str) -> PrivacyConfig:
        """This config as the server sends it: ``rounds`` set, and ``federation`` named after ``output_dir``
        (a resumed run keeps its output folder, so its sites keep counting) unless it is named already."""
        name = self.federation or "run-" + hashlib.sha256(output_dir.encode()).hexdigest()[:16]
        return self.model_copy(update={"rounds": rounds, "federation": name})
