"""A DP-SGD federation through the server's round loop: the task carries the privacy settings, the sites' replies
with ε are accepted, and a ``--resume`` keeps every site counting ε where it stopped; bad combinations are one line."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message

from fedseg.client.budget import BUDGET_FILE, SiteBudget
from fedseg.client.policy import PrivacyPolicy
from fedseg.client.training import train_locally
from fedseg.common.errors import ConfigError
from fedseg.common.fl.protocol import TrainTask, read_task, reply_content
from fedseg.server.configfile import load_server_config
from fedseg.server.control.runs import new_spec, resume_spec, save_config
from fedseg.server.run.history import read_history
from fedseg.server.run.loop import serve
from tests.common.engine.test_training import make_case

pytestmark = pytest.mark.usefixtures("task_identity")

DP = [
    "model.feature_scale=64",
    "model.norm=group",
    "privacy.mode=dp-sgd",
    "train.steps=2",
    "train.batch_size=1",
    "train.patch_size=[16, 16, 16]",
    "train.augment=false",
]


class PrivateSites:
    """Two sites that really train with DP-SGD, each with its own budget in its own workdir."""

    def __init__(self, workdirs: Path) -> None:
        self.workdirs = workdirs
        self.cases = [make_case(seed, size=16) for seed in range(2)]
        self.tasks: list[TrainTask] = []
        self.epsilons: dict[int, list[float]] = {11: [], 12: []}
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return [11, 12]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            message_id = f"m{len(self.tasks)}-{i}"
            message.metadata.__dict__["_message_id"] = message_id
            self.pending[message_id] = self._reply(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def _reply(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        task, server_round = read_task(message.content.config_records["config"])
        self.tasks.append(task)
        budget = SiteBudget.at(self.workdirs / str(node), PrivacyPolicy())
        arrays = message.content.array_records["arrays"]
        trained, result = train_locally(arrays, task, self.cases, "cpu", server_round + node, budget=budget)
        assert result.epsilon is not None
        self.epsilons[node].append(result.epsilon)
        reply = Message(reply_content(trained, result, f"site-{node}"), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


def test_a_resumed_dp_run_keeps_every_site_counting(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_server_config(None, ["rounds=2", f"output_dir={out}", *DP])
    save_config(cfg)
    sites = PrivateSites(tmp_path / "sites")
    serve(sites, new_spec(cfg))  # type: ignore[arg-type]
    serve(sites, resume_spec(out, ["rounds=3"]))  # type: ignore[arg-type]
    rows = read_history(out)
    assert [len(r.sites) for r in rows] == [0, 2, 2, 2] and not any(r.rejected for r in rows)  # ε is no rejection
    (federation,) = {t.privacy.federation for t in sites.tasks}  # the same name before and after --resume
    assert federation.startswith("run-")
    assert [t.privacy.rounds for t in sites.tasks] == [2, 2, 2, 2, 3, 3]
    for node, spent in sites.epsilons.items():
        assert len(spent) == 3 and 0 < spent[0] < spent[1] < spent[2]  # round 3 goes on from round 2's ε
        budget = SiteBudget.at(tmp_path / "sites" / str(node), PrivacyPolicy())
        assert budget.store.history(federation) == [(1.0, 0.5, 6)]  # 3 rounds x 2 steps at q = 1 / 2 cases
    assert (tmp_path / "sites" / "11" / BUDGET_FILE).is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mode=dp-sgd"], "privacy.mode = 'dp-sgd' cannot train model.norm = 'batch'"),
        (["privacy.mode=dp-sgd", "model.norm=group", "train.pseudo_weight=0.5"], "train.pseudo_weight > 0"),
        (["privacy.mode=client-dp"], "privacy.mode = 'client-dp' needs strategy.weighting = 'equal'"),
        (["privacy.noise_multiplier=0"], "privacy.noise_multiplier: Input should be greater than 0"),
    ],
)
def test_privacy_settings_the_sites_cannot_train_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_server_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    if "batch" in message:
        assert "use model.norm=group" in str(err.value)


def test_a_task_from_a_server_without_privacy_settings_still_parses() -> None:
    cfg = load_server_config(None, ["model.norm=group", "privacy.mode=dp-sgd"])
    assert cfg.privacy.mode == "dp-sgd" and cfg.model.norm == "group"
    old = TrainTask(model=cfg.model, train=cfg.train, preprocess=cfg.preprocess, deadline=60.0)
    raw = old.model_dump(mode="json")
    del raw["privacy"], raw["model"]["norm"]  # what a server older than both settings sends
    parsed = TrainTask.model_validate(raw)
    assert parsed.privacy.mode == "off" and parsed.model.norm == "batch"
