"""The site's egress ledger: one hash-chained JSON line per message the site sent, in ``<workdir>/egress.jsonl``.

Each entry says what left (run, round, kind, payload bytes, SHA-256 of the payload, ε and δ after it) and carries
``prev``, the hash of the entry before it (:data:`GENESIS` for the first), and ``hash``, the SHA-256 of its own
canonical JSON without ``hash`` (sorted keys, no spaces, UTF-8). After every append ``egress.head`` (written
atomically) records the last entry's seq and hash, so an entry removed from the end shows too.

Appends hold an exclusive ``fcntl`` lock on the ledger, so ClientApp processes that run one after another or at
once never interleave, and are fsynced before the reply is let go. A crash can leave two states: a torn last line
(the reply it describes never left; :func:`append` then refuses until someone has looked) or a head one entry
behind the ledger (a crash between the two writes; :func:`audit` accepts a lag of one).

What the chain cannot show: someone who can write the workdir can rewrite every entry after an edit, recompute
the hashes and write a matching head. Only a head hash kept outside the workdir (``fed-client audit`` prints it)
catches that.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedseg.common.errors import FedsegError

#: The ledger, relative to the site's workdir.
LEDGER_FILE = "egress.jsonl"
#: ``prev`` of the first entry.
GENESIS = "0" * 64
HEX64 = r"^[0-9a-f]{64}$"


class LedgerError(FedsegError):
    """The ledger cannot take another entry (a torn last line, an unreadable file)."""


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN: the bytes an entry's hash is taken over."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def ledger_path(workdir: Path) -> Path:
    """``<workdir>/egress.jsonl``."""
    return workdir / LEDGER_FILE


def head_path(ledger: Path) -> Path:
    """The head file beside ``ledger`` (``egress.head``)."""
    return ledger.with_suffix(".head")


class Sent(BaseModel):
    """What left the site in one message (the egress mod fills it in)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    run: int = Field(description="Flower run id")
    round: int | None = Field(description="global round of the task it answers; None when the task had none")
    kind: str = Field(min_length=1, description="train, evaluate, failure, error or the message type")
    bytes: int = Field(ge=0, description="length of the payload's canonical serialization (fedseg.client.egress)")
    sha256: str = Field(pattern=HEX64, description="SHA-256 of that serialization")
    epsilon: float | None = Field(default=None, description="the site's ε after this message, when it said one")
    delta: float | None = None


class Entry(Sent):
    """One ledger line: :class:`Sent` plus its place in the chain."""

    seq: int = Field(ge=1, description="1 for the first entry, then one more per entry")
    time: str = Field(description="UTC, ISO 8601, when the entry was written")
    prev: str = Field(pattern=HEX64, description="hash of the entry before (GENESIS for the first)")
    hash: str = Field(pattern=HEX64, description="SHA-256 of this entry's canonical JSON without 'hash'")

    def computed_hash(self) -> str:
        """The hash this entry's content gives (equal to ``hash`` unless it was edited)."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json", exclude={"hash"}))).hexdigest()

    def line(self) -> bytes:
        """The entry as it is written: canonical JSON and a newline."""
        return canonical_json(self.model_dump(mode="json")) + b"\n"


def seal(sent: Sent, before: Entry | None, now: datetime) -> Entry:
    """``sent`` as the entry after ``before`` (None: the first), written at ``now``."""
    fields = {
        **sent.model_dump(),
        "seq": before.seq + 1 if before else 1,
        "time": now.astimezone(UTC).isoformat(timespec="milliseconds"),
        "prev": before.hash if before else GENESIS,
    }
    unsealed = Entry.model_construct(**fields, hash=GENESIS)
    return Entry.model_validate({**fields, "hash": unsealed.computed_hash()})


def append(ledger: Path, sent: Sent, now: datetime | None = None) -> Entry:
    """Append ``sent`` to ``ledger`` under an exclusive lock, fsync it, then update the head; return the entry.

    Raises:
        LedgerError: the ledger ends in a torn or invalid line (nothing is appended after it), or cannot be written.
    """
    try:
        ledger.parent.mkdir(parents=True, exist_ok=True)
        with ledger.open("a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # held until the file is closed, the head written
            entry = seal(sent, _last_entry(handle, ledger), now or datetime.now(UTC))
            handle.write(entry.line())
            handle.flush()
            os.fsync(handle.fileno())
            _write_head(head_path(ledger), entry)
    except OSError as err:
        raise LedgerError(f"cannot write the egress ledger {ledger}: {err.strerror or err}") from None
    return entry


def _last_entry(handle: IO[bytes], ledger: Path) -> Entry | None:
    """The ledger's last entry (None when empty), read backwards from the end."""
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return None
    start, block, data = end, 4096, b""
    while start > 0:
        start = max(0, start - block)
        handle.seek(start)
        data = handle.read(end - start)
        if data.count(b"\n") >= (2 if data.endswith(b"\n") else 1):
            break
        block *= 2
    check = f"check it with `fed-client audit --workdir {ledger.parent}` before the site sends anything again"
    if not data.endswith(b"\n"):
        raise LedgerError(f"{ledger} ends in an incomplete line (an append was cut short); {check}")
    try:
        return Entry.model_validate_json(data[:-1].rsplit(b"\n", 1)[-1])
    except ValidationError:
        raise LedgerError(f"the last line of {ledger} is not a ledger entry; {check}") from None


@dataclass(frozen=True)
class Head:
    """What ``egress.head`` records: the seq and hash of the last entry appended."""

    seq: int
    hash: str


