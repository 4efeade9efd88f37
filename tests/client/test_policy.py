"""Site policy: the server's task is clamped to the site's caps (and the site says so), the seconds cap really stops
training while the reply still goes back, and a bad policy is one line at ``join``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from typer.testing import CliRunner

from fedseg.client import training as client_training
from fedseg.client.app import train
from fedseg.client.cli.main import app as client_cli
from fedseg.client.policy import SitePolicy, site_policy
from fedseg.client.site import SiteConfig
from fedseg.client.telemetry import EVENTS_FILE
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import TrainReport
from fedseg.common.errors import ConfigError
from fedseg.common.fl.offline import to_site
from fedseg.common.fl.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, TrainTask, policy_note, task_config
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from tests.client.sites import phantom_node_config

TINY = ModelConfig(feature_scale=64)
runner = CliRunner()


def _task(steps: int, batch: int) -> TrainTask:
    train_cfg = TrainConfig(steps=steps, batch_size=batch, patch_size=(16, 16, 16), augment=False, lr=1e-2)
    return TrainTask(model=TINY, train=train_cfg, preprocess=PreprocessConfig(), deadline=600.0)


def _run_handler(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: TrainTask, **caps: float
) -> tuple[Message, list[TrainReport]]:
    """The train handler on the phantom site with ``caps`` in its node-config; returns the reply and the reports."""
    reports: list[TrainReport] = []
    real = client_training.train_model  # type: ignore[attr-defined]

    def spy(*args: object, **kwargs: object) -> TrainReport:
        reports.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return reports[-1]

    monkeypatch.setattr(client_training, "train_model", spy)
    node_config = phantom_node_config(phantom_root, tmp_path, **caps)
    config = task_config(task)
    config["server-round"] = 2
    content = RecordDict({ARRAYS_KEY: arrays_from_model(build_model(TINY)), CONFIG_KEY: config})
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    return train(to_site(content, 5), context), reports


def _events(tmp_path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]


def test_an_over_budget_task_is_clamped_and_the_site_says_so(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reply, reports = _run_handler(
        phantom_root, tmp_path, monkeypatch, _task(steps=5, batch=4), max_steps=3, max_batch=2
    )
    assert not reply.has_error()
    assert [r.steps for r in reports] == [3]  # the steps actually run are the cap, not the server's 5
    metrics = dict(reply.content[METRICS_KEY])
    assert metrics["train-samples"] == 6  # 3 steps x batch 2
    note = "steps 5 -> 3 (max_steps); batch 4 -> 2 (max_batch)"
    assert policy_note(reply.content) == note  # the server sees it (and logs it)
    assert (
        f"site site-1 round 2: site policy lowered the task: {note}"
        in (tmp_path / "logs" / "clientapp.log").read_text()
    )
    events = _events(tmp_path)
    assert {"kind": "policy", "round": 2, "note": note}.items() <= next(
        e for e in events if e["kind"] == "policy"
    ).items()
    assert next(e for e in events if e["kind"] == "round_start")["steps"] == 3


def test_a_task_within_the_caps_is_untouched(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reply, reports = _run_handler(
        phantom_root, tmp_path, monkeypatch, _task(steps=2, batch=2), max_steps=3, max_batch=2
    )
    assert [r.steps for r in reports] == [2]
    assert policy_note(reply.content) == ""
    assert all(e["kind"] != "policy" for e in _events(tmp_path))


def test_the_seconds_cap_stops_a_long_task_and_the_reply_still_goes(
    phantom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # max_seconds counts from the task's arrival (loading the cases included); the last step ends before it
    started = time.monotonic()
    reply, reports = _run_handler(phantom_root, tmp_path, monkeypatch, _task(steps=100_000, batch=2), max_seconds=3)
    assert time.monotonic() - started < 3 + 0.5
    assert not reply.has_error()
    (report,) = reports
    assert report.time_limited and 1 <= report.steps < 100_000
    assert dict(reply.content[METRICS_KEY])["train-samples"] == 2 * report.steps
    assert policy_note(reply.content).startswith(f"stopped at step {report.steps} of 100000 after ")
    assert policy_note(reply.content).endswith("(max_seconds 3)")
    assert set(reply.content[ARRAYS_KEY].keys()) == set(arrays_from_model(build_model(TINY)).keys())


def test_policy_file_and_join_options_combine_options_winning(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text('max_steps = 50\nmax_batch = 2\ndevices = ["cpu"]\n')
    policy = site_policy(tmp_path, None, {"max_steps": 20, "max_seconds": None, "max_batch": None})
    assert policy == SitePolicy(max_steps=20, max_batch=2, devices=("cpu",))
    assert site_policy(tmp_path / "elsewhere", None, {}) == SitePolicy()
    policy.check_device("cpu")
    with pytest.raises(ConfigError, match=r"^--device cuda is not allowed by the site policy \(devices = \['cpu'\]\)$"):
        policy.check_device("cuda")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_steps = 0\n", "policy.toml: max_steps: Input should be greater than or equal to 1"),
        ("max_step = 5\n", "policy.toml: max_step: Extra inputs are not permitted"),
        ("max_seconds = \n", "policy.toml is not valid TOML"),
        ('devices = ["cpu"]\n', "--device auto is not allowed by the site policy (devices = ['cpu'])"),
    ],
)
def test_a_bad_policy_file_is_one_line_at_join(tmp_path: Path, text: str, message: str) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    result = runner.invoke(client_cli, ["join", "--site", "s1", "--data", str(tmp_path), "--device", "auto"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[0].startswith("error:"), result.output  # rich may wrap the one line
    assert message in result.output.replace("\n", " ")


def test_a_bad_join_cap_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(client_cli, ["join", "--site", "s1", "--data", str(tmp_path), "--max-seconds", "-1"])
    assert result.exit_code == 1
    assert "site policy: max_seconds: Input should be greater than 0" in result.output.replace("\n", " ")


def test_train_locally_without_a_limit_runs_the_whole_budget(phantom_root: Path, tmp_path: Path) -> None:
    from fedseg.client.site import load_training_cases

    site = SiteConfig(site="s", data=phantom_root / "site-1", workdir=tmp_path)
    site = site.model_copy(update={"labels": str(phantom_root / "site-1" / "labels.toml")})
    cases = load_training_cases(site, PreprocessConfig())
    torch.manual_seed(0)
    _, result = client_training.train_locally(
        arrays_from_model(build_model(TINY)), _task(steps=3, batch=2), cases, "cpu", seed=1
    )
    assert result.samples == 6 and result.policy == ()


def test_the_join_terminal_says_what_the_policy_changed(caplog: pytest.LogCaptureFixture) -> None:
    from fedseg.client.cli.live import SiteProgress

    view = SiteProgress("hospital-a", "h:1")
    view.interactive = False  # a log file: one line per event
    with caplog.at_level("INFO"):
        view.on_event({"kind": "policy", "round": 3, "note": "steps 250 -> 200 (max_steps)"})
    assert "site hospital-a: round 3: site policy applied: steps 250 -> 200 (max_steps)" in caplog.text
