"""The ServerApp's memory while one round of N site replies is received, checked and aggregated.

Each row runs, in a fresh process, one training round of the real ServerApp path (``TelemetryGrid`` pulling
replies, ``RecordingStrategy`` decoding, validating, bounding norms, checking directions and aggregating with
Flower's strategy) for the paper-size Attention U-Net (feature scale 4, 6.5 M parameters, 26 MB in float32).
The SuperLink is replaced by an in-process grid that makes each site's reply when it is pulled (the global weights
plus a small site-specific step, packed the way a site sends them), so every reply is waiting when the round
ends, the worst case for memory. The peak is the process's high-water mark (``VmHWM``, reset after set-up) above
its resident memory after set-up, in MB and in multiples of one model in float32.

    OMP_NUM_THREADS=1 python bench/server_memory.py --sites 10,50,100
    python bench/server_memory.py --sites 10,50 --strategy median     # a rule that needs every reply at once

Linux only (``/proc/self/status`` and ``/proc/self/clear_refs``). The SuperLink's own memory (replies waiting to
be pulled) is not part of this: in a deployment it is another process.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from fedseg.common.fl.offline import SERVER_NODE, metadata, train_reply
from fedseg.common.fl.packing import DIGEST_BYTES, PACKED_KEY, pack_arrays, wire_layout
from fedseg.common.fl.protocol import ARRAYS_KEY, TrainTask, task_config
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.common.runtime.events import EventWriter
from fedseg.server.config import ServerConfig, StrategyConfig
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from fedseg.server.run.telemetry import ServerTelemetry, TelemetryGrid


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="10,50,100", help="comma-separated site counts")
    parser.add_argument("--strategy", default="fedavg", help="[strategy] name (fedavg, fedadam, median, ...)")
    parser.add_argument("--feature-scale", type=int, default=4, help="4 = the paper's network")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: measure one site count
    return parser.parse_args()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class WaitingReplies:
    """A stand-in for Flower's grid whose every site has replied: a reply is made when it is pulled, as one packed
    array (the way sites send it: its making costs about two models here, which the peak includes)."""

    def __init__(self, reference: dict[str, np.ndarray], sites: int) -> None:
        self.nodes = list(range(1, sites + 1))
        self.ids: dict[str, int] = {}
        self.packed = pack_arrays(ArrayRecord({k: Array(v) for k, v in reference.items()}))[PACKED_KEY].numpy()
        layout = wire_layout(reference, "fp32")
        sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, shape, dtype in layout]
        starts = DIGEST_BYTES + np.concatenate([[0], np.cumsum(sizes)])
        self.floats = [(int(a), int(b)) for (key, _, dtype), a, b in zip(layout, starts, starts[1:], strict=False)
                       if dtype.kind == "f" and not key.endswith("running_var")]  # fmt: skip

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = [f"m{m.metadata.dst_node_id}" for m in messages]
        self.ids.update({i: int(i[1:]) for i in ids})
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._reply(self.ids.pop(i)) for i in list(message_ids) if i in self.ids]

    def _reply(self, node: int) -> Message:
        shared, own = np.random.default_rng(0), np.random.default_rng(node)  # a common direction + the site's own
        buffer = self.packed.copy()
        for start, stop in self.floats:
            values = buffer[start:stop].view(np.float32)
            values += 1e-3 * (
                shared.standard_normal(values.size, np.float32) + own.standard_normal(values.size, np.float32)
            )
        content = train_reply(node, {}, cases=4, site=f"site-{node}").content
        content[ARRAYS_KEY] = ArrayRecord({PACKED_KEY: Array(buffer)})
        return Message(content, metadata=metadata(node, SERVER_NODE, reply_to=f"m{node}"))  # type: ignore[call-overload]


def measure(sites: int, strategy_name: str, feature_scale: int) -> dict[str, float]:
    """Peak memory above set-up and seconds of one round with ``sites`` replies (runs in this process)."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        setattr(TaskIdentity, name, value)
    model_cfg = ModelConfig(feature_scale=feature_scale)
    arrays = arrays_from_model(build_model(model_cfg))
    reference = {k: a.numpy() for k, a in arrays.items()}
    model_mb = sum(v.nbytes for v in reference.values()) / 1e6
    cfg = ServerConfig(min_sites=sites, strategy=StrategyConfig(name=strategy_name))
    strategy = RecordingStrategy(build_strategy(cfg), sites, 1, 10.0, limits=cfg.strategy)
    events = EventWriter(Path(f"/tmp/fedseg-server-memory-{sites}.jsonl"))
    grid = TelemetryGrid(WaitingReplies(reference, sites), ServerTelemetry(events), sites, sleep=lambda _: None)
    task = task_config(TrainTask(model=model_cfg, train=cfg.train, preprocess=cfg.preprocess, deadline=60, packed=True))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = _status_kb("VmRSS")
    started = time.perf_counter()
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, task, grid), timeout=60)  # type: ignore[arg-type]
    new, _ = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - started
    peak = _status_kb("VmHWM")
    accepted = len(strategy.stats[1].sites)
    return {"model_mb": model_mb, "peak_mb": (peak - baseline) / 1e3, "seconds": seconds, "accepted": accepted,
            "ok": float(new is not None)}  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.strategy, args.feature_scale)))
        return
    print(f"one round, strategy {args.strategy}, feature scale {args.feature_scale}, every reply waiting")
    print(f"{'sites':>6} {'accepted':>9} {'peak above set-up MB':>21} {'x model':>8} {'seconds':>8}")
    for sites in [int(s) for s in args.sites.split(",")]:
        argv = [sys.executable, __file__, "--one", str(sites), "--strategy", args.strategy,
                "--feature-scale", str(args.feature_scale)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{sites:>6} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{sites:>6} {row['accepted']:>9.0f} {row['peak_mb']:>21.0f} {row['peak_mb'] / row['model_mb']:>8.1f} "
              f"{row['seconds']:>8.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
