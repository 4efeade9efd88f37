"""Resumable download of one archive over HTTP(S) with httpx, a rich progress bar (rate, ETA) and running digests.

A dropped connection resumes where it stopped with an HTTP ``Range`` request, as many times as each attempt makes
progress; ``retries`` attempts in a row without a new byte give up (keeping what arrived, for the next run). A part
left by an earlier run is resumed the same way, its bytes fed to the digests first. A server that ignores ``Range``
(answers 200) is read again from the first byte.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fedseg.common.console import console
from fedseg.common.datasets.checksum import Digests
from fedseg.common.errors import DataError

log = logging.getLogger(__name__)

_TIMEOUT = httpx.Timeout(30.0, read=120.0)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)|bytes \*/(\d+)")


@dataclass
class DownloadReport:
    """What a download did: the bytes of the whole file, the offsets it resumed at, the requests it made."""

    size: int = 0
    resumed_at: list[int] = field(default_factory=list)
    requests: int = 0


@dataclass
class _Transfer:
    """One download in progress: where it writes, how far it is, what it has told the progress bar."""

    url: str
    dest: Path
    digests: Digests
    progress: Progress
    task: TaskID
    done: int = 0


def download(url: str, dest: Path, digests: Digests, retries: int = 5, backoff: float = 2.0) -> DownloadReport:
    """Download ``url`` to ``dest``, resuming a part already there; feed every byte to ``digests`` in order.

    Args:
        url: the archive's http(s) URL.
        dest: the file to write; an existing file is taken as the first bytes of ``url`` and resumed.
        digests: fed the whole file, in order (an existing part first).
        retries: attempts in a row without a new byte before giving up.
        backoff: seconds before the first retry without progress, doubling after each (none after progress).

    Returns:
        The report (size, offsets resumed at, requests made).

    Raises:
        DataError: an HTTP error status, a server resuming at the wrong byte, ``retries`` attempts without
            progress, or a file that cannot be written. What arrived stays in ``dest`` for the next run.
    """
    report = DownloadReport()
    done = dest.stat().st_size if dest.is_file() else 0
    if done:
        log.info("resuming %s from byte %d (a part was kept by an earlier run)", dest.name, done)
        digests.feed_file(dest)
        report.resumed_at.append(done)
    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn(), DownloadColumn()]
    columns += [TransferSpeedColumn(), TimeRemainingColumn()]
    with (
        Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress,
        httpx.Client(follow_redirects=True, timeout=_TIMEOUT, headers={"Accept-Encoding": "identity"}) as client,
    ):
        transfer = _Transfer(url, dest, digests, progress, progress.add_task(dest.name, completed=done), done)
        failures = 0
        while True:
            before = transfer.done
            report.requests += 1
            try:
                finished = _attempt(client, transfer)
                reason = "the server closed the connection before the end of the file"
            except httpx.TransportError as err:
                finished, reason = False, f"{type(err).__name__}: {err}"
            if finished:
                report.size = transfer.done
                log.info("downloaded %s (%s bytes, %d requests)", dest.name, f"{transfer.done:,}", report.requests)
                return report
            failures = 0 if transfer.done > before else failures + 1
            if failures > retries:
                raise DataError(
                    f"{url}: download failed {failures} times in a row without progress ({reason}); the "
                    f"{transfer.done:,} bytes received are kept in {dest}: run the same command again to resume"
                )
            log.warning("%s: connection lost at byte %d (%s); resuming with Range", url, transfer.done, reason)
            report.resumed_at.append(transfer.done)
            if failures:
                time.sleep(backoff * 2 ** (failures - 1))  # back off only when the last attempt brought nothing


def _attempt(client: httpx.Client, transfer: _Transfer) -> bool:
    """One request from ``transfer.done`` on; True when the file is complete."""
    headers = {"Range": f"bytes={transfer.done}-"} if transfer.done else {}
    with client.stream("GET", transfer.url, headers=headers) as response:
        if response.status_code == 416 and transfer.done:
            return _already_complete(response, transfer)
        _check_status(response, transfer)
        length = response.headers.get("Content-Length")
        end = transfer.done + int(length) if length is not None and length.isdigit() else None
        transfer.progress.update(transfer.task, total=end, completed=transfer.done)
        _receive(response, transfer)
        return end is None or transfer.done >= end


def _check_status(response: httpx.Response, transfer: _Transfer) -> None:
    """Accept 200 (restarting from byte 0 if a Range was sent) or a 206 that resumes at the right byte."""
    if response.status_code == 200:
        if transfer.done:
            log.info("%s ignored the Range request; downloading again from the first byte", transfer.url)
            transfer.done = 0
            transfer.digests.reset()
        return
    if response.status_code == 206:
        start = _range_start(response.headers.get("Content-Range", ""))
        if start != transfer.done:
            raise DataError(
                f"{transfer.url}: asked to resume at byte {transfer.done} but the server sent bytes from {start}; "
                f"delete {transfer.dest} and run the command again"
            )
        return
    raise DataError(
        f"{transfer.url}: HTTP {response.status_code} {response.reason_phrase}; check the URL (or the mirror given "
        "with --registry)"
    )


def _receive(response: httpx.Response, transfer: _Transfer) -> None:
    """Append the body to the file as it arrives (what arrived is kept when the connection drops)."""
    try:
        with transfer.dest.open("ab" if transfer.done else "wb") as out:
            for chunk in response.iter_raw():  # as received: a chunk size would buffer bytes a drop loses
                out.write(chunk)
                transfer.digests.update(chunk)
                transfer.done += len(chunk)
                transfer.progress.update(transfer.task, completed=transfer.done)
    except OSError as err:
        raise DataError(f"{transfer.dest}: cannot write the download ({err.strerror or err}); free space") from None


def _already_complete(response: httpx.Response, transfer: _Transfer) -> bool:
    """A 416 to a resume: complete when the server's size is what we have; otherwise start again from byte 0."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    total = match.group(4) if match else None
    if total is not None and int(total) == transfer.done:
        return True
    log.info("%s: the kept part does not fit the file on the server; downloading again", transfer.dest.name)
    transfer.dest.unlink()
    transfer.done = 0
    transfer.digests.reset()
    return False


def _range_start(header: str) -> int | None:
    match = _CONTENT_RANGE.fullmatch(header.strip())
    return int(match.group(1)) if match and match.group(1) is not None else None
