"""A write is one statement (main row, history, search rows, change log, audit entry):
everything is there after it, search rows of the previous version are replaced, and a
write after a read in the same transaction is durable again."""

from __future__ import annotations

import orjson
import psycopg

from parcours.fhir.indexing import index_resource
from parcours.security.caller import Caller
from tests.conftest import uniq

SYSTEM = Caller(kind="system", user_id="test-writes", scopes=frozenset({"system/*.*"}), display="test-writes")

async def test_create_and_update_write_every_row(platform, pg_uri) -> None:
    first, second = uniq("Avant"), uniq("Apres")
    async with platform.transaction(SYSTEM) as repo:
        pid = (await repo.create("Patient", {"resourceType": "Patient", "name": [{"family": first}], "birthDate": "1980-02-03"})).stored.id
    async with platform.transaction(SYSTEM) as repo:
        updated = await repo.update("Patient", pid, {"resourceType": "Patient", "id": pid, "name": [{"family": second}]})
    assert updated.stored.version_id == 2
    with psycopg.connect(pg_uri) as conn:
        content, tokens = conn.execute('SELECT content, tokens FROM "Patient" WHERE id = %s', (pid,)).fetchone()

        expected = index_resource(orjson.loads(content), platform.registry, platform.settings.fhir_base)
        assert sorted(tokens) == sorted(expected.tokens)
        side = conn.execute('SELECT code, s, raw, lo, hi, nlo, nhi, sys, unit FROM "Patient_idx" WHERE resource_id = %s',
                            (pid,)).fetchall()
        assert sorted(side, key=repr) == sorted(expected.rows, key=repr)  # the first version's rows are gone
        assert [r[0] for r in conn.execute('SELECT version_id FROM "Patient_history" WHERE id = %s ORDER BY 1', (pid,))] == [1, 2]
        assert [r[0] for r in conn.execute(
            "SELECT method FROM resource_log WHERE resource_type = 'Patient' AND id = %s ORDER BY seq", (pid,))] == ["POST", "PUT"]
        assert [r[0] for r in conn.execute("SELECT action FROM audit_log WHERE resource_id = %s ORDER BY seq", (pid,))] == [
            "create", "update"]
    async with platform.transaction(SYSTEM) as repo:
        assert not (await repo.search(repo.parse_search("Patient", [("family", first)]))).matches
        assert [m.id for m in (await repo.search(repo.parse_search("Patient", [("family", second)]))).matches] == [pid]

async def test_a_write_after_a_read_in_one_transaction_commits_durably(platform) -> None:
    async with platform.transaction(SYSTEM) as repo:
        pid = (await repo.create("Patient", {"resourceType": "Patient", "name": [{"family": uniq("D")}]})).stored.id
    for writer in ("same", "platform"):
        async with platform.transaction(SYSTEM) as repo:
            await repo.read("Patient", pid)
            setting = await (await repo.conn.execute("SELECT current_setting('synchronous_commit')")).fetchone()
            assert setting[0] == "off"  # a read alone commits with group commit
            w = repo if writer == "same" else repo.as_platform()
            current = (await repo.read("Patient", pid)).resource()
            await w.update("Patient", pid, {**current, "active": writer == "same"})
            setting = await (await repo.conn.execute("SELECT current_setting('synchronous_commit')")).fetchone()
            assert setting[0] == "on", writer
