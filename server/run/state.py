"""The strategy's state between rounds (FedAdam/FedYogi moments, pinned site identities), saved per round.

One file per round, ``checkpoints/state/round-NNNN.npz``, written atomically (temporary file + rename) *before*
the round's ``last.pt``; resume loads the file of ``last.pt``'s round, so a crash between the two writes cannot
pair weights with the moments of another round. The two newest files are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedseg.common.errors import ConfigError

NDArray = np.ndarray
STATE_DIR = "state"
_KEEP = 2
_META = "__meta__"


@dataclass
class StrategyState:
    """What a strategy needs besides the global weights to continue exactly.

    Attributes:
        round: the global round after which this state holds.
        moments: FedOpt's first/second moments, ``{"m": {key: array}, "v": {...}}`` (empty for other strategies).
        registry: pinned site identities (:meth:`~fedseg.server.run.replies.SiteRegistry.to_json`).
        accountant: the client-level DP accountant's state (:mod:`fedseg.server.run.clientdp`; empty without it).
    """

    round: int
    moments: dict[str, dict[str, NDArray]] = field(default_factory=dict)
    registry: dict[str, dict[str, object]] = field(default_factory=dict)
    accountant: dict[str, object] = field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 over the moments (keys, dtypes, shapes, bytes) and the registry: equal state, equal digest."""
        head = {"round": self.round, "registry": self.registry, "accountant": self.accountant}
        h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
        for name in sorted(self.moments):
            for key in sorted(self.moments[name]):
                value = np.ascontiguousarray(self.moments[name][key])
                h.update(f"{name}/{key}/{value.dtype}/{value.shape}".encode())
                h.update(value.tobytes())
        return h.hexdigest()


def state_path(checkpoint_dir: Path, server_round: int) -> Path:
    """Where the state after ``server_round`` lives."""
    return checkpoint_dir / STATE_DIR / f"round-{server_round:04d}.npz"


def save_state(checkpoint_dir: Path, state: StrategyState) -> Path:
    """Write ``state`` atomically and keep only the newest files."""
    path = state_path(checkpoint_dir, state.round)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, NDArray] = {
        f"{name}/{key}": value for name, part in state.moments.items() for key, value in part.items()
    }
    meta = json.dumps({"round": state.round, "registry": state.registry, "accountant": state.accountant})
    arrays[_META] = np.frombuffer(meta.encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in sorted(path.parent.glob("round-*.npz"))[:-_KEEP]:
        old.unlink(missing_ok=True)
    return path


def load_state(checkpoint_dir: Path, server_round: int) -> StrategyState:
    """The state saved after ``server_round``.

    Raises:
        ConfigError: there is no state file for that round (a run from an older fedseg, or a damaged folder).
    """
    path = state_path(checkpoint_dir, server_round)
    if not path.is_file():
        raise ConfigError(f"cannot resume exactly: {path} (the strategy state of round {server_round}) is missing")
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data[_META]).decode())
        moments: dict[str, dict[str, NDArray]] = {}
        for name in data.files:
            if name == _META:
                continue
            part, key = name.split("/", 1)
            moments.setdefault(part, {})[key] = data[name]
    return StrategyState(
        round=int(meta["round"]), moments=moments, registry=meta["registry"], accountant=meta.get("accountant", {})
    )


def moments_of(inner: object) -> dict[str, dict[str, NDArray]]:
    """FedOpt's ``m_t``/``v_t`` (copies) when ``inner`` has them, else {}."""
    out: dict[str, dict[str, NDArray]] = {}
    for name in ("m_t", "v_t"):
        value = getattr(inner, name, None)
        if isinstance(value, Mapping) and value:
            out[name] = {k: np.array(v) for k, v in value.items()}
    return out


def restore_moments(inner: object, moments: Mapping[str, Mapping[str, NDArray]]) -> None:
    """Put saved ``m_t``/``v_t`` back into a FedOpt strategy (no-op for others)."""
    for name, value in moments.items():
        if hasattr(inner, name):
            setattr(inner, name, {k: np.array(v) for k, v in value.items()})
