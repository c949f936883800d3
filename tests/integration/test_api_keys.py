"""The registry's key management over a real key table and a real Redis: hashes only, one
active name, rotation with overlap, revocation, the first admin key."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.access import KeyBook
from modelyard.coordination import CoordinationStore
from modelyard.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from registry_service.api_keys import ApiKeys, KeyStore


@pytest.fixture
async def keys(tmp_path: Path, store: CoordinationStore) -> AsyncIterator[ApiKeys]:
    table = await KeyStore(tmp_path / "keys.sqlite3").open()
    yield ApiKeys(table, store, KeyBook())
    await table.aclose()


async def test_a_key_is_stored_and_published_as_a_hash_only(
    keys: ApiKeys, store: CoordinationStore, tmp_path: Path
) -> None:
    key, token = await keys.create("ci", ["predict:fraud-*", "metadata:*"], created_by="key:admin")
    assert keys.book.authenticate(token).name == "key:ci"
    epoch, published = await store.access_keys()
    assert epoch is not None and epoch >= 1
    record = json.loads(published[key.key_id])
    assert record["grants"] == ["predict:fraud-*", "metadata:*"]
    secret = token.rsplit("_", 1)[1]
    assert secret not in json.dumps(published)
    assert secret.encode() not in (tmp_path / "keys.sqlite3").read_bytes()
    assert stat.S_IMODE((tmp_path / "keys.sqlite3").stat().st_mode) == 0o600


async def test_names_grants_and_unknown_keys_are_checked(keys: ApiKeys) -> None:
    await keys.create("ci", ["predict:*"])
    with pytest.raises(AlreadyExists):
        await keys.create("ci", ["predict:*"])
    with pytest.raises(InvalidArgument, match="unknown verb"):
        await keys.create("other", ["teleport:*"])
    with pytest.raises(InvalidArgument):
        await keys.create("Bad Name", ["predict:*"])
    with pytest.raises(InvalidArgument):
        await keys.create("nogrants", [])
    with pytest.raises(NotFound):
        await keys.revoke("nope")


async def test_rotation_keeps_the_old_key_for_the_overlap_then_refuses_it(keys: ApiKeys) -> None:
    _, old = await keys.create("svc", ["predict:*"], rate_per_s=50.0)
    new_key, new, previous = await keys.rotate("svc", overlap_s=0.4)
    assert new_key.name == "svc" and new_key.rate_per_s == 50.0 and new_key.key_id != previous.key_id
    assert keys.book.authenticate(old).name == keys.book.authenticate(new).name == "key:svc"
    await asyncio.sleep(0.5)
    with pytest.raises(Unauthenticated):
        keys.book.authenticate(old)  # its published expiry is the revoke time
    await keys.revoke("svc")
    with pytest.raises(Unauthenticated):
        keys.book.authenticate(new)
    listed = {k.key_id: k for k in await keys.all_keys()}
    assert all(k.revoked_at for k in listed.values())


async def test_the_first_admin_key_is_made_once_and_written_owner_only(keys: ApiKeys, tmp_path: Path) -> None:
    target = tmp_path / "admin.key"
    token = await keys.bootstrap_admin(token=None, write_to=target)
    assert token is not None and target.read_text() == token
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert keys.book.authenticate(token).allows("registry.write", "anything")
    assert await keys.bootstrap_admin(token=None, write_to=target) is None  # keys exist: nothing made
