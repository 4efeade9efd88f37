"""Weights on the wire in fp32 vs fp16 vs bf16: bytes per site per round and the Dice cost, on the demo recipe.

Runs the demo's federation in one process, without Flower's runtime, so the three transports see exactly the
same data, seeds and schedule: each round every phantom site loads the (encoded) global model, trains with
:func:`fedseg.client.training.train_locally` (which encodes its reply as the task says), the replies are decoded
to float32 and averaged weighted by cases (FedAvg), and the float32 global model is validated centrally.
Bytes are ``ArrayRecord.count_bytes()`` of what one site receives and sends in one round (Flower adds ~0.1%).

    python bench/transport.py      # 3 sites x 3 cases, 48^3, 6 rounds x 30 steps (the demo's 180 steps)
    python bench/transport.py --rounds 2 --steps 5    # a smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedseg.client.training import train_locally
from fedseg.common.cli.logs import setup_logging
from fedseg.common.cli.train import load_cases
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.engine.validation import MEAN_KEY, class_names_for, validate
from fedseg.common.fl.protocol import TrainTask, Transport, round_seed
from fedseg.common.fl.weights import arrays_from_model, decode_arrays, encode_arrays, load_arrays
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.synthetic.phantoms import generate_phantoms

TRANSPORTS: tuple[Transport, ...] = ("fp32", "fp16", "bf16")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-transport"), help="work folder")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cases-per-site", type=int, default=3)
    parser.add_argument("--val-cases", type=int, default=2)
    parser.add_argument("--size", type=int, default=48, help="phantom grid side (voxels at 2 mm)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30, help="local steps per round")
    parser.add_argument("--feature-scale", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def average(replies: list[tuple[ArrayRecord, int]]) -> dict[str, torch.Tensor]:
    """Case-weighted mean of float32 replies (FedAvg)."""
    total = sum(n for _, n in replies)
    mean: dict[str, torch.Tensor] = {}
    for arrays, n in replies:
        for key in arrays:
            value = torch.from_numpy(arrays[key].numpy()).double() * (n / total)
            mean[key] = mean[key] + value if key in mean else value
    return mean


def federate(
    transport: Transport, args: argparse.Namespace, sites: list[list[PreparedCase]], val: list[PreparedCase]
) -> tuple[float, int, int, float]:
    """Mean foreground Dice of the final global model, bytes down and up per site per round, seconds."""
    model_cfg = ModelConfig(feature_scale=args.feature_scale)
    train = TrainConfig(steps=args.steps, batch_size=2, patch_size=(32, 48, 48), lr=3e-3, amp=False)
    task = TrainTask(model=model_cfg, train=train, preprocess=PreprocessConfig(), deadline=3600, transport=transport)
    torch.manual_seed(args.seed)
    model = build_model(model_cfg)
    start = time.perf_counter()
    down = up = 0
    for rnd in range(1, args.rounds + 1):
        sent = encode_arrays(arrays_from_model(model), transport)
        down = sent.count_bytes()
        replies = []
        for index, cases in enumerate(sites, start=1):
            seed = round_seed(args.seed, rnd, f"site-{index}")
            reply, result = train_locally(sent, task, cases, "cpu", seed)
            up = reply.count_bytes()
            replies.append((decode_arrays(reply, transport), result.cases))
        mean = average(replies)
        load_arrays(model, ArrayRecord({k: v.float() for k, v in mean.items()}))
    seconds = time.perf_counter() - start
    dice = validate(model, val, (48, 48, 48), "cpu", class_names_for(model_cfg.n_classes))
    return dice[MEAN_KEY], down, up, seconds


def main() -> None:
    args = parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    root = args.out / f"phantoms-{args.sites}-{args.cases_per_site}-{args.size}"
    if not (root / "validation" / "dataset.json").is_file():
        generate_phantoms(root, args.sites, args.cases_per_site, args.val_cases, (args.size,) * 3, args.seed)
    cfg = PreprocessConfig()
    sites = [load_cases([root / f"site-{i}"], cfg, args.out / "cache", "--data") for i in range(1, args.sites + 1)]
    val = load_cases([root / "validation"], cfg, args.out / "cache", "--val")
    rows = {t: federate(t, args, sites, val) for t in TRANSPORTS}
    fp32_dice, fp32_down, fp32_up, _ = rows["fp32"]
    print(
        f"\ndemo recipe in one process: {args.sites} phantom sites x {args.cases_per_site} cases ({args.size}^3),"
        f" feature_scale {args.feature_scale}, {args.rounds} rounds x {args.steps} steps, seed {args.seed},"
        f" {torch.get_num_threads()} CPU threads\n"
    )
    print(
        "| transport | bytes down / site / round | bytes up / site / round | vs fp32 | mean fg Dice | Dice - fp32 |",
        end="",
    )
    print(" s |")
    print("|---|---|---|---|---|---|---|")
    for name, (dice, down, up, seconds) in rows.items():
        ratio = (down + up) / (fp32_down + fp32_up)
        print(f"| {name} | {down:,} | {up:,} | {ratio:.3f}x | {dice:.4f} | {dice - fp32_dice:+.4f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
