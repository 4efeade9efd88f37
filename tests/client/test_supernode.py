"""`fed-client join`: data check before joining, SuperNode command line, restart loop, CLI errors."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedseg.client import supernode as join_module
from fedseg.client.cli.main import app
from fedseg.client.site import NODE_CONFIG_FILE, SiteConfig, resolve_labels
from fedseg.client.supernode import (
    REFUSALS_AFTER_ACTIVATION,
    JoinOptions,
    SupernodeRefused,
    check_and_prepare,
    exit_reason,
    gate_argv,
    next_backoff,
    run_supernode,
    supernode_argv,
)
from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.errors import DataError

runner = CliRunner()


def _site(data: Path, workdir: Path) -> SiteConfig:
    return SiteConfig(site="s1", data=data, labels=str(data / "labels.toml"), workdir=workdir)


def test_supernode_argv_plain_and_with_tls_and_auth(tmp_path: Path) -> None:
    argv = supernode_argv(JoinOptions(server="10.0.0.5:9092", port=9999), tmp_path / "n.toml")
    assert argv[:3] == [sys.executable, "-m", "fedseg.client.pollnode"]
    assert argv[3:] == ["--superlink", "10.0.0.5:9092", "--host", "127.0.0.1", "--port", "9999", "--node-config",
                        str(tmp_path / "n.toml"), "--isolation", "process", "--insecure"]  # fmt: skip
    secure = JoinOptions(server="h:1", port=1, root_certificates=tmp_path / "ca.crt", auth_key=tmp_path / "k")
    argv = supernode_argv(secure, tmp_path / "n.toml")
    assert "--insecure" not in argv
    assert argv[-4:] == ["--root-certificates", str(tmp_path / "ca.crt"), "--auth-supernode-private-key",
                         str(tmp_path / "k")]  # fmt: skip


@pytest.mark.parametrize(
    ("previous", "ran_for", "expected"), [(0.5, 1.0, 1.0), (1.0, 5.0, 2.0), (16.0, 5.0, 30.0), (30.0, 120.0, 1.0)]
)
def test_backoff_doubles_to_a_cap_and_resets_after_healthy_running(
    previous: float, ran_for: float, expected: float
) -> None:
    assert next_backoff(previous, ran_for) == expected


def test_check_and_prepare_fills_the_cache(phantom_root: Path, tmp_path: Path) -> None:
    site, report, cases = check_and_prepare(_site(phantom_root / "site-1", tmp_path), PreprocessConfig())
    assert site.data == phantom_root / "site-1"
    assert len(report.usable) == 2 and not report.skipped
    assert len(cases) == 2 and len(list(site.cache_dir.glob("*.npz"))) == 2


def test_skipped_cases_are_left_out_through_a_view(phantom_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_root / "site-1", data)
    broken = sorted((data / "labelsTr").iterdir())[1]
    broken.write_bytes(b"not a nifti")
    site, report, cases = check_and_prepare(_site(data, tmp_path / "work"), PreprocessConfig())
    assert [case_id for case_id, _ in report.skipped] == ["site1_001"]
    assert site.data == tmp_path / "work" / "usable"
    assert [c.case_id for c in cases] == ["site1_000"]
    assert (site.data / "images" / "site1_000.nii.gz").resolve() == (data / "imagesTr" / "site1_000.nii.gz").resolve()


def test_labels_default_to_the_manifest_beside_the_data(phantom_root: Path, tmp_path: Path) -> None:
    assert resolve_labels(phantom_root / "site-1", None) == str((phantom_root / "site-1" / "labels.toml").resolve())
    assert resolve_labels(tmp_path, None) is None
    assert resolve_labels(tmp_path, "phantom") == "phantom"


def test_view_keeps_the_manifest_of_the_original_folder(phantom_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_root / "site-1", data)
    sorted((data / "labelsTr").iterdir())[0].write_bytes(b"broken")
    site = SiteConfig(site="s1", data=data, workdir=tmp_path / "work")  # labels.toml found beside the data
    site, _, _ = check_and_prepare(site, PreprocessConfig())
    assert site.labels == str((data / "labels.toml").resolve())
    assert site.manifest().site == "site-1"


def test_site_without_usable_case_is_refused(phantom_root: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_root / "site-1", data)
    for label in (data / "labelsTr").iterdir():
        label.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"site s1: .*data has no usable case \(first problem: .*\); fix the data"):
        check_and_prepare(_site(data, tmp_path / "work"), PreprocessConfig())


def test_supernode_is_restarted_until_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake-supernode"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('fake', sys.argv[1:])\nsys.exit(3)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(join_module, "supernode_command", lambda: [str(fake)])
    waits: list[float] = []
    site = SiteConfig(site="s1", data=tmp_path, workdir=tmp_path / "work")
    restarts = run_supernode(site, JoinOptions(server="127.0.0.1:1", port=2, max_restarts=2), sleep=waits.append)
    assert restarts == 2
    assert waits == [1.0, 2.0]
    assert (tmp_path / "work" / NODE_CONFIG_FILE).read_text().startswith('site = "s1"')
    assert (tmp_path / "work" / "logs" / "supernode.log").read_text().count("fake") == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server", "localhost"], "--server must look like HOST:PORT (e.g. 10.0.0.5:9092), got 'localhost'"),
        (["--server", "h:99999"], "--server must look like HOST:PORT"),
        (["--server", "http://h:9092"], "--server takes HOST:PORT without a scheme or path"),
        (["--trust-app", "abc"], "--trust-app 'abc' is not a FAB hash"),
        (
            ["--server", "10.1.2.3:9092"],
            "--server 10.1.2.3:9092 is not on this machine and --root-certificates is missing",
        ),
        (["--server", "fed.example.org:9092"], "pass the federation's CA certificate for HTTPS (or --insecure"),
        (["--root-certificates", "/nonexistent/ca.crt"], "--root-certificates /nonexistent/ca.crt does not exist"),
        (["--device", "gpu"], "device: Value error, must be cpu, cuda, cuda:N or auto, got 'gpu'"),
        pytest.param(
            ["--device", "cuda"],
            "--device = cuda but CUDA is not available here; use cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA"),
        ),
    ],
)
def test_join_cli_rejects_bad_options_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["join", "--site", "s1", "--data", str(tmp_path), *args])
    assert result.exit_code == 1
    assert message in result.output.replace("\n", " ")


@pytest.mark.parametrize("value", ["10", "0.01"])
def test_join_cli_refuses_a_poll_interval_out_of_range(tmp_path: Path, value: str) -> None:
    result = runner.invoke(app, ["join", "--site", "s1", "--data", str(tmp_path), "--poll-seconds", value])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # Typer's error box, wrapped at any width
    assert f"Invalid value for '--poll-seconds': {float(value)} is not in the range 0.05<=x<=3.0" in text


def test_join_cli_rejects_a_missing_data_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["join", "--site", "s1", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert "--data" in result.output and "is not a folder" in result.output


def _zombie_children() -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and a child subreaper")
def test_restarts_leave_no_zombies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # each fake SuperNode leaves a helper behind that outlives it by a second, as Flower's helpers do
    fake = tmp_path / "fake-supernode"
    done = tmp_path / "done"
    helper = f"import time; time.sleep(1.0); open({str(done)!r}, 'a').write('x')"
    spawn = f"subprocess.Popen([sys.executable, '-c', {helper!r}])"
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\n{spawn}\nsys.exit(3)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(join_module, "supernode_command", lambda: [str(fake)])
    site = SiteConfig(site="s1", data=tmp_path, workdir=tmp_path / "work")
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # wait until this restart's helper has exited (an orphan of ours now)
        pauses.append(seconds)
        while not done.is_file() or len(done.read_text()) < len(pauses):
            time.sleep(0.05)

    run_supernode(site, JoinOptions(server="127.0.0.1:1", port=2, max_restarts=2), sleep=pause)
    assert len(pauses) == 2
    assert _zombie_children() == []


def test_the_gate_preloads_the_clientapp_and_dynamo_unless_cold() -> None:
    warm = gate_argv(JoinOptions(server="127.0.0.1:9092", port=5000))
    preloaded = [warm[i + 1] for i, arg in enumerate(warm) if arg == "--preload"]
    assert preloaded == ["fedseg.client.app", "torch._dynamo"]
    assert "--preload" not in gate_argv(JoinOptions(server="127.0.0.1:9092", port=5000, warm=False))


@pytest.mark.parametrize("server", ["10.1.2.3:9092 --insecure", "[::1]:9092", "localhost:9092"])
def test_join_cli_allows_plain_http_to_loopback_or_on_purpose(tmp_path: Path, server: str) -> None:
    address, *flags = server.split()
    result = runner.invoke(app, ["join", "--site", "s1", "--data", str(tmp_path / "nope"), "--server", address, *flags])
    assert result.exit_code == 1
    assert "is not a folder" in result.output  # the next check: the transport one let it through


#: Flower 1.42's report for a SuperNode whose key the SuperLink does not list (from a real run, colours included).
UNLISTED_KEY_REPORT = (
    "\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n"
    "\x1b[91mERROR \x1b[0m:     Exit Code: 305\n"
    "Failed to initialize the connection to the SuperLink.\n"
    "[code: 2004] Failed to activate SuperNode.\n"
    "The SuperNode could not establish a connection to the SuperLink.\n"
    "\n"
    "For more information, visit: <https://flower.ai/docs/framework/1.42/en/ref-exit-codes/305.html>\n"
)
ACTIVATED_LINE = "\x1b[92mINFO \x1b[0m:      SuperNode ID: 4744119659584677191\n"


def _fake_supernode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *outputs: str) -> Path:
    """A SuperNode stand-in whose n-th start prints ``outputs[n]`` (the last one again after that), then exits 1."""
    fake, count = tmp_path / "fake-supernode", tmp_path / "starts"
    script = (
        f"import pathlib, sys\nc = pathlib.Path({str(count)!r})\nn = len(c.read_text()) if c.exists() else 0\n"
        f"c.write_text('x' * (n + 1))\nout = {list(outputs)!r}\nsys.stdout.write(out[min(n, len(out) - 1)])\n"
        "sys.exit(1)\n"
    )
    fake.write_text(f"#!{sys.executable}\n{script}")
    fake.chmod(0o755)
    monkeypatch.setattr(join_module, "supernode_command", lambda: [str(fake)])
    return count


def test_flower_exit_report_is_read_as_one_line() -> None:
    assert exit_reason(UNLISTED_KEY_REPORT) == (
        "Flower exit code 305: Failed to initialize the connection to the SuperLink. [code: 2004] Failed to "
        "activate SuperNode. The SuperNode could not establish a connection to the SuperLink."
    )
    assert exit_reason(ACTIVATED_LINE + "INFO: SuperNode terminated gracefully.\n") is None


def test_a_refused_supernode_is_not_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = _fake_supernode(tmp_path, monkeypatch, UNLISTED_KEY_REPORT)
    site = SiteConfig(site="s1", data=tmp_path, workdir=tmp_path / "work")
    waits: list[float] = []
    with pytest.raises(SupernodeRefused) as refused:
        run_supernode(site, JoinOptions(server="127.0.0.1:1", port=2, max_restarts=3), sleep=waits.append)
    assert starts.read_text() == "x" and waits == []  # the attack fired once, and no restart followed
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("site s1: the server at 127.0.0.1:1 refused this SuperNode (Flower exit code 305: ")
    assert "[code: 2004] Failed to activate SuperNode." in message
    assert "fed-server sites add" in message and str(tmp_path / "work" / "logs" / "supernode.log") in message


def test_a_site_once_activated_rides_out_a_few_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # connected, then the SuperLink restarts and lists the key a moment later: refused twice, then connected again
    outputs = [ACTIVATED_LINE, UNLISTED_KEY_REPORT, UNLISTED_KEY_REPORT, ACTIVATED_LINE]
    starts = _fake_supernode(tmp_path, monkeypatch, *outputs)
    site = SiteConfig(site="s1", data=tmp_path, workdir=tmp_path / "work")
    assert run_supernode(site, JoinOptions(server="127.0.0.1:1", port=2, max_restarts=3), sleep=lambda _: None) == 3
    assert starts.read_text() == "xxxx"


def test_a_revoked_site_stops_after_refusals_in_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    starts = _fake_supernode(tmp_path, monkeypatch, ACTIVATED_LINE, UNLISTED_KEY_REPORT)
    site = SiteConfig(site="s1", data=tmp_path, workdir=tmp_path / "work")
    with pytest.raises(SupernodeRefused, match="Failed to activate SuperNode"):
        run_supernode(site, JoinOptions(server="127.0.0.1:1", port=2), sleep=lambda _: None)
    assert len(starts.read_text()) == 1 + REFUSALS_AFTER_ACTIVATION
