"""Safe extraction of a tar or zip archive into an empty folder.

Refused, with one line naming the member (the caller deletes what was written): a member that would land outside
the folder (``../``, an absolute path, a drive letter), a link pointing outside it (tar) or any link (zip, whose
links :mod:`zipfile` would write as plain files), device files and FIFOs, and an archive whose files add up to more
than ``max_bytes`` uncompressed. Tar members go through :func:`tarfile.data_filter` (Python's own extraction
filter: it also drops set-uid bits and rejects the above); zip members are checked here before any is written,
and :mod:`zipfile` never writes more than a member's declared size. ``wanted`` skips members the layout does not
need (macOS ``._`` files, TotalSegmentator's 112 other structures) after they have passed the checks.
"""

from __future__ import annotations

import logging
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from fedseg.common.console import console
from fedseg.common.errors import DataError

log = logging.getLogger(__name__)

#: Whether a member (by its path inside the archive) is needed.
Wanted = Callable[[PurePosixPath], bool]


@dataclass
class ExtractReport:
    """Files and bytes written."""

    files: int = 0
    size: int = 0


@dataclass
class _Budget:
    """Uncompressed bytes allowed, and used so far."""

    archive: Path
    limit: int
    report: ExtractReport

    def take(self, size: int, name: str) -> None:
        self.report.files += 1
        self.report.size += size
        if self.report.size > self.limit:
            raise DataError(
                f"{self.archive.name}: unpacks to more than the {self.limit:,}-byte limit (at member {name}); "
                "refused, nothing kept (raise --max-extract-gib if this archive is what you expect)"
            )


def extract(archive: Path, dest: Path, max_bytes: int, wanted: Wanted) -> ExtractReport:
    """Extract the ``wanted`` members of ``archive`` (tar, any compression, or zip) into the folder ``dest``.

    Raises:
        DataError: an unsafe member, the size limit, or a damaged or unknown archive (see the module docstring).
    """
    report = ExtractReport()
    budget = _Budget(archive, max_bytes, report)
    columns = (TextColumn("unpacking"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget, wanted, progress)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, dest, budget, wanted, progress)
        else:
            raise DataError(f"{archive.name}: neither a tar nor a zip archive; check the URL in the registry")
    log.info("unpacked %d files, %s bytes, from %s", report.files, f"{report.size:,}", archive.name)
    return report


def _extract_tar(archive: Path, dest: Path, budget: _Budget, wanted: Wanted, progress: Progress) -> None:
    task = progress.add_task("unpacking", total=archive.stat().st_size)
    try:
        with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            tick = lambda: progress.update(task, completed=raw.tell())  # noqa: E731
            tar.extractall(dest, filter=_tar_filter(budget, wanted, tick))
    except tarfile.FilterError as err:
        raise DataError(f"{archive.name}: member {err.tarinfo.name!r} {_why(err)}; refused, nothing kept") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{archive.name}: damaged archive or unwritable folder ({err}); nothing kept") from None


def _tar_filter(
    budget: _Budget, wanted: Wanted, tick: Callable[[], None]
) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    """Python's ``data`` filter, then the layout's choice and the size budget."""

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        tick()
        checked = tarfile.data_filter(member, path)
        if not wanted(PurePosixPath(checked.name)):
            return None
        if checked.isreg():
            budget.take(checked.size, checked.name)
        return checked

    return check


def _extract_zip(archive: Path, dest: Path, budget: _Budget, wanted: Wanted, progress: Progress) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [info for info in zf.infolist() if _zip_member(archive, info) and wanted(_zip_path(info))]
            for info in members:
                if not info.is_dir():
                    budget.take(info.file_size, info.filename)  # all declared sizes, before writing anything
            task = progress.add_task("unpacking", total=budget.report.size)
            for info in members:
                zf.extract(info, dest)
                progress.advance(task, info.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
        raise DataError(f"{archive.name}: damaged archive or unwritable folder ({err}); nothing kept") from None


def _zip_member(archive: Path, info: zipfile.ZipInfo) -> bool:
    """True for a safe member; DataError for a path leaving the folder or a link."""
    name = info.filename
    path = _zip_path(info)
    if name.startswith("/") or "\\" in name or ":" in "".join(path.parts[:1]) or ".." in path.parts:
        raise DataError(f"{archive.name}: member {name!r} would be written outside the target folder; refused")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise DataError(f"{archive.name}: member {name!r} is a link or special file; refused")
    return True


def _zip_path(info: zipfile.ZipInfo) -> PurePosixPath:
    return PurePosixPath(info.filename or ".")


def _why(err: tarfile.FilterError) -> str:
    """What a tar filter refused, in words."""
    reasons: dict[type[tarfile.FilterError], str] = {
        tarfile.OutsideDestinationError: "would be written outside the target folder",
        tarfile.AbsolutePathError: "has an absolute path",
        tarfile.LinkOutsideDestinationError: "is a link pointing outside the target folder",
        tarfile.AbsoluteLinkError: "is a link to an absolute path",
        tarfile.SpecialFileError: "is a device file or FIFO",
    }
    return next((text for kind, text in reasons.items() if isinstance(err, kind)), str(err))
