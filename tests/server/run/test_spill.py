"""A round's replies are screened as they arrive and spilled: nothing holds them, and the aggregate is Flower's."""

from __future__ import annotations

import gc
import platform
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedseg.common.data.preprocess import PreprocessConfig
from fedseg.common.engine.config import TrainConfig
from fedseg.common.fl.offline import train_reply
from fedseg.common.fl.packing import pack_arrays
from fedseg.common.fl.protocol import ARRAYS_KEY, TrainTask, record_of, task_config
from fedseg.common.nn.model import ModelConfig
from fedseg.common.runtime.memory import release_freed_memory
from fedseg.server.config import ServerConfig, StrategyConfig, StrategyName
from fedseg.server.run import spill
from fedseg.server.run.loop import fresh_folder
from fedseg.server.run.replies import update_cosines
from fedseg.server.run.spill import Spill
from fedseg.server.run.strategy import RecordingStrategy, build_strategy
from tests.server.run.test_direction import CASES, GLOBAL, FakeGrid, honest

pytestmark = pytest.mark.usefixtures("task_identity")

REFERENCE = {"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.array([0.5], np.float32)}


def test_weighted_mean_and_clipped_load_by_hand(tmp_path: object) -> None:
    with Spill(REFERENCE, ["w", "b"]) as store:
        r0 = store.add({"w": np.array([2.0, 2.0, 3.0], np.float32), "b": np.array([0.5], np.float32)})
        r1 = store.add({"w": np.array([1.0, 6.0, 3.0], np.float32), "b": np.array([1.5], np.float32)})
        # cases 1 and 3: w = (1·[2,2,3] + 3·[1,6,3]) / 4 = [1.25, 5, 3]; b = (0.5 + 4.5) / 4 = 1.25
        mean = store.weighted_mean([r0, r1], [1, 3])
        np.testing.assert_allclose(mean["w"], [1.25, 5.0, 3.0], atol=1e-7)
        np.testing.assert_allclose(mean["b"], [1.25], atol=1e-7)
        assert mean["w"].dtype == np.float32
        # reply 1's update (0, 4, 0 | 1) scaled by 1/2: w = [1, 4, 3], b = 1.0; the mean with scales (1, 0.5)
        np.testing.assert_allclose(store.load(r1, 0.5)["w"], [1.0, 4.0, 3.0])
        clipped = store.weighted_mean([r0, r1], [1, 3], [1.0, 0.5])
        np.testing.assert_allclose(clipped["w"], [(2 + 3 * 1) / 4, (2 + 3 * 4) / 4, 3.0], atol=1e-7)
        # Gram of the updates (1,0,0 | 0) and (0,4,0 | 1): [[1, 0], [0, 17]]
        np.testing.assert_allclose(store.gram([r0, r1]), [[1.0, 0.0], [0.0, 17.0]])
        folder = store.folder
        assert sorted(p.name for p in folder.iterdir()) == ["0.f32", "1.f32"]
    assert not folder.exists()


def test_cosines_are_accumulated_slice_by_slice_without_changing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    reference = {"a": rng.normal(size=(30, 50)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    updates = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in reference.items()} for _ in range(4)]
    whole = update_cosines(updates, reference)
    monkeypatch.setattr(spill, "SLICE_VALUES", 64)
    monkeypatch.setattr(spill, "_MIN_SLICE", 16)  # 4 replies: "a" now spans 94 slices of 16
    assert update_cosines(updates, reference) == pytest.approx(whole, abs=1e-12)
    flat = [np.concatenate([(u[k].astype(np.float64) - reference[k]).ravel() for k in reference]) for u in updates]
    first = sorted((flat[0] @ f / np.linalg.norm(flat[0]) / np.linalg.norm(f) for f in flat[1:]), reverse=True)[1]
    assert whole[0] == pytest.approx(first, abs=1e-12)  # the 2nd largest of 3 pairwise cosines (n = 4)


def _start(name: StrategyName, nodes: list[int]) -> RecordingStrategy:
    cfg = ServerConfig(min_sites=2, strategy=StrategyConfig(name=name))
    strategy = RecordingStrategy(build_strategy(cfg), 2, 1, 1.0, limits=cfg.strategy)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid(nodes)))  # type: ignore[arg-type]
    return strategy


