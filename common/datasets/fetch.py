"""``fetch``: download a registry dataset, verify it, unpack it safely and put it in place in one rename.

Everything happens in ``OUT/.NAME.fetch/`` (a hidden sibling of the final folder, so on the same file system):
the download (kept there across runs when the connection gives up, so the next run resumes it), the unpacked
archive and the arranged dataset. Only a complete, verified, arranged dataset is renamed to ``OUT/NAME``, so a
site never finds a half-unpacked folder where it would train. A checksum mismatch or a refused archive deletes
the whole working folder; an interruption while unpacking keeps the verified download and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from fedseg.common.datasets.arrange import arrange, wanted_members
from fedseg.common.datasets.checksum import Digests, verify
from fedseg.common.datasets.download import DownloadReport, download
from fedseg.common.datasets.extract import extract
from fedseg.common.datasets.registry import DatasetEntry
from fedseg.common.errors import ConfigError, DataError, FedsegError

log = logging.getLogger(__name__)

#: What fetch writes into the dataset folder: where it came from and its digests.
PROVENANCE = "fedseg-dataset.json"
#: Default uncompressed-size limit, as a multiple of the archive's size (at least :data:`MIN_EXTRACT_LIMIT`).
EXTRACT_FACTOR = 4
MIN_EXTRACT_LIMIT = 1 << 30


@dataclass(frozen=True)
class FetchOptions:
    """How to fetch: verify the checksum, the uncompressed-size limit (None: the default), download retries."""

    verify: bool = True
    max_extract_bytes: int | None = None
    retries: int = 5
    backoff: float = 2.0


@dataclass(frozen=True)
class FetchResult:
    """A fetched dataset: its folder, labelled cases, SHA-256, what verified it, the download's report."""

    path: Path
    cases: int
    sha256: str
    verified_by: str | None
    download: DownloadReport | None = None
    already_there: bool = False


def fetch_dataset(entry: DatasetEntry, out: Path, options: FetchOptions | None = None) -> FetchResult:
    """Fetch ``entry`` into ``out/<name>`` (see the module docstring).

    Raises:
        ConfigError: no URL for the entry, or no checksum and ``verify`` on.
        DataError: ``out/<name>`` exists without a provenance file; download, checksum, extraction or layout
            failures (one line each).
    """
    options = options or FetchOptions()
    url, expected = _plan(entry, options)
    target = out / entry.name
    if (target / PROVENANCE).is_file():
        return _already_there(target)
    if target.exists():
        raise DataError(f"{target}: exists but fed-eval datasets fetch did not write it; move it or pick another --out")
    created = not out.exists()
    work = out / f".{entry.name}.fetch"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create a folder here ({err.strerror or err}); pick another --out") from None
    archive = work / _archive_name(url)
    digests = Digests(md5=expected is not None and expected[0] == "md5")
    report = download(url, archive, digests, options.retries, options.backoff)
    try:
        verified_by = _verified(entry, archive, digests, expected)
    except FedsegError:
        _discard(work, out, created)  # a corrupted or changed file: nothing is kept
        raise
    _check_free_space(work, archive.stat().st_size)  # keeps the verified download for the next run
    try:
        cases = _install(entry, archive, target, options, _provenance(entry, digests, verified_by))
    except FedsegError:
        _discard(work, out, created)  # a refused archive or one in another layout: nothing is kept
        raise
    except BaseException:
        shutil.rmtree(work / "unpacked", ignore_errors=True)  # interrupted: keep only the verified download
        shutil.rmtree(work / entry.name, ignore_errors=True)
        raise
    log.info("%s: %d labelled cases in %s", entry.name, cases, target)
    return FetchResult(target, cases, digests.hexdigest("sha256"), verified_by, report)


def _plan(entry: DatasetEntry, options: FetchOptions) -> tuple[str, tuple[str, str] | None]:
    if entry.url is None:
        raise ConfigError(f"{entry.name}: {entry.fetch_hint or 'the registry gives no url for it'}")
    expected = entry.checksum if options.verify else None
    if options.verify and expected is None:
        raise ConfigError(
            f"{entry.name}: the registry has no md5 or sha256 for {entry.url}, so the download cannot be verified; "
            "give one in a --registry file ([datasets." + entry.name + "] sha256 = ...) or pass --no-verify"
        )
    return entry.url, expected


def _verified(entry: DatasetEntry, archive: Path, digests: Digests, expected: tuple[str, str] | None) -> str | None:
    """What verified the archive (None: nothing, under --no-verify); DataError on a mismatch."""
    if expected is None:
        log.warning("%s: not verified (--no-verify); its SHA-256 is %s", archive.name, digests.hexdigest("sha256"))
        return None
    verify(digests, expected, archive.name)
    source = entry.checksum_source or "the registry"
    log.info("%s: %s verified (%s)", archive.name, expected[0].upper(), source)
    return f"{expected[0]} ({source})"


def _install(entry: DatasetEntry, archive: Path, target: Path, options: FetchOptions, record: dict[str, object]) -> int:
    """Unpack and arrange in the working folder, write ``record`` (with the case count) into it, rename the result
    to ``target`` and remove the working folder."""
    work = archive.parent
    size = archive.stat().st_size
    limit = options.max_extract_bytes or entry.max_extract_bytes or max(EXTRACT_FACTOR * size, MIN_EXTRACT_LIMIT)
    unpacked = work / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)  # left by an interrupted run
    unpacked.mkdir()
    extract(archive, unpacked, limit, wanted_members(entry))
    staged = work / entry.name
    shutil.rmtree(staged, ignore_errors=True)
    cases = arrange(entry, unpacked, staged)
    (staged / PROVENANCE).write_text(json.dumps(record | {"cases": cases}, indent=2) + "\n", encoding="utf-8")
    os.rename(staged, target)
    shutil.rmtree(work)
    return cases


def _discard(work: Path, out: Path, created: bool) -> None:
    """Remove the working folder, and ``out`` when this fetch created it and it is empty again."""
    shutil.rmtree(work, ignore_errors=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _provenance(entry: DatasetEntry, digests: Digests, verified_by: str | None) -> dict[str, object]:
    """The provenance record of a fetched dataset (the case count is added once it is arranged)."""
    return {
        "name": entry.name,
        "title": entry.title,
        "url": entry.url,
        "sha256": digests.hexdigest("sha256"),
        "verified_by": verified_by,
        "licence": entry.licence,
        "citation": entry.citation,
        "layout": entry.layout,
        "fetched": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _already_there(target: Path) -> FetchResult:
    try:
        record = json.loads((target / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{target / PROVENANCE}: unreadable; delete {target} to fetch it again") from None
    log.info("%s is already fetched (%s); delete it to fetch again", target, record.get("fetched", "?"))
    return FetchResult(target, int(record.get("cases", 0)), str(record.get("sha256", "")), record.get("verified_by"),
                       already_there=True)  # fmt: skip


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DataError(f"{folder}: {free / 2**30:.1f} GiB free, unpacking needs about {needed / 2**30:.1f} GiB")


def _archive_name(url: str) -> str:
    name = unquote(Path(urlparse(url).path).name)
    return name if name and not name.startswith(".") else "archive"
