"""Encrypted blob storage: the content of the shared record's documents.

A blob is stored twice over: its bytes, encrypted, in a backend (a local folder under
``$PARCOURS_HOME/blobs`` by default, or an S3-compatible bucket), and one row of
``record_blob`` written in the caller's transaction (patient, checksum and size of the
plaintext, media type, the key id, and the extracted text, encrypted the same way).

Each blob has a random id, never derived from its content: two patients' identical
files are two blobs, and an id says nothing about what it holds. The SHA-256 of the
plaintext is kept to detect exact duplicates within one patient's record.

Encryption is AES-256-GCM with a fresh 96-bit nonce per write; the blob id is the
associated data, so a ciphertext moved under another id does not decrypt. The stored
form names its key: ``PRCB1`` + key id length (1 byte) + key id + nonce + ciphertext.
Readers take the key from that header, not from the row, so a blob re-encrypted under
a new key while someone reads it decrypts either way: rotation needs no downtime.

Keys come from the settings (``record_keys`` and ``record_key_id``); when none are set
(development) they are generated into ``platform_secret`` as ``record-key:<id>``, the
current one named by ``record-key-current``. ``parcours keys rotate`` makes a new key
current (or switches to the one the settings name) and re-encrypts older blobs in
batches (:meth:`BlobStore.reencrypt_batch`, ``FOR UPDATE SKIP LOCKED``): processes
pick up the new current key within ``record_key_refresh_seconds`` and load any key id
they do not know from the database when they meet it.

The object is written before its row; if the transaction then rolls back the object is
an orphan nobody can name (``sweep_orphans`` removes those older than an hour).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import hashlib
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg import AsyncConnection
from sqlalchemy import BigInteger, Column, DateTime, Index, LargeBinary, MetaData, Table, Text, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from parcours.core.errors import Gone, NotFound, ParcoursError
from parcours.core.settings import Settings
from parcours.store.schema import platform_secret
from parcours.store.sql import compile_stmt

MAGIC = b"PRCB1"
NONCE = 12
CURRENT_SECRET = "record-key-current"
KEY_PREFIX = "record-key:"

_local = MetaData()
# Kept out of ``schema.metadata``: revision 0009_record creates it.
record_blob = Table(
    "record_blob",
    _local,
    Column("id", Text, primary_key=True),
    Column("patient", Text, nullable=False),  # "Patient/123": whose record the content belongs to
    Column("owner", Text),  # the resource that presents it: "DocumentReference/abc"
    Column("sha256", Text, nullable=False),  # of the plaintext
    Column("size", BigInteger, nullable=False),  # of the plaintext
    Column("content_type", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("text_enc", LargeBinary),  # extracted text, encrypted like the content
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("erased_at", DateTime(timezone=True)),  # content destroyed (a patient deleted their own upload)
    Index("record_blob_patient_sha", "patient", "sha256"),
    Index("record_blob_key", "key_id"),
    Index("record_blob_owner", "owner"),
)


def new_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _unb64(value: str) -> bytes:
    key = base64.b64decode(value.strip())
    if len(key) != 32:
        raise ParcoursError("A record key must be 32 bytes (base64)", status=500, code="PRC-1510")
    return key


class Keyring:
    """The keys of one process: encrypts with the current key, decrypts with any."""

    def __init__(self, keys: dict[str, bytes], current: str, *, pinned: bool) -> None:
        if current not in keys:
            raise ParcoursError(f"The current record key {current!r} is not among the keys", status=500, code="PRC-1510")
        self.keys = dict(keys)
        self.current = current
        self.pinned = pinned  # the settings name the current key: the database does not change it
        self._checked = time.monotonic()
        self._ciphers: dict[tuple[str, bytes], AESGCM] = {}

    def _cipher(self, kid: str) -> AESGCM:
        """The AES-GCM context of a key, made once (its key schedule) and kept with the key."""
        key = self.keys[kid]
        c = self._ciphers.get((kid, key))
        if c is None:
            c = self._ciphers[(kid, key)] = AESGCM(key)
        return c

    def encrypt(self, blob_id: str, data: bytes, key_id: str | None = None) -> bytes:
        kid = key_id or self.current
        nonce = os.urandom(NONCE)
        head = MAGIC + bytes([len(kid)]) + kid.encode()
        return head + nonce + self._cipher(kid).encrypt(nonce, data, blob_id.encode())

    @staticmethod
    def key_id_of(stored: bytes) -> str:
        if not stored.startswith(MAGIC) or len(stored) < len(MAGIC) + 1:
            raise ParcoursError("A stored blob is not in the expected format", status=500, code="PRC-1511")
        n = stored[len(MAGIC)]
        return stored[len(MAGIC) + 1: len(MAGIC) + 1 + n].decode()

    def decrypt(self, blob_id: str, stored: bytes) -> bytes:
        kid = self.key_id_of(stored)
        start = len(MAGIC) + 1 + len(kid.encode())
        nonce, ct = stored[start:start + NONCE], stored[start + NONCE:]
        try:
            return self._cipher(kid).decrypt(nonce, ct, blob_id.encode())
        except Exception as e:  # InvalidTag: tampered, or stored under another id
            raise ParcoursError(f"Blob {blob_id} does not decrypt: it was altered or moved", status=500,
                                code="PRC-1512") from e


async def _secrets(conn: AsyncConnection, names: Iterable[str] | None = None, prefix: str | None = None) -> dict[str, str]:
    t = platform_secret
    stmt = select(t.c.name, t.c.value)
    if prefix is not None:
        stmt = stmt.where(t.c.name.startswith(prefix))
    elif names is not None:
        stmt = stmt.where(t.c.name.in_(list(names)))
    sql, params = compile_stmt(stmt)
    return {r[0]: r[1] for r in await (await conn.execute(sql, params)).fetchall()}


async def _put_secret(conn: AsyncConnection, name: str, value: str, *, replace: bool = False) -> None:
    stmt = pg_insert(platform_secret).values(name=name, value=value)
    stmt = stmt.on_conflict_do_update(index_elements=["name"], set_={"value": value}) if replace else stmt.on_conflict_do_nothing()
    sql, params = compile_stmt(stmt)
    await conn.execute(sql, params)


async def load_keyring(conn: AsyncConnection, settings: Settings) -> Keyring:
    """The keys of the settings and of the database; the current one, created when there is none."""
    keys = {k: _unb64(v) for k, v in settings.record_keys.items()}
    stored = await _secrets(conn, prefix=KEY_PREFIX)
    for name, value in stored.items():
        keys.setdefault(name[len(KEY_PREFIX):], _unb64(value))
    if settings.record_keys:
        current = settings.record_key_id or (next(iter(settings.record_keys)) if len(settings.record_keys) == 1 else None)
        if current is None:
            raise ParcoursError("Several record keys are set: PARCOURS_RECORD_KEY_ID must say which one encrypts new content",
                                status=500, code="PRC-1510")
        return Keyring(keys, current, pinned=True)
    cur = (await _secrets(conn, names=[CURRENT_SECRET])).get(CURRENT_SECRET)
    if cur is None or cur not in keys:
        kid = "k" + datetime.now().strftime("%Y%m%d") + "-" + secrets.token_hex(3)
        await _put_secret(conn, KEY_PREFIX + kid, _b64(new_key()))
        await _put_secret(conn, CURRENT_SECRET, kid)  # first one wins: read back below
        cur = (await _secrets(conn, names=[CURRENT_SECRET]))[CURRENT_SECRET]
        keys.update({n[len(KEY_PREFIX):]: _unb64(v) for n, v in (await _secrets(conn, prefix=KEY_PREFIX)).items()})
    return Keyring(keys, cur, pinned=False)


async def rotate_key(conn: AsyncConnection, settings: Settings) -> str:
    """Make a new key current (database keys); returns its id. With keys in the settings the
    operator adds the new key there and names it in ``record_key_id`` instead."""
    if settings.record_keys:
        raise ParcoursError("The record keys come from the settings: add the new key to PARCOURS_RECORD_KEYS, name it in "
                            "PARCOURS_RECORD_KEY_ID, restart, then run `parcours keys rotate` to re-encrypt", status=400,
                            code="PRC-1513")
    kid = "k" + datetime.now().strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)
    await _put_secret(conn, KEY_PREFIX + kid, _b64(new_key()))
    await _put_secret(conn, CURRENT_SECRET, kid, replace=True)
    return kid


# -- backends ----------------------------------------------------------------------------------------

class BlobBackend(Protocol):
    """Where encrypted blobs live; names are blob ids."""

    async def put(self, name: str, data: bytes) -> None: ...

    async def put_many(self, items: list[tuple[str, bytes]]) -> None: ...

    async def get(self, name: str) -> bytes: ...

    async def delete(self, name: str) -> None: ...

    async def names(self, older_than: datetime) -> list[str]: ...


def _syncfs() -> Any:
    """Linux ``syncfs(2)``: flush one file system (data and metadata) in one call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
        fn.argtypes = [ctypes.c_int]
        return fn
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs()


