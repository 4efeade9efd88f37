"""The site's own privacy budget: what DP-SGD has cost it so far, per federation, and whether a round still fits.

The server asks, the site decides. Before a DP-SGD round trains, :meth:`SiteBudget.plan` fixes the mechanism
(the noise multiplier the task asks for, or the one its ε target implies at this site's sample rate, raised to the
site's ``min_noise_multiplier``; the clip norm and δ as the policy clamped them), asks the accountant what ε the
round would bring the site to if it ran all its steps, and refuses it (:class:`PrivacyRefused`, a failure reply)
when that passes ``max_epsilon``. After training, :meth:`SiteBudget.spend` records the steps actually taken.

The accountant's state is a history of ``(noise multiplier, sample rate, steps)`` per key
(:mod:`fedseg.common.privacy.accounting`), kept in ``<workdir>/privacy-budget.json``: read and written under an
exclusive lock, replaced atomically (temporary file, fsync, ``os.replace``), so neither a crash, a restarted site
nor a second ClientApp process loses or resets it. A file that cannot be read stops every DP round (it is never
started afresh).

The key is the site policy's ``privacy.federation`` when set, else the federation the task names: the server names
it after its output folder (:meth:`fedseg.common.privacy.config.PrivacyConfig.for_run`), which ``--resume`` keeps,
so a resumed run counts on; a new output folder is a new federation. A server could rename its federation to open a
fresh budget; a site that joins one study only sets ``privacy.federation`` and every round counts against it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fedseg.client.policy import PrivacyPolicy, clamp_privacy
from fedseg.common.fl.protocol import TrainTask
from fedseg.common.privacy.accounting import Step, epsilon, extended, noise_for, sample_rate
from fedseg.common.privacy.dpsgd import DPSettings

log = logging.getLogger(__name__)

BUDGET_FILE = "privacy-budget.json"
FORMAT = "fedseg-privacy-budget"
#: The key of tasks that name no federation (a server older than the privacy settings never asks for DP).
UNNAMED = "unnamed"


class PrivacyRefused(RuntimeError):
    """The site does not train this round under DP (one line why): the reply is a failure, no weights leave."""


class BudgetFile:
    """Every federation's accountant history at this site, in ``path`` (None: in memory only, for tests).

    Raises:
        PrivacyRefused: (reading) the file exists but cannot be read as a budget.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, list[Step]] = {}

    def history(self, key: str) -> list[Step]:
        """The steps spent under ``key`` so far."""
        with self._locked():
            return self._read().get(key, [])

    def add(self, key: str, step: Step) -> list[Step]:
        """Record ``step`` under ``key``; returns the key's whole history."""
        with self._locked():
            table = self._read()
            table[key] = extended(table.get(key, []), step)
            self._write(table)
            return table[key]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> dict[str, list[Step]]:
        if self.path is None:
            return {k: list(v) for k, v in self._memory.items()}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            return {str(k): [(float(s), float(q), int(n)) for s, q, n in v] for k, v in raw["federations"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise PrivacyRefused(
                f"the site's privacy budget {self.path} cannot be read ({type(err).__name__}: {err}); no DP round "
                "trains until it is restored"
            ) from None

    def _write(self, table: dict[str, list[Step]]) -> None:
        if self.path is None:
            self._memory = table
            return
        payload = {"format": FORMAT, "accountant": "rdp", "federations": table}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(payload, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass(frozen=True)
class RoundPlan:
    """A DP-SGD round as the site will run it.

    Attributes:
        key: the federation the round counts under.
        settings: noise multiplier, clip norm and the true Poisson rate q = expected batch / cases.
        delta: the δ ε is counted at.
        steps: the steps the round may take.
        before: the site's ε for ``key`` before the round.
        after: its ε if the round takes all ``steps``.
        notes: what the site changed in the task's mechanism (one line each).
    """

    key: str
    settings: DPSettings
    delta: float
    steps: int
    before: float
    after: float
    notes: tuple[str, ...] = ()


class SiteBudget:
    """A site's privacy policy with its accountant state (see the module docstring)."""

    def __init__(self, policy: PrivacyPolicy, store: BudgetFile) -> None:
        self.policy = policy
        self.store = store

    @classmethod
    def at(cls, workdir: Path, policy: PrivacyPolicy) -> SiteBudget:
        """The budget kept in ``workdir``."""
        return cls(policy, BudgetFile(workdir / BUDGET_FILE))

    def key(self, task: TrainTask) -> str:
        """The key the task's rounds count under."""
        return self.policy.federation or task.privacy.federation or UNNAMED

    def plan(self, task: TrainTask, cases: int) -> RoundPlan:
        """The round's mechanism, or a refusal before any training.

        Raises:
            PrivacyRefused: the round would take the site past ``max_epsilon``, or its budget file is unreadable.
        """
        notes: list[str] = []
        privacy = clamp_privacy(task.privacy, self.policy, notes)
        rate = sample_rate(task.train.batch_size, cases)
        steps = task.train.total_steps
        sigma = privacy.noise_multiplier
        if privacy.epsilon is not None:
            rounds = privacy.rounds or 1
            sigma = noise_for(privacy.epsilon, privacy.delta, rate, rounds * steps)
            log.info("noise multiplier %.4g spends epsilon %g over %d rounds x %d steps at q %.4g", sigma,
                     privacy.epsilon, rounds, steps, rate)  # fmt: skip
            if sigma < self.policy.min_noise_multiplier:
                notes.append(
                    f"noise_multiplier {sigma:.4g} (for epsilon {privacy.epsilon:g}) -> "
                    f"{self.policy.min_noise_multiplier:g} (privacy.min_noise_multiplier)"
                )
                sigma = self.policy.min_noise_multiplier
        key = self.key(task)
        history = self.store.history(key)
        before = epsilon(history, privacy.delta)
        after = epsilon(extended(history, (sigma, rate, steps)), privacy.delta)
        limit = self.policy.max_epsilon
        if limit is not None and after > limit:
            raise PrivacyRefused(
                f"privacy budget: this round would take the site's epsilon from {before:.3f} to {after:.3f} "
                f"(delta {privacy.delta:g}, federation {key}), past its max_epsilon {limit:g}; it trains no more rounds"
            )
        settings = DPSettings(sigma, privacy.max_grad_norm, rate)
        return RoundPlan(key, settings, privacy.delta, steps, before, after, tuple(notes))

    def spend(self, plan: RoundPlan, steps: int) -> float:
        """Record ``steps`` steps of ``plan`` (the ones taken) and return the site's ε for its key after them."""
        s = plan.settings
        history = self.store.add(plan.key, (s.noise_multiplier, s.sample_rate, steps))
        spent = epsilon(history, plan.delta)
        log.info("privacy: epsilon %.3f -> %.3f (delta %g, federation %s)", plan.before, spent, plan.delta, plan.key)
        return spent
