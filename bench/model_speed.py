"""Question: are fedseg's networks as fast and as lean as the paper's official ones and MONAI's, per forward pass
and per training step (fp32, channels_last_3d, bf16 auto)?

Rows (all at the same input, seeded identically):
  * ``official AttUNet`` / ``official UNet``: the paper's own classes (``unet_CT_multi_att_dsv_3D``,
    ``unet_CT_dsv_3D``) imported from a checkout given with ``--official DIR`` (a clone of
    ozan-oktay/Attention-Gated-Networks; nothing of it is copied into fedseg). Without it these rows are skipped
    with a note.
  * ``AttentionUNet3D`` / ``UNet3D`` in fp32, ``AttentionUNet3D cl`` with ``channels_last_3d``, and ``AttentionUNet3D
    auto`` as fedseg trains by default: channels_last_3d plus bf16 autocast where the device runs bf16 natively
    (CUDA; on the CPU where torch reports AVX-512 BF16 or AMX, i.e. ``cpu_bf16 = "auto"``), plain fp32 elsewhere.
  * ``MONAI AttentionUnet`` with paper-like channels, fp32.

Measures, at the same input for all three networks:
  * forward: eval mode, ``torch.no_grad()``;
  * train step: train mode, forward + cross-entropy + backward + ``Adam.step()`` (lr 1e-4, wd 1e-6).
Runs are interleaved (model A, B, C, A, B, C, ...) after ``--warmup`` untimed rounds, and the table shows the
median of ``--repeats`` timed rounds with ratios against the first row (the official Attention U-Net when given).

Peak memory:
  * CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the run (the caching allocator's live
    tensors, not reserved blocks).
  * CPU: resident-set-size increase over extra, untimed runs (median of ``--memory-repeats``), sampled every
    0.5 ms from ``/proc/self/statm`` by a background thread, after ``malloc_trim(0)`` has returned freed heap
    memory to the OS (glibc). So it is the run's peak live memory (tensors, im2col buffers of the CPU 3-D
    convolution, oneDNN scratch) plus allocator slack; it is noisy at small inputs.
The ``cpu s`` column is process CPU time (all threads), steadier than wall time on a shared machine.

Usage:
    python bench/model_speed.py                         # CPU, 1x1x64x64x64, 5 repeats
    python bench/model_speed.py --input 96,96,64 --repeats 9 --threads 2
    python bench/model_speed.py --device cuda --input 160,160,96 --batch-size 2 --official /path/to/checkout
    python bench/model_speed.py --quick --markdown --write   # 32^3, feature scale 8, 2 repeats, 1 memory round
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Table, add_options, emit
from monai.networks.nets.attentionunet import AttentionUnet
from torch import Tensor, nn

from fedseg.common.engine.device import use_cpu_bf16
from fedseg.common.nn.model import AttentionUNet3D, UNet3D, check_spatial_size, count_parameters

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so an RSS measurement starts from live memory only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Context manager: peak resident-set-size increase while the block runs (CPU)."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.peak_delta = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        self._base = self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._peak = max(self._peak, _rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak_delta = self._peak - self._base


@dataclass
class Runner:
    """One network variant with its optimiser and the samples collected for it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    channels_last: bool = False
    bf16: bool = False
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])


@dataclass(frozen=True)
class Variant:
    """A row: how to build the network and how to run it."""

    name: str
    build: Callable[[], nn.Module]
    channels_last: bool = False
    bf16: bool = False


def official_classes(checkout: Path) -> tuple[type[nn.Module], type[nn.Module]]:
    """The paper's Attention U-Net (2 gates per scale + deep supervision) and U-Net classes from a checkout."""
    if not (checkout / "models" / "networks" / "unet_CT_multi_att_dsv_3D.py").is_file():
        raise SystemExit(f"--official {checkout}: not a checkout of ozan-oktay/Attention-Gated-Networks")
    sys.path.insert(0, str(checkout))
    att = importlib.import_module("models.networks.unet_CT_multi_att_dsv_3D").unet_CT_multi_att_dsv_3D
    unet = importlib.import_module("models.networks.unet_CT_dsv_3D").unet_CT_dsv_3D
    return att, unet


