"""Many sites on Flower's simulation runtime: wall time and peak memory of ``fed-server simulate`` per site count.

Each row is one ``fed-server simulate --sites N`` (a 1/16-width network, 32³ phantoms, 2 cases per site) in a
fresh process; the peak RSS is the largest sum over that process and all its descendants (Ray's daemons and
workers), sampled from /proc every half second (Linux only).

    OMP_NUM_THREADS=1 nice -n 10 python bench/scale.py --sites 2,10,20 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedseg.server.run.history import read_history


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"), help="work folder")
    parser.add_argument("--sites", default="2,10,20", help="comma-separated site counts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="local steps per round")
    parser.add_argument("--cpus-per-site", type=float, default=1.0)
    return parser.parse_args()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(stat[1]), []).append(int(entry))
    return tree


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants now."""
    tree, total, todo = _children(), 0, [pid]
    while todo:
        current = todo.pop()
        todo += tree.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def round_seconds(out: Path) -> list[float]:
    """Seconds of each trained round from the run's history (the first includes Ray's and the actors' start)."""
    return [row.seconds for row in read_history(out / "run") if row.round > 0]


def run_one(args: argparse.Namespace, sites: int) -> tuple[float, int, int]:
    """Wall seconds, peak tree RSS and exit code of one simulation with ``sites`` sites."""
    out = args.out / f"sites-{sites}"
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-c", "from fedseg.server.cli.main import main; main()", "simulate",
            "--sites", str(sites), "--rounds", str(args.rounds), "--out", str(out),
            "--cpus-per-site", str(args.cpus_per_site), f"train.steps={args.steps}",
            "train.patch_size=[32,32,32]", "validation.patch_size=[32,32,32]"]  # fmt: skip
    log = (args.out / f"sites-{sites}.log").open("w")
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(0.5)
    return time.perf_counter() - started, peak, child.returncode


def main() -> None:
    args = parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    counts = [int(s) for s in args.sites.split(",")]
    print(f"fed-server simulate: {args.rounds} rounds x {args.steps} steps, feature_scale 16, 32^3 phantoms, "
          f"{args.cpus_per_site} CPU per site, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'sites':>6} {'wall s':>8} {'round 1 s':>10} {'last round s':>13} {'peak RSS GB':>12} {'exit':>5}")
    for sites in counts:
        seconds, peak, code = run_one(args, sites)
        rounds = round_seconds(args.out / f"sites-{sites}") or [float("nan")]
        print(f"{sites:>6} {seconds:>8.0f} {rounds[0]:>10.1f} {rounds[-1]:>13.1f} {peak / 1e9:>12.2f} {code:>5}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
