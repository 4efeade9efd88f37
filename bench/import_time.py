"""Question: how long does importing the modules every process loads take, and which packages cost the most?

A ClientApp process pays this once per message. Runs ``python -X importtime -c "import MODULE"`` in fresh
interpreters, alternating the modules so that load on the machine affects them alike, and prints the median total
and the biggest third-party contributors.

    python bench/import_time.py                      # fedseg.client.app, fedseg.server.app, fedseg.common.fl.protocol
    python bench/import_time.py --repeat 7 fedseg.client.app
    python bench/import_time.py --quick --markdown --write   # 3 interpreters per module
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from harness import Table, add_options, emit

DEFAULT_MODULES = ("fedseg.client.app", "fedseg.server.app", "fedseg.common.fl.protocol")
WATCHED = ("torch", "monai", "matplotlib.pyplot", "flwr", "typer", "scipy", "SimpleITK")


def import_times(module: str) -> dict[str, float]:
    """Cumulative import seconds of ``module`` and of the watched packages it loads (one fresh interpreter)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    ).stderr
    times: dict[str, float] = {}
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split("|"))
        if cumulative.isdigit() and name in (module, *WATCHED):
            times[name] = max(times.get(name, 0.0), int(cumulative) / 1e6)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(DEFAULT_MODULES))
    parser.add_argument("--repeat", type=int, help="fresh interpreters per module, median reported (default 5)")
    add_options(parser, quick="3 fresh interpreters per module", seeds=None)
    args = parser.parse_args()
    repeat = args.repeat or (3 if args.quick else 5)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in args.modules}
    for _ in range(repeat):
        for module in args.modules:
            runs[module].append(import_times(module))
    rows: list[list[str | None]] = []
    for module, samples in runs.items():
        cells: list[str | None] = [module, f"{statistics.median(s.get(module, 0.0) for s in samples):.2f}"]
        for watched in WATCHED:
            values = [s[watched] for s in samples if watched in s]
            cells.append(f"{statistics.median(values):.2f}" if len(values) == len(samples) else "-")
        rows.append(cells)
    title = f"Import seconds, medians of {repeat} fresh interpreters per module (cumulative, `-X importtime`)"
    table = Table(
        title, ["module", "total s", *(f"{w} s" for w in WATCHED)], rows, align="l" + "r" * (1 + len(WATCHED))
    )
    emit(args, "import_time", [table], [{"module": m, "samples": s} for m, s in runs.items()])


if __name__ == "__main__":
    main()
