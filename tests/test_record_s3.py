"""The S3-compatible blob backend against a local S3 server (moto's, from PyPI): content
stored encrypted, read back, replaced atomically by re-encryption, listed and deleted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from parcours.store import blobs as blob_store
from tests.conftest import free_port

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3_endpoint():  # type: ignore[no-untyped-def]
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


async def test_s3_backend_with_the_blob_store(s3_endpoint: str, platform, monkeypatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    backend = blob_store.S3Blobs("parcours-test", endpoint=s3_endpoint, region="us-east-1", access_key="test", secret_key="test")
    backend.ensure_bucket()
    store = blob_store.BlobStore(platform.settings, platform.blobs.keyring, backend)  # type: ignore[union-attr]
    data = b"%PDF-1.7 compte rendu " * 100
    async with platform.pool.connection() as conn:
        async with conn.transaction(force_rollback=True):
            info = await store.put(conn, patient="Patient/s3", data=data, content_type="application/pdf", text="compte rendu",
                                   now=datetime.now(UTC), owner="DocumentReference/s3")
            raw = backend.client.get_object(Bucket="parcours-test", Key="blobs/" + info.id)["Body"].read()
            assert raw.startswith(blob_store.MAGIC) and b"compte rendu" not in raw
            assert await store.read(conn, await store.info(conn, info.id)) == data
            assert await store.text(conn, info.id) == "compte rendu"
            assert info.id in await backend.names(datetime.now(UTC) + timedelta(minutes=1))
            await backend.delete(info.id)
            from parcours.core.errors import Gone

            with pytest.raises(Gone):
                await backend.get(info.id)
