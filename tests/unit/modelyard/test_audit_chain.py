"""The audit log's hash chain as pure functions: the canonical encoding, sealing, and the
verifier naming the first entry that was edited, removed or reordered."""

from __future__ import annotations

import dataclasses
import random

import pytest

from modelyard.audit_chain import (
    GENESIS_HASH,
    ChainEntry,
    Head,
    TamperKind,
    canonical_bytes,
    compute_hash,
    micros,
    seal,
    unix_seconds,
    verify_chain,
)

T0 = 1_760_000_000_000_000  # microseconds


def entry(entry_id: int, **fields: object) -> ChainEntry:
    values: dict[str, object] = {
        "id": entry_id,
        "time_us": T0 + entry_id * 1_234_567,
        "actor": "alice",
        "method": "SetAlias",
        "model": "demo",
        "target": f"alias production -> {entry_id}",
        "request_id": f"req-{entry_id}",
        "outcome": "OK",
        "error_reason": "",
        "message": f"moved {entry_id}",
        **fields,
    }
    return ChainEntry(**values)  # type: ignore[arg-type]


def chain(count: int, *, first_id: int = 1, prev_hash: str = GENESIS_HASH) -> list[ChainEntry]:
    entries: list[ChainEntry] = []
    for entry_id in range(first_id, first_id + count):
        sealed = seal(entry(entry_id), prev_hash)
        entries.append(sealed)
        prev_hash = sealed.entry_hash
    return entries


def test_the_encoding_is_canonical_compact_json_with_every_field() -> None:
    e = entry(7, message='quote " and ünïcode\n', actor="bob")
    assert canonical_bytes(e) == (
        b'{"actor":"bob","error_reason":"","id":7,"message":"quote \\" and \\u00fcn\\u00efcode\\n",'
        b'"method":"SetAlias","model":"demo","outcome":"OK","request_id":"req-7",'
        b'"target":"alias production -> 7","time_us":1760000008641969,"v":1}'
    )
    # The hashes themselves are not part of the encoding.
    assert canonical_bytes(
        dataclasses.replace(e, prev_hash="a" * 64, entry_hash="b" * 64)
    ) == canonical_bytes(e)


@pytest.mark.parametrize(
    "change",
    [
        {"id": 8},
        {"time_us": T0 + 1},
        {"actor": "mallory"},
        {"method": "CreateModel"},
        {"model": "other"},
        {"target": "version 1"},
        {"request_id": "x"},
        {"outcome": "ABORTED"},
        {"error_reason": "CONFLICT"},
        {"message": ""},
        {"prev_hash": "1" * 64},
    ],
)
def test_every_recorded_field_and_the_link_change_the_hash(change: dict[str, object]) -> None:
    e = dataclasses.replace(entry(7), prev_hash=GENESIS_HASH)
    assert compute_hash(dataclasses.replace(e, **change)) != compute_hash(e)  # type: ignore[arg-type]


def test_moving_text_between_fields_changes_the_hash() -> None:
    a = entry(1, actor="ab", method="c")
    b = entry(1, actor="a", method="bc")
    assert compute_hash(a) != compute_hash(b)


def test_seal_links_to_the_previous_hash() -> None:
    first, second = chain(2)
    assert first.prev_hash == GENESIS_HASH and len(first.entry_hash) == 64
    assert second.prev_hash == first.entry_hash
    assert second.entry_hash == compute_hash(dataclasses.replace(second, entry_hash=""))


def test_microseconds_round_trip_through_a_double() -> None:
    rng = random.Random(18)
    for time_us in [0, 1, T0, 2**52, *(rng.randrange(0, 4_102_444_800_000_000) for _ in range(20_000))]:
        assert micros(unix_seconds(time_us)) == time_us


def test_an_intact_chain_and_an_empty_log_verify() -> None:
    entries = chain(5)
    report = verify_chain(reversed(entries))  # newest first, as ListAuditEntries pages them
    assert report.intact and report.problem is None
    assert (report.entries, report.not_covered) == (5, 0)
    assert report.head == Head(5, entries[-1].entry_hash)
    empty = verify_chain([])
    assert empty.intact and empty.head is None and empty.entries == 0


def test_entries_from_before_the_chain_are_not_covered_not_tampering() -> None:
    legacy = [entry(i) for i in (1, 2, 3)]
    entries = [*legacy, *chain(2, first_id=4)]
    report = verify_chain(entries)
    assert report.intact, report.problem
    assert (report.not_covered, report.not_covered_through) == (3, 3)
    assert report.to_dict()["not_covered"] == 3
    # Unchained entries are not checked at all, even if edited.
    assert verify_chain([dataclasses.replace(legacy[0], actor="x"), *entries[1:]]).intact


def test_an_edited_entry_is_named() -> None:
    entries = chain(5)
    entries[2] = dataclasses.replace(entries[2], message="nothing happened")
    problem = verify_chain(entries).problem
    assert problem is not None
    assert (problem.entry_id, problem.kind) == (3, TamperKind.EDITED)
    assert "entry 3 was edited" in problem.message


