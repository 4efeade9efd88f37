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

from fedseg.client.crosssite import score_cases
from fedseg.client.localbn import own_start
from fedseg.client.simulated import site_for
from fedseg.client.site import load_training_cases
from fedseg.client.telemetry import EVENTS_FILE, RoundReporter, note_exit
from fedseg.client.training import TrainingDiverged, deadline, train_locally
from fedseg.common.engine.device import resolve_device
from fedseg.common.fl.packing import unpacked
from fedseg.common.fl.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
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

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data and reply with weights and aggregate metrics."""
    site = site_for(context.node_config, context.run_config)
    handler = log_to_file(site.log_dir / "clientapp.log")
    report: RoundReporter | None = None
    try:
        config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        task, server_round = read_task(config)
        task, clamped = site.policy.clamp(task)
        log.info("site %s round %d: training (%d steps)", site.site, server_round, task.train.total_steps)
        report = RoundReporter(EventWriter(site.workdir / EVENTS_FILE), server_round)
        report.start(task.train.total_steps, process_started=process_started())
        note_exit(report)
        if clamped:
            log.warning(
                "site %s round %d: site policy lowered the task: %s", site.site, server_round, "; ".join(clamped)
            )
            report.policy(clamped)
        arrays: ArrayRecord = msg.content.array_records[ARRAYS_KEY]
        with deadline(task.deadline):
            cases = load_training_cases(site, task.preprocess)
            report.phase("load", time.monotonic() - report.started)
            report.cases(len(cases))
            seed = round_seed(task.train.seed, server_round, site.site)
            device = resolve_device(site.device)
            new_arrays, result = train_locally(
                arrays,
                task,
                cases,
                device,
                seed,
                on_step=report.step,
                state=context.state,
                time_limit=site.max_seconds,
            )
        if result.policy:
            log.warning("site %s round %d: %s", site.site, server_round, "; ".join(result.policy))
            report.policy(result.policy)
        result = dataclasses.replace(result, policy=(*clamped, *result.policy))
        report.phase("train", result.seconds)
        report.end(ok=True, loss=result.loss)
        log.info("site %s round %d: replying (%d cases, loss %.4f)", site.site, server_round, result.cases, result.loss)
        return Message(reply_content(new_arrays, result, site.site), reply_to=msg)
    except TrainingDiverged as err:
        log.error("site %s: %s; replying with the failure instead of weights", site.site, err)
        if report is not None:
            report.end(ok=False)
        return Message(failure_content(site.site, str(err)), reply_to=msg)
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

    Under ``bn = "local"`` the site scores it with its own BatchNorm tensors (the ones it trains with).
    """
    site = site_for(context.node_config, context.run_config)
    handler = log_to_file(site.log_dir / "clientapp.log")
    try:
        config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        task, server_round = read_task(config)
        with deadline(task.deadline):
            cases = load_training_cases(site, task.preprocess)
            model = build_model(task.model)
            received = unpacked(msg.content.array_records[ARRAYS_KEY], model.state_dict(), task.transport)
            load_arrays(model, own_start(received, context.state) if task.bn == "local" else received)
            scores = score_cases(model, cases, task.train.patch_size, resolve_device(site.device))
        log.info(
            "site %s round %d: cross-site scores of the global model on %d cases", site.site, server_round, len(cases)
        )
        return Message(evaluate_content(scores, len(cases), site.site), reply_to=msg)
    except Exception:
        log.exception("site %s: cross-site validation failed", site.site)
        raise
    finally:
        detach(handler)