def _write_head(path: Path, entry: Entry) -> None:
    """Replace the head file atomically (a temporary file, fsync, rename, fsync of the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(canonical_json({"seq": entry.seq, "hash": entry.hash}) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_head(ledger: Path) -> Head | None:
    """The head beside ``ledger``, None when there is none.

    Raises:
        LedgerError: the head file is not one :func:`append` wrote.
    """
    path = head_path(ledger)
    try:
        raw = json.loads(path.read_bytes())
        return Head(seq=int(raw["seq"]), hash=str(raw["hash"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        raise LedgerError(f"{path} is not a ledger head") from None


@dataclass(frozen=True)
class Row:
    """An entry and the line of the ledger it stands on (1-based)."""

    line: int
    entry: Entry


@dataclass(frozen=True)
class Fault:
    """The first thing wrong with a ledger: the line it is on (None: the head file) and why."""

    line: int | None
    why: str

    def __str__(self) -> str:
        return f"{'egress.head' if self.line is None else f'line {self.line}'}: {self.why}"


@dataclass(frozen=True)
class Audit:
    """A ledger as read back: the entries that parse, in file order, and its first fault (None: it verifies)."""

    path: Path
    rows: tuple[Row, ...]
    fault: Fault | None

    @property
    def head(self) -> str:
        """Hash of the last entry (GENESIS when there is none): keep it outside the site to detect a rewrite."""
        return self.rows[-1].entry.hash if self.rows else GENESIS


def audit(ledger: Path) -> Audit:
    """Read ``ledger`` and find its first fault: a torn or invalid line, an edited, duplicated, reordered or removed
    entry, or a head that does not match (a missing ledger reads as empty, so a remaining head shows the removal).

    Raises:
        OSError: the ledger exists but cannot be read.
    """
    data = ledger.read_bytes() if ledger.exists() else b""
    torn = bool(data) and not data.endswith(b"\n")
    lines = data.split(b"\n")[: None if torn else -1]
    parsed = [_parse(raw) for raw in lines]
    rows = tuple(Row(n, item) for n, item in enumerate(parsed, start=1) if isinstance(item, Entry))
    fault = _chain_fault(parsed, torn) or _head_fault(ledger, rows, len(lines))
    return Audit(ledger, rows, fault)


def _parse(raw: bytes) -> Entry | str:
    """The entry on one line, or why there is none."""
    if not raw.strip():
        return "invalid: an empty line"
    try:
        return Entry.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        return f"invalid: not a ledger entry ({where + ': ' if where else ''}{first['msg']})"


def _chain_fault(parsed: list[Entry | str], torn: bool) -> Fault | None:
    """The first line that is not an intact entry following the line before it."""
    first_line: dict[str, int] = {}
    for n, item in enumerate(parsed, start=1):
        if isinstance(item, Entry):
            first_line.setdefault(item.hash, n)
    before: Entry | None = None
    for n, item in enumerate(parsed, start=1):
        if isinstance(item, str):
            last = torn and n == len(parsed)
            return Fault(n, "torn: the last line is incomplete (an append cut short, or a cut file)" if last else item)
        if item.computed_hash() != item.hash:
            return Fault(n, "edited: its content does not match its hash")
        if first_line[item.hash] != n:
            return Fault(n, f"duplicated: the same entry as line {first_line[item.hash]}")
        if item.prev != (before.hash if before else GENESIS):
            return _broken_link(n, item, before, first_line)
        if item.seq != (before.seq if before else 0) + 1:
            return Fault(n, f"edited: seq {item.seq} follows seq {before.seq if before else 0}")
        before = item
    return None


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _broken_link(n: int, item: Entry, before: Entry | None, first_line: dict[str, int]) -> Fault:
    """Why line ``n`` does not chain to the line before it: moved, entries missing, or the line before rewritten."""
    expected = before.seq + 1 if before else 1
    where = {GENESIS: "the start of the ledger", **{h: f"line {k}" for h, k in first_line.items()}}.get(item.prev)
    if where is not None:
        return Fault(n, f"reordered: it follows {where}, not {f'line {n - 1}' if before else 'the start'}")
    if item.seq > expected:
        return Fault(n, f"removed: {_entries(item.seq - expected)} before it (from seq {expected})")
    if before is None:
        return Fault(n, "edited: the first entry does not start from the genesis value")
    return Fault(n - 1, f"edited: its hash was recomputed, but line {n} records another hash for it")


def _head_fault(ledger: Path, rows: tuple[Row, ...], lines: int) -> Fault | None:
    """Whether ``egress.head`` agrees with a chain that verified: the same last entry, or one behind it."""
    try:
        head = read_head(ledger)
    except LedgerError:
        return Fault(None, "not a ledger head (invalid JSON or fields)")
    last = rows[-1].entry.seq if rows else 0
    if head is None:
        return None if last <= 1 else Fault(None, f"missing, though the ledger holds {_entries(last)}")
    if head.seq > last:
        removed = _entries(head.seq - last)
        return Fault(
            lines + 1,
            f"removed: the ledger ends at seq {last}, its head records seq {head.seq} ({removed} removed from the end)",
        )
    row = rows[head.seq - 1] if head.seq >= 1 else None
    if row is None or row.entry.hash != head.hash:
        rewritten = "edited: the ledger was rewritten from here on (this hash is not the one egress.head records)"
        return Fault(row.line if row else None, rewritten)
    if last - head.seq > 1:
        added = f"added: egress.head stops at seq {head.seq}, so this entry was not written by the ledger"
        return Fault(rows[head.seq + 1].line, added)
    return None
