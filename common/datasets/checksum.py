"""Checksums of a downloaded archive: computed while it downloads, compared with the registry's.

SHA-256 is always computed (it is recorded with the fetched dataset, so an entry without a published checksum can
be pinned afterwards); MD5 only when the registry verifies by it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedseg.common.errors import DataError

_CHUNK = 1 << 20


class Digests:
    """Running SHA-256 (and optionally MD5) of a byte stream, fed in order."""

    def __init__(self, md5: bool = False) -> None:
        self._md5 = md5
        self._hashes = self._fresh()

    def _fresh(self) -> dict[str, hashlib._Hash]:
        hashes = {"sha256": hashlib.sha256()}
        if self._md5:
            hashes["md5"] = hashlib.md5(usedforsecurity=False)
        return hashes

    def update(self, chunk: bytes) -> None:
        """Feed the next bytes."""
        for digest in self._hashes.values():
            digest.update(chunk)

    def reset(self) -> None:
        """Start again from no bytes (the download restarts from its first byte)."""
        self._hashes = self._fresh()

    def feed_file(self, path: Path) -> None:
        """Feed the whole of ``path`` (the part of a download kept from an earlier attempt)."""
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                self.update(chunk)

    def hexdigest(self, algorithm: str) -> str:
        """The hex digest of everything fed so far (``sha256`` or, when enabled, ``md5``)."""
        return self._hashes[algorithm].hexdigest()


def verify(digests: Digests, expected: tuple[str, str], what: str) -> None:
    """Compare ``digests`` with ``expected = (algorithm, hex digest)``.

    Raises:
        DataError: the digest differs; the message names ``what`` and both digests.
    """
    algorithm, want = expected
    got = digests.hexdigest(algorithm)
    if got != want:
        raise DataError(
            f"{what}: {algorithm.upper()} is {got} but the registry says {want}; the download was deleted "
            "(a corrupted transfer or a changed file: run the command again, or correct the checksum with --registry)"
        )
