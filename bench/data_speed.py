"""Question: how fast is the data pipeline (phantom generation, preprocessing cold vs cached, patch sampling with
and without augmentation), and how often does a patch contain pancreas with and without foreground oversampling?

It reports how often a patch contains pancreas with and without foreground oversampling.

    python bench/data_speed.py                       # 64³ phantoms, 32³ patches
    python bench/data_speed.py --size 96,128,128 --patch 48,64,64 --threads 2
    python bench/data_speed.py --quick --markdown --write   # 2 sites x 2 phantoms 48^3, 20 batches
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from harness import Table, add_options, emit

from fedseg.common.data.manifest import load_manifest
from fedseg.common.data.preprocess import PreparedCase, PreprocessConfig
from fedseg.common.data.sampling import PatchSampler
from fedseg.common.data.sitecache import prepare_site
from fedseg.common.synthetic.phantoms import generate_phantoms


def triple(text: str) -> tuple[int, int, int]:
    a, b, c = (int(v) for v in text.split(","))
    return a, b, c


def prepare_all(out: Path, cache: Path) -> tuple[list[PreparedCase], float]:
    start = time.perf_counter()
    cases: list[PreparedCase] = []
    for site in sorted(p for p in out.iterdir() if p.name.startswith("site-")):
        cases += prepare_site(site, load_manifest(site / "labels.toml"), PreprocessConfig(), cache)
    return cases, time.perf_counter() - start


def sample(
    cases: list[PreparedCase], patch: tuple[int, int, int], fg: float, augment: bool, n: int
) -> tuple[float, float]:
    """Patches per second and the fraction of patches containing pancreas (label 1)."""
    sampler = PatchSampler(cases, patch, batch_size=2, foreground_prob=fg, augment=augment, seed=0)
    next(iter(sampler))  # warm-up (MONAI grid cache)
    start, patches, pancreas = time.perf_counter(), 0, 0
    for batch in sampler.batches(n):
        patches += batch.image.shape[0]
        pancreas += int((batch.label == 1).flatten(1).any(1).sum())
    return patches / (time.perf_counter() - start), pancreas / patches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=triple, help="phantom size D,H,W (default 64,64,64, --quick 48,48,48)")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--cases", type=int, help="cases per site (default 4, --quick 2)")
    parser.add_argument("--patch", type=triple, default=(32, 32, 32))
    parser.add_argument("--batches", type=int, help="batches of 2 per sampling measurement (default 50, --quick 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (MONAI resampling)")
    add_options(parser, quick="2 sites x 2 phantoms 48^3, 20 batches per sampling measurement", seeds=None)
    args = parser.parse_args()
    for name, full, quick in (("size", (64, 64, 64), (48, 48, 48)), ("cases", 4, 2), ("batches", 50, 20)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    n_cases = args.sites * args.cases
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = Path(tmp) / "phantoms", Path(tmp) / "cache"
        start = time.perf_counter()
        generate_phantoms(out, args.sites, args.cases, 0, args.size, seed=0)
        rows.append(("phantom generation, s/case", f"{(time.perf_counter() - start) / n_cases:.3f}"))
        cases, cold = prepare_all(out, cache)
        _, warm = prepare_all(out, cache)
        rows.append(("preprocess cold, s/case", f"{cold / n_cases:.3f}"))
        rows.append(("preprocess warm (cache), s/case", f"{warm / n_cases:.4f}"))
        rows.append(("prepared shapes (z,y,x)", " ".join(sorted({"x".join(map(str, c.image.shape)) for c in cases}))))
        for fg in (0.0, 0.33):
            for augment in (False, True):
                speed, fraction = sample(cases, args.patch, fg, augment, args.batches)
                name = f"fg {fg:.2f}, augment {'on ' if augment else 'off'}"
                rows.append((f"{name}: patches/s", f"{speed:.1f}"))
                rows.append((f"{name}: patches with pancreas", f"{fraction:.2f}"))
    title = (
        f"data pipeline: {args.sites} sites x {args.cases} phantoms {'x'.join(map(str, args.size))}, "
        f"patch {'x'.join(map(str, args.patch))}, {args.threads} torch thread(s)"
    )
    table = Table(title, ["measure", "value"], [list(row) for row in rows], align="lr")
    emit(args, "data_speed", [table], [{"measure": name, "value": value} for name, value in rows])


if __name__ == "__main__":
    main()
