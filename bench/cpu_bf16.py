"""Question: is a CPU training step faster in bf16 autocast (``TrainConfig.cpu_bf16``) than in fp32 on this machine?

On CPUs with AVX-512 BF16 or AMX, oneDNN runs bf16 3-D convolutions natively and a training step gets faster;
without them bf16 is emulated and slower. Rounds alternate between the two modes so that machine noise hits both.

    python bench/cpu_bf16.py                       # feature_scale 8, patch 48^3, batch 2, 2 threads
    python bench/cpu_bf16.py --feature-scale 4 --patch 64,64,64
    python bench/cpu_bf16.py --quick --markdown --write   # feature_scale 16, patch 32^3, 2 rounds of 3 steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness import Table, add_options, emit

from fedseg.common.engine.device import autocast_for
from fedseg.common.nn.loss import DiceLoss
from fedseg.common.nn.model import ModelConfig, build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("attention-unet", "unet"), default="attention-unet")
    parser.add_argument("--feature-scale", type=int, help="network width divisor (default 8, --quick 16)")
    parser.add_argument("--patch", type=str, help="D,H,W, multiples of 16 (default 48,48,48, --quick 32,32,32)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="alternating rounds per mode (default 3, --quick 2)")
    parser.add_argument("--steps", type=int, help="timed steps per round after 2 warm-up steps (default 5, --quick 3)")
    add_options(parser, quick="feature_scale 16, patch 32^3, 2 rounds of 3 steps", seeds=None)
    args = parser.parse_args()
    for name, full, quick in (("feature_scale", 8, 16), ("patch", "48,48,48", "32,32,32"), ("rounds", 3, 2),
                              ("steps", 5, 3)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate({"arch": args.arch, "feature_scale": args.feature_scale}))
    model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    patch = tuple(int(v) for v in args.patch.split(","))
    image = torch.randn(args.batch_size, 1, *patch).contiguous(memory_format=torch.channels_last_3d)
    target = torch.randint(0, 5, (args.batch_size, *patch))
    loss_fn = DiceLoss(ce_weight=1.0)
    cpu = torch.device("cpu")

    def step(bf16: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(cpu, True, cpu_bf16=bf16):
            logits = model(image)
        loss_fn(logits.float(), target).backward()
        optimizer.step()

    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for bf16 in (False, True):
            for _ in range(2):
                step(bf16)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(bf16)
            seconds[bf16].append((time.perf_counter() - start) / args.steps)
    fp32 = statistics.median(seconds[False])
    rows: list[list[str | int | float | None]] = []
    for bf16, name in ((False, "fp32"), (True, "bf16 autocast")):
        median = statistics.median(seconds[bf16])
        rows.append([name, f"{median:.3f}", f"{fp32 / median:.2f}"])
    title = (
        f"{args.arch}, feature_scale {args.feature_scale}, patch {args.patch}, batch {args.batch_size}, "
        f"{args.threads} CPU threads, medians of {args.rounds} alternating rounds of {args.steps} steps"
    )
    table = Table(title, ["mode", "s/step", "speed-up vs fp32"], rows, align="lrr")
    runs = [{"mode": "bf16" if bf16 else "fp32", "seconds_per_step": s} for bf16, s in seconds.items()]
    emit(args, "cpu_bf16", [table], runs)


if __name__ == "__main__":
    main()