def test_no_reply_weights_are_held_while_the_next_reply_arrives() -> None:
    """Once screened, a reply's weights (packed, as sites send them) are let go: when reply k+1 is made, the
    weights of reply k are already gone, whatever the number of sites."""
    strategy = _start("fedavg", [1, 2, 3])
    task = task_config(TrainTask(model=ModelConfig(), train=TrainConfig(), preprocess=PreprocessConfig(), deadline=9))
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    strategy.configure_train(1, arrays, task, FakeGrid([1, 2, 3]))  # type: ignore[arg-type]
    held: list[weakref.ref[ArrayRecord]] = []

    def arriving() -> Iterator[Message]:
        for node in (1, 2, 3):
            gc.collect()
            assert all(ref() is None for ref in held), "the weights of an earlier reply are still held"
            reply = train_reply(node, honest(node), CASES[node], site=f"site-{node}")
            reply.content[ARRAYS_KEY] = pack_arrays(reply.content.array_records[ARRAYS_KEY])
            held.append(weakref.ref(reply.content.array_records[ARRAYS_KEY]))
            yield reply
            del reply

    aggregate, _ = strategy.aggregate_train(1, arriving())
    assert aggregate is not None and len(strategy.stats[1].sites) == 3


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "median"])
def test_the_streamed_aggregate_is_flowers_on_every_reply_at_once(name: StrategyName) -> None:
    """FedAvg and FedAdam get the streamed case-weighted mean, the median every reply; each equals the Flower
    strategy given all the replies directly."""
    nodes = [1, 2, 3]
    strategy = _start(name, nodes)
    ours, metrics = strategy.aggregate_train(1, (train_reply(n, honest(n), CASES[n], site=f"s{n}") for n in nodes))
    direct = build_strategy(ServerConfig(min_sites=2, strategy=StrategyConfig(name=name)))
    weights = {"conv.weight": GLOBAL["conv.weight"]}
    if isinstance(direct, FedAdam):
        direct.current_arrays = dict(weights)
    replies = [train_reply(n, {"conv.weight": honest(n)["conv.weight"]}, CASES[n]) for n in nodes]
    expected, expected_metrics = direct.aggregate_train(1, replies)
    assert ours is not None and expected is not None and metrics is not None and expected_metrics is not None
    np.testing.assert_allclose(ours["conv.weight"].numpy(), expected["conv.weight"].numpy(), rtol=0, atol=1e-6)
    assert metrics["train-loss"] == pytest.approx(expected_metrics["train-loss"])
    assert isinstance(strategy.inner, FedAvg)


def test_each_round_spills_under_the_run_folder_and_leaves_nothing(tmp_path: Path) -> None:
    folder = fresh_folder(tmp_path / "spill")
    (tmp_path / "spill" / "stale").mkdir()  # what a stopped run left
    assert not any(fresh_folder(tmp_path / "spill").iterdir())
    strategy = _start("fedavg", [1, 2, 3])
    strategy.spill_dir = folder
    seen: list[list[str]] = []
    real_add = Spill.add

    def add(self: Spill, arrays: dict[str, np.ndarray]) -> int:
        seen.append([p.name for p in folder.iterdir()])
        return real_add(self, arrays)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Spill, "add", add)
        strategy.aggregate_train(1, (train_reply(n, honest(n), CASES[n], site=f"s{n}") for n in (1, 2, 3)))
    assert len(seen) == 3 and all(len(names) == 1 for names in seen)  # one temporary folder for the round
    assert list(folder.iterdir()) == []


def test_reading_weights_without_flowers_typed_view_lets_them_go() -> None:
    """Flower's ``content.array_records`` view keeps the weights in a reference cycle; record_of does not."""
    gc.collect()
    gc.disable()
    try:
        for name, read in (
            ("flower view", lambda m: m.content.array_records[ARRAYS_KEY]),
            ("record_of", lambda m: record_of(m.content, ARRAYS_KEY, ArrayRecord)),
        ):
            reply = train_reply(1, honest(1), 2, site="s")
            ref = weakref.ref(read(reply))
            reply.content[ARRAYS_KEY] = ArrayRecord()
            del reply
            assert (ref() is not None) == (name == "flower view"), name
            gc.collect()
            assert ref() is None
    finally:
        gc.enable()


def test_freed_memory_is_handed_back_on_glibc() -> None:
    assert release_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
