"""`fed-client audit`: the ledger as a table with totals, exit 0 on an honest ledger, 1 naming the first bad line,
2 with one line when there is nothing to audit."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.client.cli.main import app
from fedseg.client.ledger import Sent, append, ledger_path

runner = CliRunner()
RUN = 8123456789012345678  # Flower's run ids are this long
START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Three DP train replies and a cross-site reply in one run, then a refusal in another."""
    site = tmp_path / "site"
    ledger = ledger_path(site)
    replies = [("train", 1, 25_951_577, 1.0), ("train", 2, 25_951_577, 1.75), ("train", 3, 25_951_577, 2.5)]
    replies += [("evaluate", 3, 1_519, None)]
    for n, (kind, server_round, size, epsilon) in enumerate(replies):
        sent = Sent(run=RUN, round=server_round, kind=kind, bytes=size, sha256=f"{n:064x}", epsilon=epsilon, delta=1e-5)
        append(ledger, sent, now=START + timedelta(minutes=n))
    append(ledger, Sent(run=12, round=None, kind="failure", bytes=88, sha256="f" * 64), now=START + timedelta(hours=1))
    return site


def _run(*args: str, columns: int = 200) -> tuple[int, str, str]:
    result = runner.invoke(app, ["audit", *args], env={"COLUMNS": str(columns)})
    return result.exit_code, result.stdout, result.stderr


def test_an_honest_ledger_is_listed_with_totals_and_verifies(workdir: Path) -> None:
    code, out, err = _run("--workdir", str(workdir))
    assert code == 0, err
    assert "2025-03-01 09:02" in out and "evaluate" in out and "failure" in out
    assert "77,856,250" in out  # the first run's bytes: 3 x 25,951,577 + 1,519
    assert f"{RUN}" in out and "2.5 (δ 1e-05)" in out  # the run's last ε, from its last train reply
    assert "77,856,338" in out  # all five messages: 77,856,250 + 88
    assert out.splitlines()[-2] == "chain verified: 5 entries"
    assert out.splitlines()[-1].startswith("head ") and err == ""


def test_plain_output_fits_80_columns_and_cuts_no_value(workdir: Path) -> None:
    code, out, _ = _run("--workdir", str(workdir), columns=80)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out and str(RUN) in out


def _bytes_of_line_2(lines: list[str]) -> list[str]:
    return [lines[0], lines[1].replace('"bytes":25951577', '"bytes":2595157'), *lines[2:]]


def _epsilon_of_line_3(lines: list[str]) -> list[str]:
    return [*lines[:2], lines[2].replace('"epsilon":2.5', '"epsilon":0.5'), *lines[3:]]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_bytes_of_line_2, "line 2: edited: its content does not match its hash"),
        (_epsilon_of_line_3, "line 3: edited: its content does not match its hash"),
        (lambda lines: lines[:-1], "line 5: removed: the ledger ends at seq 4, its head records seq 5"),
    ],
)
def test_an_edited_or_shortened_ledger_exits_1_naming_the_line(
    workdir: Path, edit: Callable[[list[str]], list[str]], message: str
) -> None:
    ledger = ledger_path(workdir)
    before = ledger.read_text()
    ledger.write_text("".join(edit(before.splitlines(keepends=True))))
    assert ledger.read_text() != before  # the tamper happened
    code, out, err = _run("--workdir", str(workdir))
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"error: {ledger}: {message}"), err
    assert "chain verified" not in out and "Egress ledger" in out


def test_json_output_carries_the_entries_totals_and_the_fault(workdir: Path) -> None:
    ledger = ledger_path(workdir)
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join([lines[0], lines[2], lines[1], *lines[3:]]))  # two entries swapped
    code, out, _ = _run("--workdir", str(workdir), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["verified"] is False
    assert report["fault"] == {"line": 2, "why": "reordered: it follows line 3, not line 1"}
    assert [e["seq"] for e in report["entries"]] == [1, 3, 2, 4, 5]
    assert report["runs"][0] == {"run": RUN, "messages": 4, "bytes": 77_856_250, "epsilon": 2.5, "delta": 1e-5}
    assert report["messages"] == 5 and report["head"] == report["entries"][-1]["hash"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda root: root / "nowhere",
            "--workdir {path} is not a folder; pass the site's workdir (fed-client join --workdir)",
        ),
        (lambda root: root, "{path} holds no egress ledger (egress.jsonl): no reply was sent from this workdir"),
    ],
)
def test_nothing_to_audit_is_one_line_and_exit_2(tmp_path: Path, make: Callable[[Path], Path], message: str) -> None:
    path = make(tmp_path)
    code, out, err = _run("--workdir", str(path))
    assert code == 2 and out == ""
    assert err == f"error: {message.format(path=path)}\n"
