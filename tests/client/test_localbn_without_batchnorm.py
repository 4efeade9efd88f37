"""FedBN's site and server halves with a model that has no BatchNorm (model.norm = group): nothing to keep, nothing
to pool, and the weights pass through untouched."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict

from fedseg.client.localbn import LOCAL_BN_KEY, keep_own, own_start, shared_only
from fedseg.common.fl.batchnorm import batchnorm_keys
from fedseg.common.fl.weights import arrays_from_model
from fedseg.common.nn.model import ModelConfig, build_model
from fedseg.server.run.bn import is_bn_statistic, pooled_statistics


def _arrays(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    record = arrays_from_model(build_model(ModelConfig(feature_scale=64, norm="group")))
    return {k: record[k].numpy() for k in record}


def test_local_bn_rounds_keep_nothing_and_change_nothing() -> None:
    torch.manual_seed(0)
    received = arrays_from_model(build_model(ModelConfig(feature_scale=64, norm="group")))
    assert batchnorm_keys(received) == set()
    state = RecordDict()
    for _ in range(2):  # round 1 (nothing kept), round 2 (the empty record kept)
        start = own_start(received, state)
        assert list(start) == list(received)
        assert all(np.array_equal(start[k].numpy(), received[k].numpy()) for k in received)
        keep_own(received, state)
        assert len(state.array_records[LOCAL_BN_KEY]) == 0
        assert list(shared_only(received, received)) == list(received)


def test_the_server_pools_no_statistics_for_a_model_without_batchnorm() -> None:
    sites = [_arrays(1), _arrays(2)]
    assert not any(is_bn_statistic(k) for k in sites[0])
    for pooling in ("mean", "median", "trimmed"):
        assert pooled_statistics(sites, [1.0, 2.0], sites[0], pooling) == {}  # type: ignore[arg-type]
