"""Accepted replies' weights on disk while a round is screened, read back slice by slice.

The server must see every reply of a round before it knows which to aggregate: the update-norm bound compares
each norm with the round's median and the direction check compares every update with the others. Holding every
reply until then costs a few copies of the model per site (the received message, its decoded tensors, the
validated arrays). Instead, each accepted reply's aggregated weights are written as one float32 file the moment
it has been validated, and the message is let go. Everything that needs all of them reads the files back in
slices of at most :data:`SLICE_VALUES` values over all replies together:

* :meth:`Spill.gram`: the dot products of the updates ``w_i − w_global`` (the direction check), and
  :meth:`Spill.dots` their dot products with one given update (FLTrust's reference);
* :meth:`Spill.weighted_mean`: ``Σ a_i (w_global + s_i (w_i − w_global)) / Σ a_i`` over chosen replies, with case
  weights ``a_i`` and clipping factors ``s_i`` (the mean FedAvg, FedProx and the FedOpt family start from);
* :meth:`Spill.load`: one reply's weights (rules that need every reply at once, e.g. the median).

Reads use ``os.pread`` on plain files (no memory maps: mapped pages would count as the server's resident memory).
The folder is deleted by :meth:`Spill.close` (or leaving the ``with`` block).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

NDArray = np.ndarray

#: Values read per slice over all replies together (float64 while computing: 4 MB).
SLICE_VALUES = 1 << 19
_MIN_SLICE = 1 << 12


class Spill:
    """The weights ``keys`` of a round's accepted replies, one float32 file each, in a private temporary folder.

    Args:
        reference: the round's global weights (at least ``keys``).
        keys: the entries written and read back, in this order.
        folder: where the temporary folder goes (None: the system's temporary directory).
    """

    def __init__(self, reference: Mapping[str, NDArray], keys: Sequence[str], folder: Path | None = None) -> None:
        self.reference = reference
        self.keys = list(keys)
        self.sizes = [int(reference[k].size) for k in self.keys]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="fedseg-spill-", dir=folder))
        self._files: list[int] = []

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._files)

    def add(self, arrays: Mapping[str, NDArray]) -> int:
        """Write ``arrays[keys]`` as float32; returns the row number to read it back by."""
        row = len(self._files)
        path = self.folder / f"{row}.f32"
        with path.open("wb") as out:
            for key in self.keys:
                out.write(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
        self._files.append(os.open(path, os.O_RDONLY))
        return row

    def close(self) -> None:
        """Close and delete every file (idempotent)."""
        for fd in self._files:
            os.close(fd)
        self._files = []
        shutil.rmtree(self.folder, ignore_errors=True)

    def _read(self, row: int, start: int, count: int) -> NDArray:
        raw = os.pread(self._files[row], count * 4, start * 4)
        return np.frombuffer(raw, dtype=np.float32)

    def _slices(self, rows: int) -> Iterator[tuple[int, str, int, int]]:
        """(key index, key, start within the key, count), each slice at most ``SLICE_VALUES / rows`` values."""
        step = max(_MIN_SLICE, SLICE_VALUES // max(rows, 1))
        for index, (key, size) in enumerate(zip(self.keys, self.sizes, strict=True)):
            for start in range(0, size, step):
                yield index, key, start, min(step, size - start)

    def _updates(self, rows: Sequence[int], index: int, key: str, start: int, count: int) -> NDArray:
        """``w_i − w_global`` of ``rows`` over one slice, float64, one row per reply."""
        base = self.reference[key].reshape(-1)[start : start + count].astype(np.float64)
        at = self.offsets[index] + start
        block = np.empty((len(rows), count))
        for i, row in enumerate(rows):
            np.subtract(self._read(row, at, count), base, out=block[i])
        return block

    def gram(self, rows: Sequence[int]) -> NDArray:
        """The matrix of dot products of the updates of ``rows`` (float64)."""
        gram = np.zeros((len(rows), len(rows)))
        if not rows:
            return gram
        for index, key, start, count in self._slices(len(rows)):
            block = self._updates(rows, index, key, start, count)
            gram += block @ block.T
        return gram

    def dots(self, rows: Sequence[int], vector: Mapping[str, NDArray]) -> NDArray:
        """The dot product of each update of ``rows`` with ``vector`` (an update over the spilled keys; float64)."""
        out = np.zeros(len(rows))
        for index, key, start, count in self._slices(len(rows)):
            out += self._updates(rows, index, key, start, count) @ vector[key].reshape(-1)[start : start + count]
        return out

    def weighted_mean(
        self, rows: Sequence[int], weights: Sequence[float], scales: Sequence[float] | None = None
    ) -> dict[str, NDArray]:
        """``Σ a_i (w_global + s_i (w_i − w_global)) / Σ a_i`` over ``rows`` per key, in the reference's dtypes.

        ``weights``: the ``a_i`` (positive); ``scales``: the ``s_i`` (None: all 1, i.e. the plain weighted mean).
        """
        if not rows:
            raise ValueError("a weighted mean needs at least one reply")
        factors = np.asarray(weights, dtype=np.float64) / math.fsum(weights)
        if scales is not None:
            factors = factors * np.asarray(scales, dtype=np.float64)
        out = {k: np.empty_like(self.reference[k]) for k in self.keys}
        for index, key, start, count in self._slices(len(rows)):
            base = self.reference[key].reshape(-1)[start : start + count].astype(np.float64)
            step = factors @ self._updates(rows, index, key, start, count)
            out[key].reshape(-1)[start : start + count] = base + step
        return out

    def load(self, row: int, scale: float = 1.0) -> dict[str, NDArray]:
        """One reply's weights, shaped and typed like the reference, its update ``w − w_global`` multiplied by
        ``scale`` (clipping, FLTrust's rescaling)."""
        out = {}
        for index, (key, size) in enumerate(zip(self.keys, self.sizes, strict=True)):
            ref = self.reference[key]
            value = self._read(row, self.offsets[index], size).reshape(ref.shape)
            if scale != 1:
                value = ref + (value - ref) * np.float32(scale)
            out[key] = value.astype(ref.dtype)
        return out