class LocalBlobs:
    """A folder: ``ab/cd/<id>``; each write is a temporary file, fsync'ed, renamed into place,
    its folder fsync'ed: a blob is whole or absent, and durable once ``put`` returns."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        if not name.isalnum():
            raise NotFound(f"No blob {name!r}")
        return self.root / name[:2] / name[2:4] / name

    def _write(self, items: list[tuple[str, bytes]]) -> None:
        """Write, rename into place, then make it all durable before returning.

        A blob that replaces another (re-encryption) is fsync'ed before its rename, so a
        crash never leaves an empty file where good content was. New blobs are made
        durable together by one ``syncfs`` of the folder's file system (thousands of
        fsyncs cost far more); until it returns no row names them, so a crash before it
        leaves at most orphans for ``sweep_orphans``."""
        dirs: set[Path] = set()
        fds: list[tuple[int, Path, Path]] = []
        batch = _SYNCFS is not None and len(items) > 1
        try:
            for name, data in items:
                path = self._path(name)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                fds.append((fd, tmp, path))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            for fd, tmp, path in fds:
                if not batch or path.exists():
                    os.fsync(fd)
                os.close(fd)
                os.replace(tmp, path)
                dirs.add(path.parent)
            fds = []
            if batch:
                rfd = os.open(self.root, os.O_RDONLY)
                try:
                    if _SYNCFS(rfd) != 0:  # type: ignore[misc]
                        raise OSError(ctypes.get_errno(), "syncfs failed")
                finally:
                    os.close(rfd)
                return
            for d in dirs:
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        finally:
            for fd, tmp, _ in fds:
                os.close(fd)
                tmp.unlink(missing_ok=True)

    async def put(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, [(name, data)])

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        await asyncio.to_thread(self._write, items)

    def put_many_sync(self, items: list[tuple[str, bytes]]) -> None:
        self._write(items)

    def _read(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise Gone(f"The content of blob {name} is gone") from None

    async def get(self, name: str) -> bytes:
        return await asyncio.to_thread(self._read, name)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(lambda: self._path(name).unlink(missing_ok=True))

    async def names(self, older_than: datetime) -> list[str]:
        limit = older_than.timestamp()

        def walk() -> list[str]:
            out = []
            if not self.root.exists():
                return out
            for p in self.root.glob("*/*/*"):
                if p.name.startswith("."):
                    if p.stat().st_mtime < limit:  # a temporary file a crash left behind
                        p.unlink(missing_ok=True)
                    continue
                if p.stat().st_mtime < limit:
                    out.append(p.name)
            return out

        return await asyncio.to_thread(walk)


class S3Blobs:
    """An S3-compatible bucket (boto3 in worker threads). PUT replaces an object atomically."""

    def __init__(self, bucket: str, *, endpoint: str | None, region: str, access_key: str | None, secret_key: str | None,
                 prefix: str = "blobs/") -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access_key,
                                   aws_secret_access_key=secret_key,
                                   config=Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32))

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            self.client.create_bucket(Bucket=self.bucket)

    async def put(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self.client.put_object, Bucket=self.bucket, Key=self.prefix + name, Body=data)

    async def put_many(self, items: list[tuple[str, bytes]]) -> None:
        await asyncio.gather(*(self.put(n, d) for n, d in items))

    async def get(self, name: str) -> bytes:
        def read() -> bytes:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise Gone(f"The content of blob {name} is gone") from None

        return await asyncio.to_thread(read)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=self.prefix + name)

    async def names(self, older_than: datetime) -> list[str]:
        def walk() -> list[str]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    if obj["LastModified"] < older_than:
                        out.append(obj["Key"][len(self.prefix):])
            return out

        return await asyncio.to_thread(walk)


def backend_from_settings(settings: Settings) -> BlobBackend:
    if settings.record_s3_bucket:
        return S3Blobs(settings.record_s3_bucket, endpoint=settings.record_s3_endpoint, region=settings.record_s3_region,
                       access_key=settings.record_s3_access_key, secret_key=settings.record_s3_secret_key)
    return LocalBlobs(settings.record_blob_dir or settings.resolved_home() / "blobs")


# -- the store --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlobInfo:
    id: str
    patient: str
    owner: str | None
    sha256: str
    size: int
    content_type: str
    key_id: str
    created_at: datetime
    erased_at: datetime | None


_COLS = (record_blob.c.id, record_blob.c.patient, record_blob.c.owner, record_blob.c.sha256, record_blob.c.size,
         record_blob.c.content_type, record_blob.c.key_id, record_blob.c.created_at, record_blob.c.erased_at)


def new_blob_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Sealed:
    """A blob encrypted and ready to store (plain data: built in worker processes by the bulk path)."""

    id: str
    patient: str
    sha256: str
    size: int
    content_type: str
    key_id: str
    data: bytes
    text_enc: bytes | None


def seal(keyring: Keyring, patient: str, data: bytes, content_type: str, text: str | None, blob_id: str | None = None) -> Sealed:
    bid = blob_id or new_blob_id()
    return Sealed(bid, patient, hashlib.sha256(data).hexdigest(), len(data), content_type, keyring.current,
                  keyring.encrypt(bid, data), keyring.encrypt(bid + ":text", text.encode()) if text else None)


class BlobStore:
    """Blobs of one process: its keyring and backend. SQL runs on the caller's connection,
    inside the caller's transaction; nothing here commits."""

    def __init__(self, settings: Settings, keyring: Keyring, backend: BlobBackend) -> None:
        self.settings = settings
        self.keyring = keyring
        self.backend = backend

    @classmethod
    async def open(cls, settings: Settings, conn: AsyncConnection, backend: BlobBackend | None = None) -> "BlobStore":
        return cls(settings, await load_keyring(conn, settings), backend or backend_from_settings(settings))

    async def refresh(self, conn: AsyncConnection, *, force: bool = False) -> None:
        """Follow a rotation made by another process (database keys only)."""
        kr = self.keyring
        if kr.pinned or (not force and time.monotonic() - kr._checked < self.settings.record_key_refresh_seconds):
            return
        kr._checked = time.monotonic()
        cur = (await _secrets(conn, names=[CURRENT_SECRET])).get(CURRENT_SECRET)
        if cur and cur != kr.current:
            await self._load_key(conn, cur)
            kr.current = cur

    async def _load_key(self, conn: AsyncConnection, kid: str) -> None:
        if kid in self.keyring.keys:
            return
        value = (await _secrets(conn, names=[KEY_PREFIX + kid])).get(KEY_PREFIX + kid)
        if value is None:
            raise ParcoursError(f"Record key {kid!r} is unknown to this process and to the database", status=500, code="PRC-1510")
        self.keyring.keys[kid] = _unb64(value)

    async def put(self, conn: AsyncConnection, *, patient: str, data: bytes, content_type: str, text: str | None,
                  now: datetime, owner: str | None = None, blob_id: str | None = None) -> BlobInfo:
        await self.refresh(conn)
        s = seal(self.keyring, patient, data, content_type, text, blob_id)
        await self.backend.put(s.id, s.data)
        await self.insert_rows(conn, [s], now, owners={s.id: owner} if owner else None)
        return BlobInfo(s.id, patient, owner, s.sha256, s.size, content_type, s.key_id, now, None)

    async def insert_rows(self, conn: AsyncConnection, sealed: list[Sealed], now: datetime,
                          owners: dict[str, str] | None = None) -> None:
        if not sealed:
            return
        b = record_blob
        columns = "id, patient, owner, sha256, size, content_type, key_id, text_enc, created_at"
        rows = [(s.id, s.patient, (owners or {}).get(s.id), s.sha256, s.size, s.content_type, s.key_id, s.text_enc, now)
                for s in sealed]
        async with conn.cursor() as cur:
            if len(rows) == 1:
                await cur.execute(f"INSERT INTO {b.name} ({columns}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", rows[0])
                return
            # Many rows (a batch of the bulk path): one COPY, not one INSERT each.
            async with cur.copy(f"COPY {b.name} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    await copy.write_row(row)

    async def set_owner(self, conn: AsyncConnection, blob_id: str, owner: str) -> None:
        sql, params = compile_stmt(update(record_blob).where(record_blob.c.id == blob_id).values(owner=owner))
        await conn.execute(sql, params)

    async def info(self, conn: AsyncConnection, blob_id: str) -> BlobInfo:
        sql, params = compile_stmt(select(*_COLS).where(record_blob.c.id == blob_id))
        row = await (await conn.execute(sql, params)).fetchone()
        if row is None:
            raise NotFound(f"No content {blob_id!r}")
        return BlobInfo(*row)

    async def same_content(self, conn: AsyncConnection, patient: str, sha256: str) -> list[BlobInfo]:
        sql, params = compile_stmt(select(*_COLS).where(record_blob.c.patient == patient, record_blob.c.sha256 == sha256,
                                                        record_blob.c.erased_at.is_(None)).order_by(record_blob.c.created_at))
        return [BlobInfo(*r) for r in await (await conn.execute(sql, params)).fetchall()]

    async def read(self, conn: AsyncConnection, info: BlobInfo) -> bytes:
        if info.erased_at is not None:
            raise Gone("This content was erased at the patient's request")
        stored = await self.backend.get(info.id)
        await self._load_key(conn, Keyring.key_id_of(stored))
        return self.keyring.decrypt(info.id, stored)

    async def text(self, conn: AsyncConnection, blob_id: str) -> str | None:
        sql, params = compile_stmt(select(record_blob.c.text_enc).where(record_blob.c.id == blob_id))
        row = await (await conn.execute(sql, params)).fetchone()
        if row is None or row[0] is None:
            return None
        stored = bytes(row[0])
        await self._load_key(conn, Keyring.key_id_of(stored))
        return self.keyring.decrypt(blob_id + ":text", stored).decode()

    async def erase(self, conn: AsyncConnection, blob_id: str, now: datetime) -> None:
        """Mark the content destroyed; :meth:`purge` removes the object after commit."""
        sql, params = compile_stmt(update(record_blob).where(record_blob.c.id == blob_id).values(erased_at=now, text_enc=None))
        await conn.execute(sql, params)

    async def purge(self, blob_ids: Iterable[str]) -> None:
        for bid in blob_ids:
            await self.backend.delete(bid)

    async def pending_rotation(self, conn: AsyncConnection) -> dict[str, int]:
        """How many blobs each key encrypts (what a rotation has left to do)."""
        sql = f"SELECT key_id, count(*) FROM {record_blob.name} WHERE erased_at IS NULL GROUP BY key_id"
        return {r[0]: r[1] for r in await (await conn.execute(sql)).fetchall()}

    async def reencrypt_batch(self, conn: AsyncConnection, limit: int = 200) -> int:
        """Re-encrypt up to ``limit`` blobs not under the current key; returns how many.
        Rows are locked ``SKIP LOCKED``: several processes may share the work."""
        await self.refresh(conn, force=True)
        kr = self.keyring
        b = record_blob
        stmt = (select(b.c.id, b.c.text_enc).where(b.c.key_id != kr.current, b.c.erased_at.is_(None))
                .limit(limit).with_for_update(skip_locked=True))
        sql, params = compile_stmt(stmt)
        rows = await (await conn.execute(sql, params)).fetchall()
        done = 0
        for bid, text_enc in rows:
            try:
                stored = await self.backend.get(bid)
            except Gone:
                continue  # an orphan row of a lost object: nothing to re-encrypt
            await self._load_key(conn, Keyring.key_id_of(stored))
            await self.backend.put(bid, kr.encrypt(bid, kr.decrypt(bid, stored)))
            new_text = None
            if text_enc is not None:
                te = bytes(text_enc)
                await self._load_key(conn, Keyring.key_id_of(te))
                new_text = kr.encrypt(bid + ":text", kr.decrypt(bid + ":text", te))
            sql2, params2 = compile_stmt(update(b).where(b.c.id == bid).values(key_id=kr.current, text_enc=new_text))
            await conn.execute(sql2, params2)
            done += 1
        return done

    async def sweep_orphans(self, conn: AsyncConnection, now: datetime, age: timedelta = timedelta(hours=1)) -> int:
        """Delete objects that no row names (their transaction rolled back) or whose row was erased."""
        names = await self.backend.names(now - age)
        if not names:
            return 0
        sql, params = compile_stmt(select(record_blob.c.id).where(record_blob.c.id.in_(names), record_blob.c.erased_at.is_(None)))
        live = {r[0] for r in await (await conn.execute(sql, params)).fetchall()}
        gone = [n for n in names if n not in live]
        await self.purge(gone)
        return len(gone)


__all__ = ["BlobStore", "BlobInfo", "Keyring", "LocalBlobs", "S3Blobs", "Sealed", "seal", "record_blob", "rotate_key",
           "load_keyring", "new_blob_id", "Any"]
