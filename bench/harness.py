"""What every bench shares: the common options, the result tables, where they were measured, and the output.

A bench adds the common options to its parser, measures, builds :class:`Table` rows and hands them to :func:`emit`::

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, quick="2 rounds of 3 steps")
    args = parser.parse_args()
    ...
    emit(args, "cpu_bf16", [Table("fp32 vs bf16", ["mode", "s/step"], rows)], runs)

The options: ``--quick`` (the bench's small configuration), ``--seeds 0,1,2``, ``--json FILE`` (provenance and the
raw runs), ``--markdown`` (the tables as markdown instead of aligned text) and ``--write`` (also write the markdown,
with the date, machine and exact command, to ``bench/results/NAME.md``, the file the Benchmarks page includes).

The tables are the bench's product and go to stdout through :func:`out`; progress goes to stderr (:func:`progress`).
The load average is read when this module is imported (a bench's start) and again when :func:`provenance` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
ENV_SHOWN = ("OMP_NUM_THREADS", "FEDSEG_PACK", "CUDA_VISIBLE_DEVICES")  # variables that change what a bench measures

Cell = str | int | float | None


@dataclass(frozen=True)
class Start:
    """When the bench started and the 1-minute load average then."""

    when: datetime
    load: float


STARTED = Start(datetime.now(UTC), os.getloadavg()[0])


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` (the ``--seeds`` type)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds needs at least one seed, got {text!r}")
    return seeds


def add_options(parser: argparse.ArgumentParser, *, quick: str, seeds: str | None = "0") -> None:
    """Add ``--quick`` (described by ``quick``), ``--seeds`` (unless ``seeds`` is None), ``--json``, ``--markdown``
    and ``--write`` to a bench's parser."""
    group = parser.add_argument_group("common bench options")
    group.add_argument("--quick", action="store_true", help=f"a small configuration: {quick}")
    if seeds is not None:
        group.add_argument(
            "--seeds", type=parse_seeds, default=parse_seeds(seeds), help=f"comma-separated seeds (default {seeds})"
        )
    group.add_argument("--json", type=Path, metavar="FILE", help="also write the provenance and raw runs here")
    group.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    group.add_argument(
        "--write", action="store_true", help="also write the markdown tables, with provenance, to bench/results/NAME.md"
    )


def _cell(value: Cell) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return value


def _numeric(value: Cell) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Table:
    """One result table: cells are strings (printed as they are), ints (``1,234``), floats (``0.123``) or None.

    A column whose filled cells are all numbers is right-aligned; ``align`` (one ``l`` or ``r`` per column)
    overrides that, e.g. for pre-formatted numbers.
    """

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    notes: Sequence[str] = field(default=())
    align: str = ""

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: a row has {len(row)} cells for {len(self.columns)} columns")
        if self.align and (len(self.align) != len(self.columns) or set(self.align) - {"l", "r"}):
            raise ValueError(f"table {self.title!r}: align needs one l or r per column, got {self.align!r}")

    def _right(self) -> list[bool]:
        if self.align:
            return [a == "r" for a in self.align]
        right = []
        for i in range(len(self.columns)):
            filled = [row[i] for row in self.rows if row[i] is not None]
            right.append(bool(filled) and all(_numeric(v) for v in filled))
        return right

    def markdown(self) -> str:
        """The title as a paragraph, the table, then each note as a paragraph."""
        cells = [[_cell(v).replace("|", "\\|") for v in row] for row in self.rows]
        lines = [self.title, ""] if self.title else []
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---:" if r else "---" for r in self._right()) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        for note in self.notes:
            lines += ["", note]
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        """The title, the table as aligned plain text, then the notes."""
        cells = [[_cell(v) for v in row] for row in self.rows]
        widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(self.columns)]
        right = self._right()

        def line(values: Sequence[str]) -> str:
            parts = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True))
            return "  ".join(parts).rstrip()

        lines = [self.title, ""] if self.title else []
        lines += [line(self.columns), line(["-" * w for w in widths])]
        lines += [line(row) for row in cells]
        lines += ["", *self.notes] if self.notes else []
        return "\n".join(lines) + "\n"


def out(text: str) -> None:
    """Write a bench's product (its tables) to stdout: the one place benches print."""
    sys.stdout.write(text)
    sys.stdout.flush()


def progress(text: str) -> None:
    """Write a progress line to stderr (kept apart from the tables on stdout)."""
    print(text, file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _gpu() -> str | None:
    if "torch" not in sys.modules:  # a bench that never loaded torch ran on no GPU
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def command(argv: Sequence[str] | None = None) -> str:
    """The command as run: ``[VAR=...] [nice -n N] python bench/NAME.py ARGS`` (the script relative to the repo)."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.is_absolute() and script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    words = [f"{name}={os.environ[name]}" for name in ENV_SHOWN if name in os.environ]
    niceness = os.nice(0)
    words += ["nice", "-n", str(niceness)] if niceness > 0 else []
    return " ".join([*words, shlex.join(["python", str(script), *argv[1:]])])


def provenance(argv: Sequence[str] | None = None, started: Start = STARTED) -> dict[str, Any]:
    """Date (UTC), machine (CPU, cores, RAM, GPU, load average at start and now), versions and the exact command."""
    ram = _ram_gib()
    return {
        "date": started.when.isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "ram_gib": None if ram is None else round(ram, 1),
            "gpu": _gpu(),
            "load_start": round(started.load, 2),
            "load_end": round(os.getloadavg()[0], 2),
        },
        "versions": {"python": platform.python_version(), "torch": _version("torch"), "fedseg": _version("fedseg")},
        "command": command(argv),
    }


def provenance_line(prov: Mapping[str, Any]) -> str:
    """``Measured YYYY-MM-DD on <machine>, load a→b: `command` `` plus the versions, for the top of a results file."""
    machine = prov["machine"]
    parts = [machine["cpu"], f"{machine['logical_cores']} logical cores"]
    parts += [f"{machine['ram_gib']:.0f} GiB RAM"] if machine["ram_gib"] is not None else []
    parts += [machine["gpu"]] if machine["gpu"] else []
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v)
    load = f"load {machine['load_start']:.2f}→{machine['load_end']:.2f}"
    return f"Measured {prov['date'][:10]} on {', '.join(parts)}, {load} ({versions}):\n`{prov['command']}`\n"


def results_markdown(prov: Mapping[str, Any], tables: Sequence[Table]) -> str:
    """What ``--write`` puts in ``bench/results/NAME.md``: the provenance line, then each table."""
    return "\n".join([provenance_line(prov), *(t.markdown() for t in tables)])


def emit(
    args: argparse.Namespace,
    name: str,
    tables: Sequence[Table],
    runs: Sequence[Mapping[str, Any]] = (),
    *,
    results: Path = RESULTS,
) -> dict[str, Any]:
    """Print the tables (markdown with ``--markdown``), write ``--json`` and, with ``--write``, ``results/NAME.md``.

    Returns the provenance it recorded.
    """
    prov = provenance()
    render = Table.markdown if args.markdown else Table.text
    out("\n".join(render(t) for t in tables))
    if args.json:
        payload = {"provenance": prov, "runs": list(runs)}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.write:
        results.mkdir(parents=True, exist_ok=True)
        (results / f"{name}.md").write_text(results_markdown(prov, tables))
    return prov
