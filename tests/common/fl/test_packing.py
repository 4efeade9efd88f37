"""Packing a message's weights into one array: exact round trips in every transport, sizes and mismatches refused."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import nn

from fedseg.common.errors import IncompatibleModelError
from fedseg.common.fl.packing import (
    DIGEST_BYTES,
    PACKED_KEY,
    array_view,
    is_packed,
    pack_arrays,
    unpack_arrays,
    unpack_views,
    unpacked,
    wire_layout,
)
from fedseg.common.fl.protocol import Transport
from fedseg.common.fl.weights import decode_arrays, encode_arrays

# 1.5, -2 and 0.25 are exact in fp16 and bf16, so every transport round-trips them exactly.
WEIGHT = np.array([[1.5, -2.0, 0.25], [0.0, 3.0, -0.5]], np.float32)
REFERENCE = OrderedDict([("conv.weight", WEIGHT), ("bn.num_batches_tracked", np.array(7, np.int64))])


def _record(state: OrderedDict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in state.items()))


def _buffer(record: ArrayRecord) -> np.ndarray:
    return record[PACKED_KEY].numpy()


@pytest.mark.parametrize(("transport", "float_bytes"), [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_round_trip_is_exact_and_the_buffer_is_digest_plus_raw_bytes(transport: Transport, float_bytes: int) -> None:
    wire = encode_arrays(_record(REFERENCE), transport)
    packed = pack_arrays(wire)
    assert list(packed.keys()) == [PACKED_KEY] and is_packed(packed) and not is_packed(wire)
    buffer = _buffer(packed)
    assert buffer.dtype == np.uint8 and buffer.size == DIGEST_BYTES + 6 * float_bytes + 8  # 6 weights, one int64
    assert buffer[DIGEST_BYTES:-8].tobytes() == wire["conv.weight"].numpy().tobytes()
    assert buffer[-8:].tobytes() == (7).to_bytes(8, "little")
    back = unpack_arrays(packed, wire_layout(REFERENCE, transport))
    assert list(back.keys()) == list(REFERENCE)
    for key in REFERENCE:
        np.testing.assert_array_equal(back[key].numpy(), wire[key].numpy())
        assert back[key].numpy().dtype == wire[key].numpy().dtype
    decoded = decode_arrays(back, transport)
    np.testing.assert_array_equal(decoded["conv.weight"].numpy(), WEIGHT)
    assert decoded["bn.num_batches_tracked"].numpy().dtype == np.int64  # the integer buffer travels as itself
    assert int(decoded["bn.num_batches_tracked"].numpy()) == 7


def test_a_torch_state_dict_and_its_numpy_copy_give_the_same_layout() -> None:
    state = nn.BatchNorm3d(3).state_dict()
    as_numpy = {k: v.numpy() for k, v in state.items()}
    layout = wire_layout(state, "fp16")
    assert layout == wire_layout(as_numpy, "fp16")
    assert [(k, s, d.str) for k, s, d in layout] == [
        ("weight", (3,), "<f2"),
        ("bias", (3,), "<f2"),
        ("running_mean", (3,), "<f2"),
        ("running_var", (3,), "<f2"),
        ("num_batches_tracked", (), "<i8"),
    ]


def test_a_buffer_of_the_wrong_length_is_refused_with_both_sizes() -> None:
    packed = pack_arrays(_record(REFERENCE))  # 32 + 24 + 8 = 64 bytes
    short = ArrayRecord({PACKED_KEY: Array(_buffer(packed)[:-4].copy())})
    with pytest.raises(IncompatibleModelError, match=r"packed weights are 60 bytes, the model needs 64 \(2 tensors\)"):
        unpack_arrays(short, wire_layout(REFERENCE, "fp32"))
    with pytest.raises(IncompatibleModelError, match="are 64 bytes, the model needs 52"):  # sent fp32, read as fp16
        unpack_arrays(packed, wire_layout(REFERENCE, "fp16"))


def test_a_buffer_laid_out_in_another_order_is_refused_not_misread() -> None:
    """The packed order is the sender's state-dict order; another order with the same size fails the digest."""
    a, b = np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)
    receiver = OrderedDict([("a", a), ("b", b)])
    swapped = pack_arrays(_record(OrderedDict([("b", b), ("a", a)])))
    with pytest.raises(IncompatibleModelError, match="laid out for another model"):
        unpack_arrays(swapped, wire_layout(receiver, "fp32"))
    renamed = pack_arrays(_record(OrderedDict([("a", a), ("c", b)])))
    with pytest.raises(IncompatibleModelError, match="laid out for another model"):
        unpack_arrays(renamed, wire_layout(receiver, "fp32"))


def test_per_tensor_records_pass_through_and_a_mixed_record_is_not_packed() -> None:
    record = _record(REFERENCE)
    assert unpacked(record, REFERENCE, "fp32") is record
    mixed = ArrayRecord({PACKED_KEY: Array(np.zeros(3, np.uint8)), "x": Array(np.zeros(1, np.float32))})
    assert not is_packed(mixed)
    with pytest.raises(IncompatibleModelError, match="expected packed weights"):
        unpack_arrays(mixed, wire_layout(REFERENCE, "fp32"))
    wrong_type = ArrayRecord({PACKED_KEY: Array(np.zeros(16, np.float32))})
    with pytest.raises(IncompatibleModelError, match="flat uint8 array, got float32"):
        unpack_arrays(wrong_type, wire_layout(REFERENCE, "fp32"))


def test_a_model_packed_by_the_site_unpacks_into_the_same_model_at_the_server() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    net[1].num_batches_tracked.fill_(5)
    state = net.state_dict()
    packed = pack_arrays(ArrayRecord(OrderedDict((k, v.detach()) for k, v in state.items())))
    back = unpacked(packed, {k: v.numpy() for k, v in state.items()}, "fp32")
    for key, value in state.items():
        np.testing.assert_array_equal(back[key].numpy(), value.numpy())


def test_a_packed_record_is_three_flower_objects_however_many_tensors() -> None:
    """Flower pushes/pulls one request per object: record, array and its chunks (5 MB each)."""
    rng = np.random.default_rng(0)
    state = OrderedDict((f"layer{i}.weight", rng.standard_normal(8).astype(np.float32)) for i in range(10))
    record = _record(state)
    assert len(get_all_nested_objects(record)) == 1 + 10 + 10  # record, 10 arrays, one chunk each
    assert len(get_all_nested_objects(pack_arrays(record))) == 3


def test_array_view_reads_a_flower_array_without_copying_it() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(values)
    view = array_view(array)
    np.testing.assert_array_equal(view, values)
    assert view.dtype == values.dtype and not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(array.data, np.uint8))
    packed = pack_arrays(ArrayRecord({k: Array(v) for k, v in REFERENCE.items()}))
    views = unpack_views(packed, wire_layout(REFERENCE, "fp32"))
    for key, value in REFERENCE.items():
        np.testing.assert_array_equal(views[key], value)
        assert np.shares_memory(views[key], np.frombuffer(packed[PACKED_KEY].data, np.uint8))