def test_an_entry_rehashed_after_an_edit_is_named_by_the_next_link() -> None:
    entries = chain(5)
    edited = dataclasses.replace(entries[1], actor="mallory")
    entries[1] = seal(edited, edited.prev_hash)
    problem = verify_chain(entries).problem
    assert problem is not None and (problem.entry_id, problem.kind) == (2, TamperKind.EDITED)
    assert "entry 3 recorded a different hash" in problem.message


def test_a_cleared_hash_after_the_chain_started_is_tampering() -> None:
    entries = chain(4)
    entries[2] = dataclasses.replace(entries[2], prev_hash="", entry_hash="")
    problem = verify_chain(entries).problem
    assert problem is not None and (problem.entry_id, problem.kind) == (3, TamperKind.EDITED)
    # Cleared on the first entry, it looks not covered, but the next link gives it away.
    entries = chain(4)
    entries[0] = dataclasses.replace(entries[0], prev_hash="", entry_hash="")
    problem = verify_chain(entries).problem
    assert problem is not None and (problem.entry_id, problem.kind) == (1, TamperKind.EDITED)


@pytest.mark.parametrize(("removed", "first_missing"), [([2], 2), ([1], 1), ([2, 3, 4], 2)])
def test_removed_entries_are_named(removed: list[int], first_missing: int) -> None:
    entries = [e for e in chain(6) if e.id not in removed]
    problem = verify_chain(entries).problem
    assert problem is not None and (problem.entry_id, problem.kind) == (first_missing, TamperKind.REMOVED)


def test_a_cut_tail_then_new_entries_shows_as_a_gap() -> None:
    entries = chain(5)[:3]  # 4 and 5 deleted; the store then links 6 to 3
    entries += chain(2, first_id=6, prev_hash=entries[-1].entry_hash)
    problem = verify_chain(entries).problem
    assert problem is not None and (problem.entry_id, problem.kind) == (4, TamperKind.REMOVED)
    assert "entries 4 to 5 were removed" in problem.message


@pytest.mark.parametrize("with_hashes", [True, False])
def test_swapped_entries_are_named_as_reordered(with_hashes: bool) -> None:
    entries = chain(5)
    fields = [f.name for f in dataclasses.fields(ChainEntry) if f.name != "id"]
    if not with_hashes:
        fields = [f for f in fields if f not in ("prev_hash", "entry_hash")]
    a, b = entries[1], entries[3]
    entries[1] = dataclasses.replace(a, **{f: getattr(b, f) for f in fields})
    entries[3] = dataclasses.replace(b, **{f: getattr(a, f) for f in fields})
    problem = verify_chain(entries).problem
    assert problem is not None and (problem.entry_id, problem.kind) == (2, TamperKind.REORDERED)
    assert "recorded as entry 4" in problem.message


def test_a_cut_tail_is_caught_only_against_a_recorded_head() -> None:
    entries = chain(5)
    head = Head(5, entries[-1].entry_hash)
    assert verify_chain(entries[:4]).intact
    report = verify_chain(entries[:4], expected_head=head)
    assert report.problem is not None
    assert (report.problem.entry_id, report.problem.kind) == (5, TamperKind.REMOVED)
    assert "the log ends at entry 4 but the recorded head is entry 5" in report.problem.message
    # Entries appended after the recorded head are fine.
    assert verify_chain(entries, expected_head=Head(3, entries[2].entry_hash)).intact


def test_a_log_rewritten_with_every_hash_recomputed_is_caught_only_against_a_head() -> None:
    original = chain(4)
    rewritten = [dataclasses.replace(e, actor="mallory") for e in original]
    prev = GENESIS_HASH
    for i, e in enumerate(rewritten):
        rewritten[i] = seal(e, prev)
        prev = rewritten[i].entry_hash
    assert verify_chain(rewritten).intact
    report = verify_chain(rewritten, expected_head=Head(4, original[-1].entry_hash))
    assert report.problem is not None and (report.problem.entry_id, report.problem.kind) == (
        4,
        TamperKind.EDITED,
    )


def test_the_lowest_problem_wins_over_the_head() -> None:
    entries = chain(5)
    head = Head(5, entries[-1].entry_hash)
    entries[1] = dataclasses.replace(entries[1], actor="mallory")
    report = verify_chain(entries[:4], expected_head=head)
    assert report.problem is not None and report.problem.entry_id == 2


def test_a_head_parses_and_prints_as_id_colon_hash() -> None:
    head = Head.parse(f" 12:{'AB' * 32} ")
    assert head == Head(12, "ab" * 32) and str(head) == f"12:{'ab' * 32}"
    for bad in ("12", f"0:{'ab' * 32}", "x:" + "ab" * 32, "12:abc", f"12:{'zz' * 32}"):
        with pytest.raises(ValueError, match="ID:HASH"):
            Head.parse(bad)
