"""Federation benchmark on phantom sites: (a) Flower overhead per round, (b) federated vs centralised vs alone.

(a) **Overhead.** A real loopback federation (SuperLink + one ``fed-client join`` per site) with the paper-size
    Attention U-Net (feature_scale 4, 6.47 M parameters) and a token training budget. Per round: wall time minus
    the slowest site's local training time, and the bytes each site downloads and uploads (weights payload from
    the history; wire bytes from Flower's own counters).
(b) **Accuracy.** The same phantom sites trained three ways with the same small network and patch:

    * federated: ``--rounds`` R rounds × ``--local-steps`` E steps at every site (FedAvg by training cases);
    * centralised: one model on the pooled cases for the same total epochs, R × E steps (an "epoch" is a fixed
      number of steps, as in nnU-Net); ``--baseline-steps`` changes it, e.g. to sites × R × E for equal compute;
    * alone: each site on its own cases for the same R × E steps.

    Dice per organ on the neutral validation set (sliding window). Targets: federated mean ≥ 0.95 × centralised,
    and above every site alone.

    python bench/federation.py                                  # both parts, defaults below (~30 min on 2 cores)
    python bench/federation.py --skip-overhead --rounds 2 --local-steps 5    # a quick smoke run of part (b)

(c) **Round anatomy** (``--anatomy``, only this part): a small loopback federation (``--sites`` sites, a 1/16-width
    network, 2 rounds of ``--local-steps`` steps, central validation on) and, per round, where the wall time went
    along the slowest site's path (:mod:`fedseg.server.control.anatomy`): send, spawn, import, setup, load, train,
    reply, aggregate, validate, next. Read from the event files the run writes anyway.

    OMP_NUM_THREADS=1 nice -n 10 python bench/federation.py --anatomy --sites 2 --cases 2 --size 32 --local-steps 5

    The weights travel packed into one array per message (:mod:`fedseg.common.fl.packing`); ``--no-pack`` sends
    every tensor as its own array (the server's ``FEDSEG_PACK=0``). Each site forks its ClientApp processes warm
    (:mod:`fedseg.common.runtime.forkserver`); ``--cold-start`` starts each from scratch (``fed-client join
    --cold-start``). ``--compare`` runs the three steps one after the other, per-tensor + cold (before both
    changes), packed + cold, packed + warm, and prints them side by side: push + forward and start-up seconds, round
    wall and overhead, bytes per site per round and Flower objects per message. ``--feature-scale`` sets the
    network width (4 = the paper's model). ``--poll-seconds`` is the sites' ``fed-client join --poll-seconds``
    (the SuperNode's longest idle sleep, :mod:`fedseg.client.pollnode`); ``--compare-poll`` runs packed + warm at
    Flower's own 3 s, then at ``--poll-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedseg.client.pollnode import DEFAULT_POLL_SECONDS, FLOWER_POLL_SECONDS
from fedseg.common.cli.logs import setup_logging
from fedseg.common.data.manifest import GLOBAL_CLASSES, load_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sitecache import prepare_site
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.train import train_model
from fedseg.common.engine.validation import validate
from fedseg.common.fl.packing import pack_arrays
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model, count_parameters
from fedseg.common.runtime.events import EventTail
from fedseg.common.runtime.flwrctl import RunStatus
from fedseg.common.runtime.processes import Supervisor, free_port
from fedseg.server.config import ServerConfig
from fedseg.server.configfile import build_config
from fedseg.server.control.anatomy import anatomy_table, round_anatomy
from fedseg.server.control.demo import DemoOptions, ensure_phantoms, join_argv
from fedseg.server.control.launch import run_to_end, start_server
from fedseg.server.control.runs import new_spec
from fedseg.server.run.history import RoundRow
from fedseg.server.run.telemetry import EVENTS_FILE
from fedseg.server.run.transport import PACK_ENV

ORGANS = GLOBAL_CLASSES[1:]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-federation"), help="work folder")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases", type=int, default=3, help="phantom cases per site")
    parser.add_argument("--val-cases", type=int, default=3)
    parser.add_argument("--size", type=int, default=48, help="phantom grid side at 2 mm")
    parser.add_argument("--rounds", type=int, default=6, help="R: federated rounds (accuracy part)")
    parser.add_argument("--local-steps", type=int, default=30, help="E: local steps per round")
    parser.add_argument("--feature-scale", type=int, default=16, help="network width divisor (accuracy part)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--baseline-steps", type=int, default=None, help="centralised/alone steps (default R x E)")
    parser.add_argument("--overhead-rounds", type=int, default=3, help="rounds of the overhead (b) and anatomy (c)")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--anatomy", action="store_true", help="only the round anatomy (c)")
    parser.add_argument("--no-pack", action="store_true", help="(c): send every tensor as its own array")
    parser.add_argument("--cold-start", action="store_true", help="(c): sites start each ClientApp from scratch")
    parser.add_argument("--transport", choices=("fp32", "fp16", "bf16"), default="fp32", help="(c): weights' precision")
    parser.add_argument("--compare", action="store_true", help="(c): per-tensor+cold, packed+cold, packed+warm")
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=DEFAULT_POLL_SECONDS,
        help="(c): the sites' fed-client join --poll-seconds",
    )
    parser.add_argument(
        "--compare-poll",
        action="store_true",
        help=f"(c): packed+warm at Flower's {FLOWER_POLL_SECONDS:g} s, then --poll-seconds",
    )
    return parser.parse_args()


def train_settings(args: argparse.Namespace, steps: int) -> dict[str, Any]:
    return {"steps": steps, "batch_size": 2, "patch_size": [32, 48, 48], "lr": args.lr, "amp": False}


def federate(
    args: argparse.Namespace, name: str, settings: dict[str, Any], join_options: tuple[str, ...] = ()
) -> tuple[list[RoundRow], RunStatus]:
    """Run one loopback federation over the phantom sites; return its history rows and Flower's final status."""
    out = args.out / name
    if out.exists():
        shutil.rmtree(out)
    raw = {"min_sites": args.sites, "port": free_port(), "output_dir": str(out / "run"), **settings}
    cfg: ServerConfig = build_config(raw, args.out.resolve(), name)
    spec = new_spec(cfg)
    rows: list[RoundRow] = []
    threads = str(max(1, (os.cpu_count() or 1) // args.sites))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    with Supervisor() as sup:
        server = start_server(sup, cfg)
        sites = []
        for i in range(1, args.sites + 1):
            argv = join_argv(f"site-{i}", args.out / "data" / f"site-{i}", cfg.address, out / "sites" / f"site-{i}")
            argv += join_options
            sites.append(sup.start(f"site-{i}", argv, env=env, log_path=out / "logs" / f"site-{i}.log"))
        _, status = run_to_end(server, spec, rows.append, watch=sites)
    return rows, status


def overhead(args: argparse.Namespace) -> None:
    params = count_parameters(build_model(ModelConfig(feature_scale=4)))
    settings = {
        "rounds": args.overhead_rounds,
        "model": {"feature_scale": 4},
        "train": {"steps": 2, "batch_size": 2, "patch_size": [32, 32, 32], "lr": 1e-4, "amp": False},
    }
    rows, status = federate(args, "overhead", settings)
    print(f"\n(a) overhead: paper-size Attention U-Net, {params:,} parameters, {args.sites} sites, loopback, CPU")
    columns = ("round", "wall s", "slowest site s", "overhead s", "down MB/site", "up MB/site")
    widths = (5, 7, 15, 11, 13, 11)
    print(" ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    trained = [r for r in rows if r.round > 0]
    for row in trained:
        slowest = max(s.seconds for s in row.sites)
        down = row.bytes_out / max(1, len(row.sites)) / 1e6
        up = sum(s.bytes_in for s in row.sites) / max(1, len(row.sites)) / 1e6
        spent = row.seconds - slowest
        print(f"{row.round:>5} {row.seconds:>7.1f} {slowest:>15.1f} {spent:>11.1f} {down:>13.2f} {up:>11.2f}")
    mean_overhead = sum(r.seconds - max(s.seconds for s in r.sites) for r in trained) / len(trained)
    per = len(trained) * args.sites
    print(f"mean overhead per round: {mean_overhead:.1f} s")
    print(
        f"Flower wire counters for the run: {status.bytes_out / 1e6:.1f} MB out, {status.bytes_in / 1e6:.1f} MB in "
        f"= {status.bytes_out / per / 1e6:.2f} MB down and {status.bytes_in / per / 1e6:.2f} MB up per site-round"
    )


def flower_objects(feature_scale: int) -> tuple[int, int]:
    """Flower objects (records, arrays, chunks; one request each) in a message's weights: per-tensor, packed."""
    arrays = arrays_from_model(build_model(ModelConfig(feature_scale=feature_scale)))
    return len(get_all_nested_objects(arrays)), len(get_all_nested_objects(pack_arrays(arrays)))


@contextlib.contextmanager
def server_packing(packed: bool) -> Iterator[None]:
    """The ServerApp (it inherits this environment) packs, or sends per-tensor, inside the block."""
    before = os.environ.get(PACK_ENV)
    os.environ[PACK_ENV] = "1" if packed else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PACK_ENV]
        else:
            os.environ[PACK_ENV] = before


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


#: One anatomy federation's form: packed weights, warm ClientApps, the SuperNode's idle poll cap in seconds.
Form = tuple[bool, bool, float]


def _label(form: Form) -> str:
    packed, warm, poll = form
    return f"{'packed' if packed else 'per-tensor'} {'warm' if warm else 'cold'} poll {poll:g}"


def anatomy_run(args: argparse.Namespace, settings: dict[str, Any], form: Form) -> dict[str, float]:
    """One anatomy federation: print its table, return its summary (means over the trained rounds)."""
    packed, warm, poll = form
    name = "anatomy-" + _label(form).replace(" ", "-")
    started = time.perf_counter()
    join = ("--poll-seconds", str(poll)) if warm else ("--cold-start", "--poll-seconds", str(poll))
    with server_packing(packed):
        rows, _ = federate(args, name, settings, join)
    wall = time.perf_counter() - started
    out = args.out / name
    server = EventTail(out / "run" / EVENTS_FILE).read()
    sites = {
        f"site-{i}": EventTail(out / "sites" / f"site-{i}" / "events.jsonl").read() for i in range(1, args.sites + 1)
    }
    rounds = round_anatomy(server, sites)
    form_text = "packed (one array per message)" if packed else "per-tensor (one array per tensor)"
    start = "forked warm" if warm else "started from scratch"
    print(f"\n(c) round anatomy, weights {form_text}, ClientApps {start}, SuperNode idle poll {poll:g} s: "
          f"{args.sites} sites, loopback, "
          f"feature_scale {args.feature_scale}, "
          f"{args.local_steps} steps of {settings['train']['patch_size'][0]}^3 per round; seconds along the slowest "
          f"site's path (whole run {wall:.0f} s)")  # fmt: skip
    for line in anatomy_table(rounds):
        print(line)
    trained = [r for r in rows if r.round > 0 and r.sites]
    moved = [sum(r.phases()[k] or 0.0 for k in ("push", "forward")) for r in rounds]
    return {
        "send": _mean([r.phases()["send"] or 0.0 for r in rounds]),
        "push+forward": _mean(moved),
        "start-up": _mean([r.phases()["start-up"] or 0.0 for r in rounds]),
        "wall": _mean([r.wall for r in rounds]),
        "overhead": _mean([r.overhead for r in rounds]),
        "down": _mean([r.bytes_out / len(r.sites) for r in trained]),
        "up": _mean([s.bytes_in for r in trained for s in r.sites]),
        "run": wall,
    }


def anatomy(args: argparse.Namespace) -> None:
    side = min(args.size, 32)
    settings = {
        "rounds": args.overhead_rounds,
        "transport": args.transport,
        "model": {"feature_scale": args.feature_scale},
        "train": {"steps": args.local_steps, "batch_size": 2, "patch_size": [side] * 3, "lr": 1e-3, "amp": False},
        "validation": {
            "data": str(args.out / "data" / "validation"),
            "labels": str(args.out / "data" / "validation" / "labels.toml"),
            "patch_size": [side] * 3,
        },
    }
    poll = args.poll_seconds
    forms: list[Form] = [(not args.no_pack, not args.cold_start, poll)]
    if args.compare:
        forms = [(False, False, poll), (True, False, poll), (True, True, poll)]
    elif args.compare_poll:
        forms = [(True, True, FLOWER_POLL_SECONDS), (True, True, poll)]
    results = {form: anatomy_run(args, settings, form) for form in forms}
    objects = dict(zip((False, True), flower_objects(args.feature_scale), strict=True))
    print("\n(c) summary, means over the rounds (push + forward: slowest site; bytes: weights payload per site)")
    columns = (
        "weights, start, poll",
        "objects/msg",
        "send s",
        "start-up s",
        "push+forward s",
        "wall s",
        "overhead s",
        "down MB/site",
        "up MB/site",
        "run s",
    )
    widths = (26, 11, 6, 10, 14, 7, 10, 12, 10, 6)
    print(" ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for form, r in results.items():
        cells = (
            _label(form),
            objects[form[0]],
            f"{r['send']:.2f}",
            f"{r['start-up']:.2f}",
            f"{r['push+forward']:.2f}",
            f"{r['wall']:.2f}",
            f"{r['overhead']:.2f}",
            f"{r['down'] / 1e6:.4f}",
            f"{r['up'] / 1e6:.4f}",
            f"{r['run']:.0f}",
        )
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))


def load_site(root: Path, cache: Path) -> list[PreparedCase]:
    manifest = load_manifest(root / "labels.toml")
    return [c for c in prepare_site(root, manifest, PreprocessConfig(), cache) if c.label is not None]


def train_alone(args: argparse.Namespace, cases: list[PreparedCase], steps: int) -> tuple[dict[str, float], float]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(feature_scale=args.feature_scale))
    cfg = TrainConfig(**train_settings(args, steps))
    start = time.perf_counter()
    train_model(model, cases, cfg, "cpu", progress=False)
    val = load_site(args.out / "data" / "validation", args.out / "cache" / "validation")
    return validate(model, val, (48, 48, 48), "cpu"), time.perf_counter() - start


