"""state_dict <-> ArrayRecord conversion: keys kept, dtypes restored, mismatches named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedseg.common.errors import IncompatibleModelError
from fedseg.common.fl.weights import (
    arrays_from_model,
    decode_arrays,
    encode_arrays,
    load_arrays,
    state_dict_from_arrays,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))


def test_round_trip_keeps_names_values_and_buffers() -> None:
    source, target = _net(), _net()
    with torch.no_grad():
        source[0].weight.add_(1.0)
    source[1].num_batches_tracked.fill_(7)
    arrays = arrays_from_model(source)
    assert list(arrays.keys()) == list(source.state_dict().keys())
    load_arrays(target, arrays)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_averaged_integer_buffers_are_cast_back() -> None:
    net = _net()
    arrays = arrays_from_model(net)
    arrays["1.num_batches_tracked"] = Array(np.asarray(3.0, dtype=np.float64))  # what weighted averaging yields
    state = state_dict_from_arrays(arrays, net.state_dict())
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert int(state["1.num_batches_tracked"]) == 3


def test_missing_unexpected_and_misshapen_weights_are_named() -> None:
    net = _net()
    arrays = arrays_from_model(net)
    del arrays["0.bias"]
    arrays["extra"] = Array(np.zeros(1, np.float32))
    with pytest.raises(IncompatibleModelError, match=r"missing 0\.bias; unexpected extra"):
        load_arrays(net, arrays)
    wrong = arrays_from_model(net)
    wrong["0.bias"] = Array(np.zeros(5, np.float32))
    with pytest.raises(IncompatibleModelError, match=r"'0.bias' has shape \(5,\), the model expects \(2,\)"):
        load_arrays(net, wrong)


def test_a_list_built_record_does_not_load() -> None:
    net = _net()
    listed = ArrayRecord([v.numpy() for v in net.state_dict().values()])
    with pytest.raises(IncompatibleModelError, match="missing"):
        load_arrays(net, listed)


def _big_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(16, 32, 3), nn.BatchNorm3d(32))


@pytest.mark.parametrize("transport", ["fp16", "bf16"])
def test_half_transport_halves_the_bytes_and_loads_back_rounded(transport: str) -> None:
    source, target = _big_net(), _big_net()
    with torch.no_grad():
        source[0].weight.mul_(3.0).add_(0.123456)
    source[1].num_batches_tracked.fill_(9)
    full = arrays_from_model(source)
    wire = encode_arrays(full, transport)  # type: ignore[arg-type]
    headers = 128 * len(full)  # each array's .npy header (and the int64 counter) does not shrink
    assert wire.count_bytes() <= 0.5 * full.count_bytes() + headers
    assert wire.count_bytes() < 0.6 * full.count_bytes()
    assert wire["1.num_batches_tracked"].numpy().dtype == np.int64
    half = torch.float16 if transport == "fp16" else torch.bfloat16
    load_arrays(target, wire)
    for key, value in source.state_dict().items():
        got = target.state_dict()[key]
        assert got.dtype == value.dtype, key
        expected = value.to(half).to(value.dtype) if value.is_floating_point() else value
        assert torch.equal(got, expected), key  # exactly the half-precision rounding, nothing else
    decoded = decode_arrays(wire, transport)  # type: ignore[arg-type]
    assert decoded["0.weight"].numpy().dtype == np.float32
    np.testing.assert_array_equal(decoded["0.weight"].numpy(), target.state_dict()["0.weight"].numpy())


def test_fp32_transport_is_the_identity() -> None:
    arrays = arrays_from_model(_net())
    assert encode_arrays(arrays, "fp32") is arrays and decode_arrays(arrays, "fp32") is arrays
