"""The bench harness: common options, table rendering, provenance and what ``emit`` writes."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


harness = _load("harness")

TABLE = harness.Table(
    "fp32 vs bf16",
    ["mode", "s/step", "steps", "note"],
    [["fp32", 0.51234, 1200, None], ["bf16 | autocast", 0.25, 30, "a"]],
    notes=["medians of 3 rounds"],
)


def parse(*argv: str, quick: str = "tiny", seeds: str | None = "0") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    harness.add_options(parser, quick=quick, seeds=seeds)
    return parser.parse_args(argv)


def test_common_options_and_their_defaults() -> None:
    args = parse()
    assert (args.quick, args.seeds, args.json, args.markdown, args.write) == (False, [0], None, False, False)
    args = parse("--quick", "--seeds", "0,1,2", "--json", "r.json", "--markdown", "--write")
    assert (args.quick, args.seeds, args.json, args.markdown, args.write) == (
        True,
        [0, 1, 2],
        Path("r.json"),
        True,
        True,
    )
    assert not hasattr(parse(seeds=None), "seeds")


@pytest.mark.parametrize("text", ["", "a", "0,x", ","])
def test_bad_seeds_are_refused(text: str) -> None:
    with pytest.raises(SystemExit):
        parse("--seeds", text)


def test_quick_help_describes_the_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help", quick="2 rounds x 3 steps")
    assert "a small configuration: 2 rounds x 3 steps" in capsys.readouterr().out


def test_markdown() -> None:
    assert TABLE.markdown() == (
        "fp32 vs bf16\n"
        "\n"
        "| mode | s/step | steps | note |\n"
        "|---|---:|---:|---|\n"
        "| fp32 | 0.512 | 1,200 |  |\n"
        "| bf16 \\| autocast | 0.250 | 30 | a |\n"
        "\n"
        "medians of 3 rounds\n"
    )


def test_text_is_aligned() -> None:
    assert TABLE.text() == (
        "fp32 vs bf16\n"
        "\n"
        "mode             s/step  steps  note\n"
        "---------------  ------  -----  ----\n"
        "fp32              0.512  1,200\n"
        "bf16 | autocast   0.250     30  a\n"
        "\n"
        "medians of 3 rounds\n"
    )


def test_align_overrides_and_rows_must_fit() -> None:
    table = harness.Table("", ["a", "b"], [["1.0x", "x"]], align="rl")
    assert table.markdown() == "| a | b |\n|---:|---|\n| 1.0x | x |\n"
    with pytest.raises(ValueError, match="2 columns"):
        harness.Table("t", ["a", "b"], [["only one"]])
    with pytest.raises(ValueError, match="one l or r"):
        harness.Table("t", ["a", "b"], [["1", "2"]], align="lx")


def test_command_is_relative_to_the_repo_and_shows_niceness_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in harness.ENV_SHOWN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(harness.os, "nice", lambda _: 0)
    argv = [str(BENCH / "cpu_bf16.py"), "--patch", "32,32,32", "--title", "a b"]
    assert harness.command(argv) == "python bench/cpu_bf16.py --patch 32,32,32 --title 'a b'"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(harness.os, "nice", lambda _: 10)
    assert harness.command(["bench/x.py"]) == "OMP_NUM_THREADS=1 nice -n 10 python bench/x.py"


def test_provenance_and_its_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (2.5, 0.0, 0.0))
    start = harness.Start(datetime(2026, 12, 7, 20, 15, 3, tzinfo=UTC), 1.25)
    prov = harness.provenance(["bench/x.py", "--quick"], start)
    assert prov["date"] == "2026-12-07T20:15:03+00:00"
    assert prov["command"].endswith("python bench/x.py --quick")
    assert (prov["machine"]["load_start"], prov["machine"]["load_end"]) == (1.25, 2.5)
    assert prov["machine"]["logical_cores"] >= 1 and prov["versions"]["python"]
    prov["machine"] |= {"cpu": "Some CPU", "logical_cores": 2, "ram_gib": 7.7, "gpu": None}
    prov["versions"] = {"python": "3.11.7", "torch": "2.5.1", "fedseg": None}
    prov["command"] = "python bench/x.py --quick"
    assert harness.provenance_line(prov) == (
        "Measured 2026-12-07 on Some CPU, 2 logical cores, 8 GiB RAM, load 1.25→2.50 (python 3.11.7, torch 2.5.1):\n"
        "`python bench/x.py --quick`\n"
    )


def test_emit_prints_writes_json_and_the_results_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [str(BENCH / "x.py"), "--markdown", "--write"])
    args = parse("--markdown", "--write", "--json", str(tmp_path / "r.json"))
    prov = harness.emit(args, "x", [TABLE], [{"seed": 0, "path": Path("a")}], results=tmp_path / "results")
    assert capsys.readouterr().out == TABLE.markdown()
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload == {"provenance": prov, "runs": [{"seed": 0, "path": "a"}]}
    written = (tmp_path / "results" / "x.md").read_text()
    assert written == harness.provenance_line(prov) + "\n" + TABLE.markdown()
    assert written.startswith("Measured ") and "`" in written.splitlines()[1]


def test_emit_without_options_prints_text_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.emit(parse(), "x", [TABLE, TABLE], results=tmp_path / "results")
    assert capsys.readouterr().out == TABLE.text() + "\n" + TABLE.text()
    assert not (tmp_path / "results").exists()


def test_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    harness.progress("round 1/3")
    assert capsys.readouterr() == ("", "round 1/3\n")