def accuracy(args: argparse.Namespace) -> None:
    settings = {
        "rounds": args.rounds,
        "model": {"feature_scale": args.feature_scale},
        "train": train_settings(args, args.local_steps),
        "validation": {
            "data": str(args.out / "data" / "validation"),
            "labels": str(args.out / "data" / "validation" / "labels.toml"),
            "patch_size": [48, 48, 48],
        },
    }
    started = time.perf_counter()
    rows, _ = federate(args, "accuracy", settings)
    results: list[tuple[str, dict[str, Any], float, int]] = []
    final = rows[-1]
    fed_dice = {k: (v if v is not None else float("nan")) for k, v in final.dice.items()}
    results.append((f"federated ({args.rounds}x{args.local_steps} steps/site)", fed_dice, time.perf_counter() - started,
                    args.rounds * args.local_steps))  # fmt: skip
    total = args.baseline_steps or args.rounds * args.local_steps
    sites = {f"site-{i}": load_site(args.out / "data" / f"site-{i}", args.out / "cache" / f"site-{i}")
             for i in range(1, args.sites + 1)}  # fmt: skip
    pooled = [c for cases in sites.values() for c in cases]
    dice, seconds = train_alone(args, pooled, total)
    results.append(("centralised (pooled)", dice, seconds, total))
    for name, cases in sites.items():
        dice, seconds = train_alone(args, cases, total)
        results.append((f"{name} alone", dice, seconds, total))
    print(f"\n(b) accuracy on {args.val_cases} validation phantoms ({args.size}^3 at 2 mm), feature_scale "
          f"{args.feature_scale}, {args.sites} sites x {args.cases} cases")  # fmt: skip
    header = f"{'setting':<36} {'steps':>6} " + " ".join(f"{o:>8}" for o in ORGANS) + f" {'mean':>6} {'s':>6}"
    print(header)
    for name, dice, seconds, steps in results:
        organs = " ".join(f"{dice.get(f'dice_{o}', float('nan')):>8.3f}" for o in ORGANS)
        print(f"{name:<36} {steps:>6} {organs} {dice['dice_mean']:>6.3f} {seconds:>6.0f}")
    fed, central = results[0][1]["dice_mean"], results[1][1]["dice_mean"]
    alone = [r[1]["dice_mean"] for r in results[2:]]
    print(f"federated / centralised = {fed / central:.3f} (target >= 0.95); "
          f"federated - best alone = {fed - max(alone):+.3f} (target > 0)")  # fmt: skip
    print("federated mean Dice by round: " + " ".join(f"{r.round}:{r.mean_dice:.3f}" for r in rows))


def main() -> None:
    args = parse_args()
    setup_logging(False)
    args.out = args.out.resolve()
    ensure_phantoms(
        DemoOptions(
            out=args.out,
            sites=args.sites,
            size=(args.size, args.size, args.size),
            cases_per_site=args.cases,
            val_cases=args.val_cases,
        )
    )
    if args.anatomy:
        anatomy(args)
        return
    if not args.skip_overhead:
        overhead(args)
    if not args.skip_accuracy:
        accuracy(args)


if __name__ == "__main__":
    main()
