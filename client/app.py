"""Our Flower ClientApp (``fedseg.client.app:app``): thin handlers around :mod:`fedseg.client.training`.

Flower starts a new ``flwr-clientapp`` process for every message; the site's settings come from the
SuperNode's node-config (written by ``fed-client join``; on the simulation runtime see
:mod:`fedseg.client.simulated`), the round's task from the message.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedseg.client.budget import PrivacyRefused, SiteBudget
from fedseg.client.crosssite import Scores, score_cases
from fedseg.client.egress import egress_mod
from fedseg.client.localbn import keep_on_disk, own_start
from fedseg.client.policy import Review
from fedseg.client.simulated import site_for
from fedseg.client.site import load_training_cases
from fedseg.client.telemetry import EVENTS_FILE, RoundReporter, note_exit
from fedseg.client.training import BudgetExceeded, TrainingDiverged, Watchdog, train_locally
from fedseg.common.engine.device import resolve_device
from fedseg.common.fl.packing import unpacked
from fedseg.common.fl.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LocalResult,
    evaluate_content,
    failure_content,
    read_task,
    reply_content,
    round_seed,
)
from fedseg.common.fl.weights import load_arrays
from fedseg.common.nn.model import build_model
from fedseg.common.runtime.applog import detach, log_to_file
from fedseg.common.runtime.events import EventWriter, process_started

log = logging.getLogger(__name__)

app = ClientApp(mods=[egress_mod])  # every reply is written to the site's egress ledger first


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data and reply with weights and aggregate metrics.

    The site's policy first clamps the task or refuses it (a failure reply saying why); the work, from loading the
    cases to encoding the weights, then runs under the task's :class:`Watchdog` (see :mod:`fedseg.client.policy`).
    """
    arrived = time.monotonic()
    site = site_for(context.node_config, context.run_config)
    handler = log_to_file(site.log_dir / "clientapp.log")
    report: RoundReporter | None = None
    notes: tuple[str, ...] = ()
    try:
        config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        task, server_round = read_task(config)
        review = site.policy.review(task)
        task, notes = review.task, review.notes
        log.info("site %s round %d: training (%d steps)", site.site, server_round, task.train.total_steps)
        reporter = report = RoundReporter(EventWriter(site.workdir / EVENTS_FILE), server_round)
        report.start(task.train.total_steps, process_started=process_started())
        note_exit(report)
        _say_policy(site.site, server_round, review, report)
        if review.refusal is not None:
            report.end(ok=False)
            return Message(failure_content(site.site, review.refusal, (*notes, review.refusal)), reply_to=msg)
        watchdog = Watchdog(review.seconds, review.limit, arrived)
        arrays: ArrayRecord = msg.content.array_records[ARRAYS_KEY]

        def work() -> tuple[ArrayRecord, LocalResult]:
            watchdog.stage = "preparing the cases"
            cases = load_training_cases(site, task.preprocess)
            reporter.phase("load", time.monotonic() - reporter.started)
            reporter.cases(len(cases))
            seed = round_seed(task.train.seed, server_round, site.site)
            device = resolve_device(site.device)
            budget = SiteBudget.at(site.workdir, site.policy.privacy)
            return train_locally(
                arrays, task, cases, device, seed, reporter.step, context.state, watchdog, budget=budget
            )

        new_arrays, result = watchdog.run(work)
        if task.bn == "local":  # context.state is in memory only: fed-client export-model reads this copy
            keep_on_disk(site.workdir, arrays, context.state, task, server_round)
        if result.policy:
            log.warning("site %s round %d: %s", site.site, server_round, "; ".join(result.policy))
            report.policy(result.policy)
        result = dataclasses.replace(result, policy=(*notes, *result.policy))
        report.phase("train", result.seconds)
        report.end(ok=True, loss=result.loss, epsilon=result.epsilon, delta=result.delta)
        log.info("site %s round %d: replying (%d cases, loss %.4f)", site.site, server_round, result.cases, result.loss)
        if task.last_round is not None and server_round >= task.last_round:
            log.info("site %s: round %d is the run's last", site.site, server_round)
            report.run_done(task.last_round)
        return Message(reply_content(new_arrays, result, site.site), reply_to=msg)
    except (TrainingDiverged, BudgetExceeded, PrivacyRefused) as err:
        log.error("site %s: %s; replying with the failure instead of weights", site.site, err)
        if report is not None:
            report.end(ok=False)
        return Message(failure_content(site.site, str(err), notes), reply_to=msg)
    except Exception:
        log.exception("site %s: training failed", site.site)
        if report is not None:
            report.end(ok=False)
        raise
    finally:
        detach(handler)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Cross-site validation: score the received global model on this site's labelled cases, aggregates only.

    Under ``bn = "local"`` the site scores it with its own BatchNorm tensors (the ones it trains with). The site's
    policy may refuse it (patch, network, spacing, ``cross_site = false``); the scoring runs under the task's
    :class:`Watchdog` and stops before a case that would not end in time (the reply says how many were scored).
    """
    arrived = time.monotonic()
    site = site_for(context.node_config, context.run_config)
    handler = log_to_file(site.log_dir / "clientapp.log")
    notes: tuple[str, ...] = ()
    try:
        config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        task, server_round = read_task(config)
        review = site.policy.review(task, evaluate=True)
        task, notes = review.task, review.notes
        _say_policy(site.site, server_round, review, None)
        if review.refusal is not None:
            return Message(failure_content(site.site, review.refusal, (*notes, review.refusal)), reply_to=msg)
        watchdog = Watchdog(review.seconds, review.limit, arrived)
        arrays: ArrayRecord = msg.content.array_records[ARRAYS_KEY]

        def work() -> tuple[Scores, int]:
            watchdog.stage = "preparing the cases"
            cases = load_training_cases(site, task.preprocess)
            model = build_model(task.model)
            received = unpacked(arrays, model.state_dict(), task.transport)
            load_arrays(model, own_start(received, context.state) if task.bn == "local" else received)
            left = watchdog.enter(model, f"scoring {len(cases)} cases")
            scored = score_cases(model, cases, task.train.patch_size, resolve_device(site.device), left)
            watchdog.settle()
            return scored, len(cases)

        scored, total = watchdog.run(work)
        if scored.cases < total:
            stopped = f"scored {scored.cases} of {total} cases in {watchdog.elapsed():.1f} s ({watchdog.limit})"
            log.warning("site %s round %d: %s", site.site, server_round, stopped)
            notes = (*notes, stopped)
        log.info(
            "site %s round %d: cross-site scores of the global model on %d cases", site.site, server_round, scored.cases
        )
        return Message(evaluate_content(scored.scores, scored.cases, site.site, notes), reply_to=msg)
    except BudgetExceeded as err:
        log.error("site %s: %s; replying with the failure instead of scores", site.site, err)
        return Message(failure_content(site.site, str(err), notes), reply_to=msg)
    except Exception:
        log.exception("site %s: cross-site validation failed", site.site)
        raise
    finally:
        detach(handler)


def _say_policy(site: str, server_round: int, review: Review, report: RoundReporter | None) -> None:
    """Log (and report to ``join``'s terminal) what the site's policy did to a task: clamps, a refusal."""
    if review.notes:
        log.warning("site %s round %d: site policy lowered the task: %s", site, server_round, "; ".join(review.notes))
    if review.refusal is not None:
        log.error("site %s round %d: %s; replying with the reason", site, server_round, review.refusal)
    said = (*review.notes, review.refusal) if review.refusal is not None else review.notes
    if said and report is not None:
        report.policy(said)
