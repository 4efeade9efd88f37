"""The ServerApp's round loop without Flower's runtime: a fake grid answers with our real ClientApp handler.

Covers central validation, checkpoints, history rows, and ``--resume`` continuing the round count.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from fedseg.client.app import train
from fedseg.client.site import SiteConfig
from fedseg.common.engine.checkpoint import read_meta
from fedseg.common.errors import ConfigError
from fedseg.server.app import run_spec
from fedseg.server.config import RUN_CONFIG_KEY, RunSpec
from fedseg.server.configfile import load_server_config
from fedseg.server.control.runs import new_spec, resume_spec, save_config
from fedseg.server.run.history import read_history
from fedseg.server.run.loop import serve

pytestmark = pytest.mark.usefixtures("task_identity")


class SiteGrid:
    """Delivers each train message to the ClientApp handler of the node it is addressed to.

    Like Flower's grid, ``push_messages`` returns message ids and ``pull_messages`` the replies to them;
    ``send_and_receive`` is never called (the ServerApp's telemetry grid pushes and pulls itself).
    """

    def __init__(self, sites: dict[int, SiteConfig]) -> None:
        self.sites = sites
        self.sent: list[int] = []
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent.append(node)
            message_id = f"m{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = message_id
            node_config = {k: str(v) for k, v in self.sites[node].model_dump().items() if v is not None}
            context = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config={})
            reply = train(message, context)
            reply.metadata.__dict__["_src_node_id"] = node
            self.replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _grid(phantoms: Path, tmp_path: Path) -> SiteGrid:
    return SiteGrid(
        {
            10 + i: SiteConfig(
                site=f"site-{i}",
                data=phantoms / f"site-{i}",
                labels=str(phantoms / f"site-{i}" / "labels.toml"),
                workdir=tmp_path / f"w{i}",
            )
            for i in (1, 2)
        }
    )


def _config_overrides(phantoms: Path, out: Path) -> list[str]:
    return [
        "rounds=2",
        f"output_dir={out}",
        "model.feature_scale=64",
        "train.steps=2",
        "train.patch_size=[16,16,16]",
        "train.augment=false",
        f"validation.data={phantoms / 'validation'}",
        f"validation.labels={phantoms / 'validation' / 'labels.toml'}",
    ]


def test_rounds_record_history_checkpoints_and_resume_continues(phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_server_config(None, _config_overrides(phantoms, out))
    spec = new_spec(cfg)
    save_config(cfg)
    grid = _grid(phantoms, tmp_path)
    serve(grid, spec)  # type: ignore[arg-type]
    rows = read_history(out)
    assert [r.round for r in rows] == [0, 1, 2]
    assert rows[0].sites == [] and rows[0].bytes_out == 0
    assert sorted(s.site for s in rows[1].sites) == ["site-1", "site-2"]
    assert rows[2].bytes_out == 2 * rows[2].sites[0].bytes_in
    assert set(rows[1].dice) == {"dice_pancreas", "dice_spleen", "dice_kidney", "dice_liver", "dice_mean"}
    assert read_meta(out / "checkpoints" / "last.pt").round == 2
    assert (out / "cache" / "validation").is_dir()
    assert sorted(grid.sent) == [11, 11, 12, 12]

    with pytest.raises(ConfigError, match="already completed 2 of 2 rounds; pass rounds=N with N > 2"):
        resume_spec(out)
    with pytest.raises(ConfigError, match=r"cannot resume with other model.feature_scale, preprocess.hu_window than"):
        resume_spec(out, ["rounds=3", "model.feature_scale=8", "preprocess.hu_window=[-500, 500]"])
    resumed = resume_spec(out, ["rounds=3"])
    assert (resumed.first_round, resumed.num_rounds) == (3, 1)
    assert resumed.initial_checkpoint == out / "checkpoints" / "last.pt"
    serve(grid, resumed)  # type: ignore[arg-type]
    rows = read_history(out)
    assert [r.round for r in rows] == [0, 1, 2, 3]
    assert len(rows[3].sites) == 2
    assert "site site-1 round 3: replying" in (tmp_path / "w1" / "logs" / "clientapp.log").read_text()
    assert read_meta(out / "checkpoints" / "last.pt").round == 3


def test_new_run_refuses_a_folder_with_a_run(phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        new_spec(load_server_config(None, [f"output_dir={out}"]))


def test_resume_needs_a_run_folder_with_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a fed-server run folder"):
        resume_spec(tmp_path)
    save_config(load_server_config(None, [f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        resume_spec(tmp_path)


def test_run_spec_from_run_config() -> None:
    spec = RunSpec(config=load_server_config(None), first_round=2)
    assert run_spec({RUN_CONFIG_KEY: spec.model_dump_json()}) == spec
    with pytest.raises(
        ConfigError, match=r"run config 'config-json' is empty; submit fedseg runs with `fed-server start`"
    ):
        run_spec({RUN_CONFIG_KEY: ""})
    with pytest.raises(ConfigError, match="run config 'config-json': first_round: Input should be greater than"):
        run_spec({RUN_CONFIG_KEY: '{"config": {}, "first_round": 0}'})
