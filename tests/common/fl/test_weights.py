"""state_dict <-> ArrayRecord conversion: keys kept, dtypes restored, mismatches named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedseg.common.errors import IncompatibleModelError
from fedseg.common.fl.weights import arrays_from_model, load_arrays, state_dict_from_arrays


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
