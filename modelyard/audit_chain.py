"""The registry audit log's hash chain: how an entry is encoded and hashed, and how a whole log
is checked. Pure functions, shared by the store that appends entries and by
`modelyard audit verify`, so the two can never encode an entry differently.

Each entry records the hash of the entry before it and its own hash::

    entry_hash = sha256(prev_hash || canonical_bytes(entry))

where `prev_hash` is 64 lower-case hex digits (`GENESIS_HASH` for the first chained entry) and
`canonical_bytes` is compact JSON with sorted keys and ASCII escapes of every recorded field,
id and time included. Time is hashed as integer microseconds since the epoch (`micros`): the
store keeps exactly that value (as a REAL, which holds it exactly) and the API sends it exactly
(a Timestamp with whole microseconds), so the verifier recomputes the same bytes whether it
reads the SQLite file or `ListAuditEntries`.

Entries written before the chain existed (a database from an older registry) have empty
hashes. They may only come first: `verify_chain` reports them as not covered, and the chain
starts at the first hashed entry with `GENESIS_HASH`.

What a chain does not show by itself: a log cut short at its end (the last entries deleted), or
a log rewritten with every hash recomputed. Both are caught by comparing with a head (`Head`,
the last id and hash) recorded somewhere the attacker cannot write.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelyard.v1 import registry_pb2

__all__ = [
    "GENESIS_HASH",
    "ChainEntry",
    "ChainReport",
    "Head",
    "Problem",
    "TamperKind",
    "canonical_bytes",
    "compute_hash",
    "entry_from_proto",
    "entry_from_row",
    "micros",
    "seal",
    "unix_seconds",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
"""The `prev_hash` of the first chained entry."""

_ENCODING_VERSION = 1
"""Part of the hashed bytes, so that a future encoding can never collide with this one."""


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """One audit entry as the chain sees it: every recorded field, and its two hashes."""

    id: int
    time_us: int
    """Microseconds since the Unix epoch."""
    actor: str
    method: str
    model: str
    target: str
    request_id: str
    outcome: str
    error_reason: str
    message: str
    prev_hash: str = ""
    entry_hash: str = ""

    @property
    def chained(self) -> bool:
        """False for an entry written before the chain existed (both hashes empty)."""
        return bool(self.prev_hash or self.entry_hash)


def micros(unix_s: float) -> int:
    """Unix seconds as the whole microseconds the chain hashes."""
    return round(unix_s * 1_000_000)


def unix_seconds(time_us: int) -> float:
    """Whole microseconds as unix seconds; `micros(unix_seconds(t)) == t` for any time in the
    next few centuries (below 2**53 microseconds a double holds them exactly)."""
    return time_us / 1_000_000


def entry_from_proto(message: registry_pb2.AuditEntry) -> ChainEntry:
    """An entry as `ListAuditEntries` returns it (its Timestamp holds whole microseconds)."""
    return ChainEntry(
        id=message.id,
        time_us=message.time.seconds * 1_000_000 + message.time.nanos // 1000,
        actor=message.actor,
        method=message.method,
        model=message.model,
        target=message.target,
        request_id=message.request_id,
        outcome=message.outcome,
        error_reason=message.error_reason,
        message=message.message,
        prev_hash=message.prev_hash,
        entry_hash=message.entry_hash,
    )


def entry_from_row(row: Mapping[str, Any]) -> ChainEntry:
    """An entry as a row of the registry's `audit_log` table (time in unix seconds; a table
    of an older registry may lack the hash columns)."""
    return ChainEntry(
        id=int(row["id"]),
        time_us=micros(float(row["time"])),
        actor=str(row["actor"]),
        method=str(row["method"]),
        model=str(row["model"]),
        target=str(row["target"]),
        request_id=str(row["request_id"]),
        outcome=str(row["outcome"]),
        error_reason=str(row["error_reason"]),
        message=str(row["message"]),
        prev_hash=str(row.get("prev_hash") or ""),
        entry_hash=str(row.get("entry_hash") or ""),
    )


def canonical_bytes(entry: ChainEntry) -> bytes:
    """The unambiguous encoding of an entry's recorded fields (not its hashes)."""
    fields = {
        "v": _ENCODING_VERSION,
        "id": entry.id,
        "time_us": entry.time_us,
        "actor": entry.actor,
        "method": entry.method,
        "model": entry.model,
        "target": entry.target,
        "request_id": entry.request_id,
        "outcome": entry.outcome,
        "error_reason": entry.error_reason,
        "message": entry.message,
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode("ascii")


def compute_hash(entry: ChainEntry) -> str:
    """sha256 (hex) of the entry's `prev_hash` followed by its canonical bytes."""
    digest = hashlib.sha256()
    digest.update(entry.prev_hash.encode("utf-8"))
    digest.update(canonical_bytes(entry))
    return digest.hexdigest()


def seal(entry: ChainEntry, prev_hash: str) -> ChainEntry:
    """The entry linked after an entry whose hash is `prev_hash` (GENESIS_HASH: the first)."""
    linked = dataclasses.replace(entry, prev_hash=prev_hash, entry_hash="")
    return dataclasses.replace(linked, entry_hash=compute_hash(linked))


@dataclass(frozen=True, slots=True)
class Head:
    """The last entry of a log: record `str(head)` ("ID:HASH") outside the cluster and pass it
    back to `verify_chain` (or `--expect-head`) to catch a cut or rewritten log."""

    id: int
    entry_hash: str

    @classmethod
    def parse(cls, text: str) -> Head:
        """ "ID:HASH" as printed by `str(head)`.

        Raises:
            ValueError: not a positive id, a colon and 64 hex digits.
        """
        entry_id, sep, entry_hash = text.strip().partition(":")
        entry_hash = entry_hash.lower()
        if (
            not sep
            or not entry_id.isdigit()
            or int(entry_id) < 1
            or len(entry_hash) != 64
            or any(c not in "0123456789abcdef" for c in entry_hash)
        ):
            raise ValueError(f"{text!r} is not a head: expected ID:HASH, such as 42:{'ab' * 32}")
        return cls(int(entry_id), entry_hash)

    def __str__(self) -> str:
        return f"{self.id}:{self.entry_hash}"


class TamperKind(enum.Enum):
    """How the first bad entry was tampered with."""

    EDITED = "edited"
    """Its contents or its hash no longer match (or it differs from the recorded head)."""
    REMOVED = "removed"
    """It is missing: an id gap, a broken link, or a log shorter than the recorded head."""
    REORDERED = "reordered"
    """It holds the contents recorded under another id."""


@dataclass(frozen=True, slots=True)
class Problem:
    """The first (lowest id) entry that was tampered with."""

    entry_id: int
    kind: TamperKind
    message: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What `verify_chain` found."""

    entries: int
    """How many entries the log holds."""
    not_covered: int
    """Entries at the start written before the chain existed (not protected)."""
    not_covered_through: int
    """The id of the last of those (0 when there are none)."""
    head: Head | None
    """The last entry, when it is chained."""
    problem: Problem | None
    expected_head: Head | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (`modelyard audit verify --json`)."""

        def head(h: Head | None) -> dict[str, Any] | None:
            return None if h is None else {"id": h.id, "entry_hash": h.entry_hash}

        return {
            "intact": self.intact,
            "entries": self.entries,
            "not_covered": self.not_covered,
            "not_covered_through": self.not_covered_through,
            "head": head(self.head),
            "expected_head": head(self.expected_head),
            "problem": None
            if self.problem is None
            else {
                "entry_id": self.problem.entry_id,
                "kind": self.problem.kind.value,
                "message": self.problem.message,
            },
        }


def verify_chain(entries: Iterable[ChainEntry], *, expected_head: Head | None = None) -> ChainReport:
    """Check a whole audit log and name the first entry (lowest id) that was tampered with.

    Args:
        entries: Every entry of the log, in any order.
        expected_head: A head recorded earlier; the log must still hold that entry with that
            hash (entries added since are fine).
    """
    ordered = sorted(entries, key=lambda e: e.id)
    problem = _chain_problem(ordered)
    if expected_head is not None:
        against_head = _head_problem(ordered, expected_head)
        if against_head is not None and (problem is None or against_head.entry_id < problem.entry_id):
            problem = against_head
    not_covered = 0
    for entry in ordered:
        if entry.chained:
            break
        not_covered += 1
    last = ordered[-1] if ordered else None
    return ChainReport(
        entries=len(ordered),
        not_covered=not_covered,
        not_covered_through=ordered[not_covered - 1].id if not_covered else 0,
        head=Head(last.id, last.entry_hash) if last is not None and last.chained else None,
        problem=problem,
        expected_head=expected_head,
    )


def _missing(first: int, last: int, why: str) -> Problem:
    what = f"entry {first} was" if first == last else f"entries {first} to {last} were"
    return Problem(first, TamperKind.REMOVED, f"{what} removed: {why}")


def _chain_problem(ordered: Sequence[ChainEntry]) -> Problem | None:
    previous: ChainEntry | None = None  # the last chained entry seen
    last_id = 0  # the last id seen, chained or not
    for entry in ordered:
        if previous is None and not entry.chained:
            last_id = entry.id  # written before the chain existed: not covered
            continue
        if not entry.chained:
            assert previous is not None
            return Problem(
                entry.id,
                TamperKind.EDITED,
                f"entry {entry.id} has no hashes although entry {previous.id} before it is chained: "
                "its hashes were cleared (or an older registry wrote it)",
            )
        if compute_hash(entry) != entry.entry_hash:
            moved_from = _recorded_as(entry, ordered)
            if moved_from is not None:
                return Problem(
                    entry.id,
                    TamperKind.REORDERED,
                    f"entry {entry.id} holds the contents recorded as entry {moved_from}: "
                    "entries were reordered",
                )
            return Problem(
                entry.id,
                TamperKind.EDITED,
                f"entry {entry.id} was edited: its contents do not match its hash",
            )
        expected_prev = GENESIS_HASH if previous is None else previous.entry_hash
        gap = entry.id > last_id + 1
        if entry.prev_hash != expected_prev:
            if gap:
                return _missing(
                    last_id + 1, entry.id - 1, f"entry {entry.id} links to an entry that is not in the log"
                )
            blamed = previous.id if previous is not None else last_id
            if previous is None and blamed == 0:
                return Problem(
                    entry.id,
                    TamperKind.EDITED,
                    f"entry {entry.id} is the first entry but links to an earlier one",
                )
            return Problem(
                blamed,
                TamperKind.EDITED,
                f"entry {blamed} was edited: entry {entry.id} recorded a different hash for it",
            )
        if gap and previous is not None:
            # The link is intact: the entries were cut off the end, then the log went on.
            return _missing(
                last_id + 1,
                entry.id - 1,
                f"the ids jump from {last_id} to {entry.id} (the log was cut after entry {last_id} "
                "and later entries were appended)",
            )
        previous = entry
        last_id = entry.id
    return None


def _recorded_as(entry: ChainEntry, ordered: Sequence[ChainEntry]) -> int | None:
    """The id under which this entry's contents were recorded, when it is another entry's
    (moved with its hashes, or moved without them into another entry's hashes)."""
    for other in ordered:
        if other.id == entry.id or not other.chained:
            continue
        with_own_hashes = dataclasses.replace(entry, id=other.id)
        if compute_hash(with_own_hashes) == entry.entry_hash:
            return other.id
        in_its_place = dataclasses.replace(entry, id=other.id, prev_hash=other.prev_hash)
        if compute_hash(in_its_place) == other.entry_hash:
            return other.id
    return None


def _head_problem(ordered: Sequence[ChainEntry], head: Head) -> Problem | None:
    found = next((e for e in ordered if e.id == head.id), None)
    if found is None:
        last = ordered[-1].id if ordered else 0
        if head.id > last:
            return _missing(
                last + 1,
                head.id,
                f"the log ends at entry {last} but the recorded head is entry {head.id}",
            )
        return _missing(head.id, head.id, "it is the recorded head, and it is not in the log")
    if found.entry_hash != head.entry_hash:
        return Problem(
            head.id,
            TamperKind.EDITED,
            f"entry {head.id} does not have the recorded head's hash: the log was rewritten "
            f"at or before entry {head.id}",
        )
    return None