def variants(args: argparse.Namespace, device: torch.device) -> list[Variant]:
    """The rows of one run, in table order."""
    n, fs = args.classes, args.feature_scale
    auto_bf16 = device.type == "cuda" or use_cpu_bf16("auto")
    rows: list[Variant] = []
    if args.official is not None:
        att, unet = official_classes(args.official)
        common = {"n_classes": n, "is_batchnorm": True, "in_channels": 1, "feature_scale": fs, "is_deconv": False}
        rows += [
            Variant(
                "official AttUNet", lambda: att(**common, nonlocal_mode="concatenation", attention_dsample=(2, 2, 2))
            ),
            Variant("official UNet", lambda: unet(**common)),
        ]
    else:
        print("note: no --official checkout given; the official rows are skipped", file=sys.stderr)
    channels = tuple(c // fs for c in (64, 128, 256, 512, 1024))
    rows += [
        Variant("AttentionUNet3D", lambda: AttentionUNet3D(1, n, fs)),
        Variant("AttentionUNet3D cl", lambda: AttentionUNet3D(1, n, fs), channels_last=args.channels_last),
        Variant(
            f"AttentionUNet3D auto ({'bf16' if auto_bf16 else 'fp32'})",
            lambda: AttentionUNet3D(1, n, fs),
            channels_last=args.channels_last,
            bf16=auto_bf16,
        ),
        Variant("UNet3D", lambda: UNet3D(1, n, fs)),
        Variant(
            "MONAI AttentionUnet",
            lambda: AttentionUnet(spatial_dims=3, in_channels=1, out_channels=n, channels=channels, strides=(2,) * 4),
        ),
    ]
    return rows


def _time(device: torch.device, fn: Callable[[], None]) -> tuple[float, float]:
    """Run ``fn`` once; return wall seconds and process CPU seconds (all threads)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _peak_memory(device: torch.device, fn: Callable[[], None]) -> int:
    """Run ``fn`` once; return its peak memory increase in bytes (CUDA allocator, or sampled RSS on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _malloc_trim()
    with PeakRss() as rss:
        fn()
    return rss.peak_delta


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _forward(runner: Runner, x: Tensor, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        runner.model.eval()
        with torch.no_grad(), _autocast(device, runner.bf16):
            runner.model(x)

    return run


def _train_step(runner: Runner, x: Tensor, target: Tensor, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        runner.model.train()
        runner.optimizer.zero_grad(set_to_none=True)
        with _autocast(device, runner.bf16):
            loss = F.cross_entropy(runner.model(x), target)
        loss.backward()  # type: ignore[no-untyped-call]
        runner.optimizer.step()

    return run


def _to_device(model: nn.Module, x: Tensor, device: torch.device, channels_last: bool) -> tuple[nn.Module, Tensor]:
    model = model.to(device)
    if not channels_last:
        return model, x
    try:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            model.eval()(x_cl)
        return model, x_cl
    except RuntimeError as err:
        print(f"note: channels_last_3d rejected ({err}); using contiguous")
        return model.to(memory_format=torch.contiguous_format), x  # type: ignore[call-overload]


def _steps(
    runner: Runner, x: Tensor, target: Tensor, device: torch.device
) -> tuple[tuple[str, Callable[[], None]], ...]:
    return ("fwd", _forward(runner, x, device)), ("train", _train_step(runner, x, target, device))


def run_benchmark(args: argparse.Namespace) -> list[Runner]:
    """Build the networks, warm up, then time interleaved forward and train-step rounds."""
    device = torch.device(args.device)
    size = tuple(int(v) for v in args.input.split(","))
    x = torch.randn(args.batch_size, 1, *size, device=device)
    target = torch.randint(0, args.classes, (args.batch_size, *size), device=device)
    runners, inputs = [], {}
    for variant in variants(args, device):
        torch.manual_seed(0)
        model, inputs[variant.name] = _to_device(variant.build(), x, device, variant.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-6)
        runners.append(Runner(variant.name, model, optimizer, variant.channels_last, variant.bf16))
    for round_ in range(args.warmup + args.repeats):
        for runner in runners:
            for key, fn in _steps(runner, inputs[runner.name], target, device):
                wall, cpu = _time(device, fn)
                if round_ >= args.warmup:
                    runner.add(f"{key}_s", wall)
                    runner.add(f"{key}_cpu", cpu)
    # Memory is measured in separate runs: trimming the heap and sampling RSS would distort the timings.
    for _ in range(args.memory_repeats):
        for runner in runners:
            for key, fn in _steps(runner, inputs[runner.name], target, device):
                runner.add(f"{key}_mem", float(_peak_memory(device, fn)))
    return runners


def table(runners: list[Runner], title: str) -> Table:
    """Medians, with wall-time ratios against the first row."""
    base = runners[0]
    columns = ["model", "params", "fwd s", "fwd cpu s", "fwd ×first", "fwd peak MiB"]
    columns += ["train s", "train cpu s", "train ×first", "train peak MiB"]
    rows = [
        [
            r.name,
            f"{count_parameters(r.model):,}",
            f"{r.median('fwd_s'):.3f}",
            f"{r.median('fwd_cpu'):.3f}",
            f"{r.median('fwd_s') / base.median('fwd_s'):.2f}",
            f"{r.median('fwd_mem') / 2**20:.0f}",
            f"{r.median('train_s'):.3f}",
            f"{r.median('train_cpu'):.3f}",
            f"{r.median('train_s') / base.median('train_s'):.2f}",
            f"{r.median('train_mem') / 2**20:.0f}",
        ]
        for r in runners
    ]
    return Table(title, columns, rows, align="l" + "r" * 9)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="spatial size D,H,W, multiples of 16 (default 64,64,64, --quick 32,32,32)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--feature-scale", type=int, help="network width divisor (default 4, --quick 8)")
    parser.add_argument("--repeats", type=int, help="timed interleaved rounds, median reported (default 5, --quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--memory-repeats", type=int, help="extra untimed rounds for peak memory, median (default 3, --quick 1)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--official", type=Path, help="checkout of ozan-oktay/Attention-Gated-Networks (official rows)")
    add_options(parser, quick="input 32^3, feature scale 8, 2 timed rounds, 1 memory round", seeds=None)
    args = parser.parse_args()
    defaults = {"input": ("64,64,64", "32,32,32"), "feature_scale": (4, 8), "repeats": (5, 2), "memory_repeats": (3, 1)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        check_spatial_size(tuple(int(v) for v in args.input.split(",")))
    except ValueError as err:
        parser.error(f"--input {args.input!r}: {err}")
    return args


def main() -> None:
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    title = (
        f"input {args.batch_size}x1x{args.input.replace(',', 'x')}, {args.classes} classes, feature scale "
        f"{args.feature_scale}, device {device_name}, threads {torch.get_num_threads()}, "
        f"{args.warmup} warm-up + {args.repeats} interleaved timed rounds + {args.memory_repeats} memory rounds "
        f"(medians), torch {torch.__version__}"
    )
    runners = run_benchmark(args)
    runs = [{"model": r.name, "parameters": count_parameters(r.model), "samples": r.samples} for r in runners]
    emit(args, "model_speed", [table(runners, title)], runs)


if __name__ == "__main__":
    main()
