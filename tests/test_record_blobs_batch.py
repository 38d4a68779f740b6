"""Blobs stored by batch (the bulk path): one COPY of their rows, content durable first, each
readable and decrypting with its own id; a ciphertext under another id still does not."""

from __future__ import annotations

import pytest

from parcours.core.errors import ParcoursError
from parcours.services.records.documents import blobs_of
from parcours.store.blobs import Keyring, new_key, seal
from tests.conftest import uniq


async def test_a_batch_of_blobs_and_their_rows(platform) -> None:  # type: ignore[no-untyped-def]
    blobs = blobs_of(platform)
    patient = f"Patient/{uniq('p')}"
    items = [(f"contenu {n} ".encode() * 500, f"texte {n}") for n in range(5)]
    sealed = [seal(blobs.keyring, patient, data, "text/plain", text) for data, text in items]
    owners = {s.id: f"DocumentReference/{uniq('d')}" for s in sealed}
    await blobs.backend.put_many([(s.id, s.data) for s in sealed])
    async with platform.pool.connection() as conn:
        async with conn.transaction():
            await blobs.insert_rows(conn, sealed, platform.clock.now(), owners)
        for s, (data, text) in zip(sealed, items, strict=True):
            info = await blobs.info(conn, s.id)
            assert (info.patient, info.owner, info.size, info.key_id) == (patient, owners[s.id], len(data), blobs.keyring.current)
            assert await blobs.read(conn, info) == data
            assert await blobs.text(conn, s.id) == text
        assert [i.id for i in await blobs.same_content(conn, patient, sealed[2].sha256)] == [sealed[2].id]


def test_the_kept_cipher_still_binds_the_blob_id() -> None:
    kr = Keyring({"a": new_key(), "b": new_key()}, "a", pinned=True)
    stored = kr.encrypt("blob1", b"secret")
    assert kr.decrypt("blob1", stored) == b"secret"
    with pytest.raises(ParcoursError):
        kr.decrypt("blob2", stored)
    kr.current = "b"
    assert kr.decrypt("blob1", kr.encrypt("blob1", b"autre")) == b"autre"
    assert Keyring.key_id_of(kr.encrypt("x", b"y")) == "b"
