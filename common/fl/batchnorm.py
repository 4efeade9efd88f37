"""Which state-dict entries belong to BatchNorm layers, from the key names alone (server and site agree on it).

A BatchNorm layer with running statistics is the prefix ``P`` of a ``P.running_mean`` key; its entries are ``P.weight``
(γ), ``P.bias`` (β), ``P.running_mean``, ``P.running_var`` and ``P.num_batches_tracked``. Under ``bn = "local"``
(FedBN, Li et al. 2021) exactly these stay at each site; a convolution's ``weight``/``bias`` never match, since a
convolution has no ``running_mean``.
"""

from __future__ import annotations

from collections.abc import Iterable

_PARTS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def batchnorm_keys(keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` that belong to a BatchNorm layer (see the module docstring)."""
    keys = set(keys)
    layers = {k.removesuffix(".running_mean") for k in keys if k.endswith(".running_mean")}
    return {f"{layer}.{part}" for layer in layers for part in _PARTS} & keys
