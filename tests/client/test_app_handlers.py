"""The ClientApp's pieces without Flower running: node-config, local training, the deadline, the train handler."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from fedseg.client import training as client_training
from fedseg.client.app import train
from fedseg.client.site import SiteConfig, load_training_cases, site_from_node_config, write_node_config
from fedseg.client.training import BudgetExceeded, Watchdog, train_locally
from fedseg.common.data.intensity import IntensityStats
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.errors import ConfigError, DataError
from fedseg.common.fl.offline import to_site
from fedseg.common.fl.packing import is_packed, pack_arrays, unpacked
from fedseg.common.fl.protocol import (
    ANNOTATED_KEY,
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    POLICY_KEY,
    SITE_KEY,
    TrainTask,
    task_config,
)
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model

TINY = ModelConfig(feature_scale=64)
TASK = TrainTask(
    model=TINY,
    train=TrainConfig(steps=2, batch_size=2, patch_size=(16, 16, 16), augment=False, lr=1e-2),
    preprocess=PreprocessConfig(),
    deadline=120.0,
)


def _site(root: Path, tmp_path: Path) -> SiteConfig:
    return SiteConfig(
        site="site-1", data=root / "site-1", labels=str(root / "site-1" / "labels.toml"), workdir=tmp_path
    )


def test_node_config_round_trips_through_flowers_parser(phantom_root: Path, tmp_path: Path) -> None:
    site = _site(phantom_root, tmp_path / "work dir")
    path = write_node_config(site, tmp_path / "node-config.toml")
    parsed = parse_config_args([str(path)])
    assert site_from_node_config(parsed) == site


def test_node_config_without_site_settings_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as err:
        site_from_node_config({"partition-id": 0, "num-partitions": 2})
    message = str(err.value)
    assert message.startswith("node-config: site: Field required; data: Field required")
    assert message.endswith("start the SuperNode with fed-client join")
    with pytest.raises(ConfigError, match="device: Value error, must be cpu, cuda, cuda:N or auto"):
        site_from_node_config({"site": "a", "data": "/d", "workdir": "/w", "device": "gpu"})


def test_training_cases_come_from_the_cache_the_second_time(phantom_root: Path, tmp_path: Path) -> None:
    site = _site(phantom_root, tmp_path)
    first = load_training_cases(site, PreprocessConfig())
    assert [c.case_id for c in first] == ["site1_000", "site1_001"]
    assert len(list(site.cache_dir.glob("*.npz"))) == 2
    again = load_training_cases(site, PreprocessConfig())
    np.testing.assert_array_equal(again[0].image, first[0].image)


def test_unlabelled_site_is_refused(tmp_path: Path, phantom_root: Path) -> None:
    images = tmp_path / "site" / "images"
    images.mkdir(parents=True)
    source = next((phantom_root / "site-1" / "imagesTr").iterdir())
    (images / "a.nii.gz").write_bytes(source.read_bytes())
    site = SiteConfig(site="x", data=tmp_path / "site", workdir=tmp_path / "w")
    with pytest.raises(DataError, match=r"site x: .* has no labelled case to train on"):
        load_training_cases(site, PreprocessConfig())


def test_train_locally_changes_weights_and_reports_aggregates_only(phantom_root: Path, tmp_path: Path) -> None:
    cases = load_training_cases(_site(phantom_root, tmp_path), PreprocessConfig())
    torch.manual_seed(0)
    model = build_model(TINY)
    start = arrays_from_model(model)
    new, result = train_locally(start, TASK, cases, "cpu", seed=3)
    assert list(new.keys()) == list(start.keys())
    changed = [k for k in start if not np.array_equal(start[k].numpy(), new[k].numpy())]
    assert len(changed) > len(start) // 2
    assert (result.cases, result.samples) == (2, 4)
    assert result.loss > 0 and result.seconds > 0


def test_the_watchdog_gives_up_stuck_work_at_the_hard_stop_and_hands_back_finished_work() -> None:
    release = threading.Event()
    watchdog = Watchdog(0.2, "max_seconds 0.2")
    watchdog.stage = "preparing the cases"
    stopped = r"^stopped by the site's time limit \(max_seconds 0.2\) after 1\.\d s, while preparing the cases$"
    with pytest.raises(BudgetExceeded, match=stopped):
        watchdog.run(release.wait)  # work that never ends by itself
    assert 0.2 + watchdog.grace <= watchdog.elapsed() < 0.2 + watchdog.grace + 0.5
    with pytest.raises(BudgetExceeded):  # the abandoned work cannot settle: it never writes the site's state
        watchdog.settle()
    release.set()
    assert Watchdog(5.0, "deadline 5 s").run(lambda: 7) == 7
    with pytest.raises(ZeroDivisionError):
        Watchdog(5.0, "deadline 5 s").run(lambda: 1 // 0)


def _train_message(arrays_record: ArrayRecord, config: ConfigRecord) -> Message:
    return to_site(RecordDict({ARRAYS_KEY: arrays_record, CONFIG_KEY: config}), 5)


def test_train_handler_replies_with_weights_metrics_and_site_name(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[TrainConfig] = []
    stats: list[IntensityStats | None] = []
    real_train_model = client_training.train_model

    def spy(
        model: torch.nn.Module, cases: list[PreparedCase], cfg: TrainConfig, *args: object, **kwargs: object
    ) -> object:
        seen.append(cfg)
        stats.extend(case.intensity for case in cases)
        return real_train_model(model, cases, cfg, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_training, "train_model", spy)
    site = _site(phantom_root, tmp_path)
    node_config = parse_config_args([str(write_node_config(site, tmp_path / "node.toml"))])
    # what our server sends; per-site intensity statistics are pooled at the site and never leave it
    site_stats = PreprocessConfig(normalization="site")
    config = task_config(TASK.model_copy(update={"packed": True, "preprocess": site_stats}))
    config["server-round"] = 3
    config["proximal-mu"] = 0.1
    arrays = arrays_from_model(build_model(TINY))
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    reply = train(_train_message(pack_arrays(arrays), config), context)
    assert not reply.has_error()
    assert is_packed(reply.content[ARRAYS_KEY])  # a packed task gets a packed reply
    weights = unpacked(reply.content[ARRAYS_KEY], {k: arrays[k].numpy() for k in arrays}, "fp32")
    assert list(weights.keys()) == list(arrays.keys())
    assert not np.array_equal(weights["conv1.conv1.0.weight"].numpy(), arrays["conv1.conv1.0.weight"].numpy())
    metrics = dict(reply.content[METRICS_KEY])
    assert set(metrics) == {"num-examples", "train-loss", "train-samples", "train-seconds"}
    assert (metrics["num-examples"], metrics["train-samples"]) == (2, 4)
    assert 0 < metrics["train-loss"] < 10 and 0 < metrics["train-seconds"] < 600
    assert [cfg.prox_mu for cfg in seen] == [0.1]  # FedProx's μ from the message reached the trainer
    assert seen[0].steps == TASK.train.steps
    assert reply.content[SITE_KEY]["name"] == "site-1"
    assert reply.metadata.dst_node_id == 0
    assert len(stats) == 2 and stats[0] == stats[1] and stats[0] is not None  # both cases share the site's stats
    assert set(reply.content) == {ARRAYS_KEY, METRICS_KEY, SITE_KEY}
    assert set(reply.content[SITE_KEY]) <= {"name", ANNOTATED_KEY, POLICY_KEY}
    assert "site site-1 round 3: replying" in (tmp_path / "logs" / "clientapp.log").read_text()
