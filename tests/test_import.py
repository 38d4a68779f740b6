"""``parcours import``: Bundles and NDJSON loaded through the bulk path, resumably.

The command runs as users run it (Typer's runner, ``DATABASE_URL`` pointing at the
test database); what it stored is then read back through the FHIR API. Each test
imports its own copies of the fixtures, made unique by ``uniq()``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from parcours.cli.main import app
from parcours.store import bulk
from tests.conftest import FIXTURES, SHARED, uniq

HERE = FIXTURES / "import"
TAG = "urn:parcours:test"
SYNTHEA = SHARED / "synthea-r4-smart"


class SimulatedCrash(Exception):
    """Stands for the process being killed: nothing in the importer catches it."""


def _ours(writer: bulk.BulkWriter, u: str) -> bool:
    """Whether the writer holds resources of this test (the platform's own background
    work, such as the audit trail, writes in bulk too)."""
    return any(u.encode() in b.rows for b in writer._pending)  # noqa: SLF001


def _copy(tmp_path: Path, name: str, u: str, *, as_name: str | None = None) -> Path:
    out = tmp_path / (as_name or name)
    out.write_text((HERE / name).read_text(encoding="utf-8").replace("__UNIQ__", u), encoding="utf-8")
    return out


async def _cli(pg_uri: str, *args: str | Path) -> tuple[int, str, BaseException | None]:
    def run() -> tuple[int, str, BaseException | None]:
        r = CliRunner().invoke(app, ["import", *map(str, args)], env={"DATABASE_URL": pg_uri})
        exc = r.exception if r.exception and not isinstance(r.exception, SystemExit) else None
        return r.exit_code, r.output, exc

    return await asyncio.to_thread(run)


async def _import(pg_uri: str, tmp_path: Path, *args: str | Path) -> tuple[int, dict, str]:
    report = tmp_path / f"report-{uniq()}.json"
    code, output, exc = await _cli(pg_uri, *args, "--report", report)
    assert exc is None, output
    return code, orjson.loads(report.read_bytes()), output


async def _ids(client, rtype: str, u: str, **params: str) -> list[str]:  # type: ignore[no-untyped-def]
    r = await client.get(f"/fhir/{rtype}", params={"_tag": f"{TAG}|{u}", "_count": "100", **params})
    assert r.status_code == 200, r.text
    return sorted(e["resource"]["id"] for e in r.json().get("entry", []))


async def _resources(client, rtype: str, u: str, **params: str) -> list[dict]:  # type: ignore[no-untyped-def]
    r = await client.get(f"/fhir/{rtype}", params={"_tag": f"{TAG}|{u}", "_count": "100", **params})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


async def test_transaction_bundle_gets_new_ids_and_rewritten_references(client, pg_uri: str, tmp_path: Path) -> None:
    u = uniq("imp")
    path = _copy(tmp_path, "transaction.json", u)
    code, report, output = await _import(pg_uri, tmp_path, path)
    assert code == 0, output
    (f,) = report["files"]
    assert (f["status"], f["resources"], f["errors"]) == ("imported", 5, [])
    assert f["counts"] == {"Encounter": 1, "Observation": 2, "Patient": 1, "Practitioner": 1}
    assert report["totals"]["resources"] == 5

    (patient,) = await _resources(client, "Patient", u, identifier=f"urn:parcours:test:patient|{u}")
    pid = patient["id"]
    assert pid != "ignored-on-create" and patient["meta"]["versionId"] == "1"
    observations = await _resources(client, "Observation", u, subject=f"Patient/{pid}")
    assert len(observations) == 2
    (encounter,) = await _resources(client, "Encounter", u, subject=f"Patient/{pid}")
    heart = next(o for o in observations if o["code"]["coding"][0]["code"] == "8867-4")
    # PUT Practitioner/<id>: the urn:uuid of that entry becomes Practitioner/<id>.
    assert heart["encounter"] == {"reference": f"Encounter/{encounter['id']}"}
    assert heart["performer"] == [{"reference": f"Practitioner/{u}-gp"}]
    assert encounter["participant"][0]["individual"] == {"reference": f"Practitioner/{u}-gp"}
    r = await client.get(f"/fhir/Practitioner/{u}-gp")
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "1"
    # Indexed like any other write: search by value, by compartment, by text.
    assert await _ids(client, "Observation", u, **{"value-quantity": "gt70"}) == [heart["id"]]
    r = await client.get(f"/fhir/Patient/{pid}/$everything")
    assert {e["resource"]["resourceType"] for e in r.json()["entry"]} >= {"Patient", "Encounter", "Observation"}
    assert await _ids(client, "Patient", u, name="helene") == [pid]
    # History, the change log and the audit trail know them too.
    r = await client.get(f"/fhir/Observation/{heart['id']}/_history")
    assert [e["resource"]["meta"]["versionId"] for e in r.json()["entry"]] == ["1"]
    with psycopg.connect(pg_uri) as conn:
        assert conn.execute("SELECT method FROM resource_log WHERE id = %s", (pid,)).fetchall() == [("POST",)]
        assert conn.execute("SELECT action, agent_kind, patients FROM audit_log WHERE resource_id = %s AND action IN ('create', 'update')",
                            (heart["id"],)).fetchall() == [("create", "system", [f"Patient/{pid}"])]


async def test_invalid_entry_fails_the_whole_transaction(client, pg_uri: str, tmp_path: Path) -> None:
    u = uniq("imp")
    bad = _copy(tmp_path, "invalid-transaction.json", u)
    good = _copy(tmp_path, "collection.json", u)
    code, report, output = await _import(pg_uri, tmp_path, bad, good)
    assert code == 1, output
    files = {Path(f["path"]).name: f for f in report["files"]}
    failed = files["invalid-transaction.json"]
    assert failed["status"] == "failed" and failed["resources"] == 0
    assert [e["index"] for e in failed["errors"]] == [1]
    assert "status" in failed["errors"][0]["message"]
    # The other file is not held back.
    assert files["collection.json"]["status"] == "imported"
    assert await _ids(client, "Patient", u, family="Durand") == []
    assert len(await _ids(client, "Patient", u)) == 1
    # Nothing recorded for the failed file: a rerun tries it again.
    code, report, _ = await _import(pg_uri, tmp_path, bad, good)
    assert code == 1
    assert [f["status"] for f in report["files"]] == ["failed", "skipped"]
    assert "entry 1" in output and "Observation.status" in output


async def test_collection_bundle_keeps_ids_and_links_its_entries(client, pg_uri: str, tmp_path: Path) -> None:
    u = uniq("imp")
    code, report, output = await _import(pg_uri, tmp_path, _copy(tmp_path, "collection.json", u))
    assert code == 0, output
    assert report["files"][0]["counts"] == {"Condition": 1, "Organization": 1, "Patient": 1}
    (patient,) = await _resources(client, "Patient", u, organization=f"Organization/{u}-org")
    assert patient["managingOrganization"] == {"reference": f"Organization/{u}-org"}
    (condition,) = await _resources(client, "Condition", u, subject=f"Patient/{patient['id']}")
    assert condition["subject"]["reference"] == f"Patient/{patient['id']}"


async def test_ndjson_reports_the_invalid_line_and_imports_the_others(client, pg_uri: str, tmp_path: Path) -> None:
    u = uniq("imp")
    path = _copy(tmp_path, "resources.ndjson", u)
    code, report, output = await _import(pg_uri, tmp_path, path)
    assert code == 1, output  # a rejected resource makes the exit status 1
    (f,) = report["files"]
    assert f["status"] == "partial"
    assert f["counts"] == {"Condition": 1, "Observation": 3, "Patient": 1}
    (error,) = f["errors"]
    assert error["index"] == 3 and "Observation.status" in error["message"] and "bogus" in error["message"]
    assert "line 3" in output
    assert report["totals"] | {"elapsed_s": 0, "resources_per_s": 0} == {
        "files": 1, "by_status": {"partial": 1}, "resources": 5, "counts": {"Observation": 3, "Condition": 1, "Patient": 1},
        "errors": 1, "elapsed_s": 0, "resources_per_s": 0, "validated": True}
    assert len(await _ids(client, "Observation", u, subject=f"Patient/{u}-p1")) == 3
    # The file was completed (with its rejected line): a rerun skips it.
    code, report, output = await _import(pg_uri, tmp_path, path)
    assert code == 0 and report["files"][0]["status"] == "skipped", output
    assert len(await _ids(client, "Observation", u)) == 3


async def test_rerun_skips_and_force_imports_again(client, pg_uri: str, tmp_path: Path) -> None:
    u = uniq("imp")
    folder = tmp_path / "in"
    folder.mkdir()
    _copy(folder, "collection.json", u)
    _copy(folder, "transaction.json", u)
    (folder / "notes.txt").write_text("not imported")
    code, report, _ = await _import(pg_uri, tmp_path, folder)
    assert code == 0 and [f["status"] for f in report["files"]] == ["imported", "imported"]
    code, report, output = await _import(pg_uri, tmp_path, folder)
    assert code == 0 and [f["status"] for f in report["files"]] == ["skipped", "skipped"]
    assert report["totals"]["resources"] == 0 and "skipped" in output
    assert len(await _ids(client, "Patient", u)) == 2
    # A copy under another name is the same content: skipped as well.
    _copy(tmp_path, "collection.json", u, as_name="copy.json")
    code, report, _ = await _import(pg_uri, tmp_path, tmp_path / "copy.json")
    assert report["files"][0]["status"] == "skipped"
    # --force: resources with their own id get a new version, the others are created again.
    code, report, _ = await _import(pg_uri, tmp_path, folder / "collection.json", "--force")
    assert code == 0 and report["files"][0]["status"] == "imported"
    r = await client.get(f"/fhir/Organization/{u}-org")
    assert r.json()["meta"]["versionId"] == "2"
    r = await client.get(f"/fhir/Organization/{u}-org/_history")
    assert [e["resource"]["meta"]["versionId"] for e in r.json()["entry"]] == ["2", "1"]
    assert len(await _ids(client, "Organization", u, name="maison de sante")) == 1


async def test_ndjson_interrupted_half_way_resumes_without_duplicates(client, pg_uri: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    u = uniq("imp")
    path = _copy(tmp_path, "resources.ndjson", u)
    flush = bulk.BulkWriter.flush
    calls = 0

    async def crash_on_second(self: bulk.BulkWriter) -> int:
        nonlocal calls
        if _ours(self, u):
            calls += 1
            if calls == 2:
                raise SimulatedCrash()
        return await flush(self)

    monkeypatch.setattr(bulk.BulkWriter, "flush", crash_on_second)
    code, output, exc = await _cli(pg_uri, path, "--batch-size", "2")
    assert code != 0
    # Lines 1-2 were committed with the journal; the chunk being written was not.
    assert len(await _ids(client, "Observation", u)) == 1
    assert len(await _ids(client, "Patient", u)) == 1
    monkeypatch.setattr(bulk.BulkWriter, "flush", flush)
    code, report, output = await _import(pg_uri, tmp_path, path, "--batch-size", "2")
    assert code == 1, output  # line 3 is still invalid
    (f,) = report["files"]
    assert f["status"] == "partial" and "resumed after line 2" in f["note"]
    assert f["counts"] == {"Condition": 1, "Observation": 2}
    assert len(await _ids(client, "Observation", u)) == 3
    assert len(await _ids(client, "Patient", u)) == 1
    code, report, _ = await _import(pg_uri, tmp_path, path)
    assert code == 0 and report["files"][0]["status"] == "skipped"


async def test_bundles_interrupted_half_way_are_done_again_whole(client, pg_uri: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    u = uniq("imp")
    first = _copy(tmp_path, "collection.json", u)
    second = _copy(tmp_path, "transaction.json", u)
    flush = bulk.BulkWriter.flush
    calls = 0

    async def crash(self: bulk.BulkWriter) -> int:
        nonlocal calls
        if _ours(self, u):
            calls += 1
            if calls == 2:
                raise SimulatedCrash()
        return await flush(self)

    monkeypatch.setattr(bulk.BulkWriter, "flush", crash)
    code, _, _ = await _cli(pg_uri, first, second, "--batch-size", "1")
    assert code != 0
    assert len(await _ids(client, "Patient", u)) == 1  # the collection's
    assert await _ids(client, "Observation", u) == []
    monkeypatch.setattr(bulk.BulkWriter, "flush", flush)
    code, report, output = await _import(pg_uri, tmp_path, first, second)
    assert code == 0, output
    assert [f["status"] for f in report["files"]] == ["skipped", "imported"]
    assert len(await _ids(client, "Patient", u)) == 2
    assert len(await _ids(client, "Observation", u)) == 2


async def test_not_fhir_json_is_ignored_and_broken_json_fails(pg_uri: str, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('[{"file": "a.json"}]')
    (tmp_path / "broken.json").write_text('{"resourceType": "Patient",')
    code, report, output = await _import(pg_uri, tmp_path, tmp_path / "manifest.json", tmp_path / "broken.json")
    assert code == 1
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert files["manifest.json"]["status"] == "ignored"
    assert files["broken.json"]["status"] == "failed"
    assert files["broken.json"]["errors"][0]["message"].startswith("Not valid JSON")


SYNTHEA_COUNTS = {  # synthea-r4-smart/README.md
    "Observation": 7634, "Claim": 1735, "Encounter": 1420, "ExplanationOfBenefit": 1420, "Immunization": 1160,
    "Procedure": 579, "Condition": 474, "DiagnosticReport": 410, "MedicationRequest": 315, "Organization": 247,
    "Practitioner": 247, "CarePlan": 144, "Patient": 112, "Goal": 55, "AllergyIntolerance": 35, "ImagingStudy": 7,
}


async def _synthea_counts(client) -> dict[str, int]:  # type: ignore[no-untyped-def]
    out = {}
    for rtype in SYNTHEA_COUNTS:
        r = await client.get(f"/fhir/{rtype}", params={"_tag": "https://smarthealthit.org/tags|synthea-5-2019", "_summary": "count"})
        out[rtype] = r.json()["total"]
    return out


@pytest.mark.skipif(not SYNTHEA.is_dir(), reason="needs /work/shared/data/synthea-r4-smart")
async def test_whole_synthea_set(client, pg_uri: str, tmp_path: Path) -> None:
    assert sum(SYNTHEA_COUNTS.values()) == 15_994
    before = await _synthea_counts(client)
    # The folder as it comes: manifest.json (not FHIR) is passed over. Without validation,
    # to stay well under a minute on a busy machine: bench/import_bench.py imports the set
    # with validation too, and fails if any resource is refused.
    code, report, output = await _import(pg_uri, tmp_path, SYNTHEA, "--force", "--no-validate")
    assert code == 0, output
    totals = report["totals"]
    assert totals["by_status"] == {"imported": 114, "ignored": 1}
    assert totals["resources"] == 15_994 and totals["counts"] == SYNTHEA_COUNTS and totals["errors"] == 0
    assert totals["validated"] is False
    after = await _synthea_counts(client)
    assert {t: after[t] - before[t] for t in SYNTHEA_COUNTS} == SYNTHEA_COUNTS
    # References inside each bundle now point at the new ids.
    r = await client.get("/fhir/Encounter", params={"_tag": "https://smarthealthit.org/tags|synthea-5-2019", "_count": "20",
                                                   "_include": "Encounter:subject"})
    entries = r.json()["entry"]
    patients = {e["resource"]["id"] for e in entries if e["resource"]["resourceType"] == "Patient"}
    encounters = [e["resource"] for e in entries if e["resource"]["resourceType"] == "Encounter"]
    assert encounters and all(e["subject"]["reference"].removeprefix("Patient/") in patients for e in encounters)


async def test_gzip_ndjson_and_a_truncated_one(client, pg_uri: str, tmp_path: Path) -> None:
    import gzip

    u = uniq("imp")
    data = (HERE / "resources.ndjson").read_text(encoding="utf-8").replace("__UNIQ__", u).encode()
    (tmp_path / "good.ndjson.gz").write_bytes(gzip.compress(data))
    (tmp_path / "cut.ndjson.gz").write_bytes(gzip.compress(data.replace(b"Moreau", b"Moreau2"))[:-20])
    code, report, output = await _import(pg_uri, tmp_path, tmp_path)
    assert code == 1, output
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert files["good.ndjson.gz"]["status"] == "partial" and files["good.ndjson.gz"]["resources"] == 5
    assert files["cut.ndjson.gz"]["status"] == "failed"
    assert "Cannot read the file" in files["cut.ndjson.gz"]["errors"][-1]["message"]
    assert await _ids(client, "Patient", u, family="moreau2") == []


async def test_types_with_write_rules_go_through_the_repository(client, pg_uri: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from parcours.core.errors import Unprocessable
    from parcours.services import platform as platform_module

    seen: list[str] = []

    class NoAsthma:
        types = frozenset({"Condition"})

        async def before_write(self, repo, rtype, rid, resource, previous):  # type: ignore[no-untyped-def]
            seen.append(rid)
            if (resource or {}).get("code", {}).get("text") == "Asthme":
                raise Unprocessable("test rule: no asthma here")

    monkeypatch.setattr(platform_module, "write_rules", lambda settings: (NoAsthma(),))
    u = uniq("imp")
    code, report, output = await _import(pg_uri, tmp_path, _copy(tmp_path, "resources.ndjson", u), _copy(tmp_path, "collection.json", u))
    assert code == 1, output
    ndjson, collection = report["files"]
    assert [e["index"] for e in ndjson["errors"]] == [3, 5] and "no asthma" in ndjson["errors"][1]["message"]
    assert ndjson["counts"] == {"Observation": 3, "Patient": 1}
    assert collection["status"] == "imported" and collection["counts"]["Condition"] == 1
    (condition,) = await _resources(client, "Condition", u)
    assert condition["id"] in seen and len(seen) == 2
    # In a transaction, an entry the rule refuses fails the whole Bundle.
    v = uniq("imp")

    def bundle(text: str) -> dict:
        tag = {"tag": [{"system": TAG, "code": v}]}
        return {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:5d1f2c3b-0000-4000-8000-000000000001", "request": {"method": "POST", "url": "Patient"},
             "resource": {"resourceType": "Patient", "meta": tag, "name": [{"family": text}]}},
            {"request": {"method": "POST", "url": "Condition"},
             "resource": {"resourceType": "Condition", "meta": tag, "code": {"text": text},
                          "subject": {"reference": "urn:uuid:5d1f2c3b-0000-4000-8000-000000000001"}}}]}

    (tmp_path / "refused.json").write_bytes(orjson.dumps(bundle("Asthme")))
    (tmp_path / "kept.json").write_bytes(orjson.dumps(bundle("Eczema")))
    code, report, output = await _import(pg_uri, tmp_path, tmp_path / "kept.json", tmp_path / "refused.json")
    kept, refused = report["files"]
    assert (kept["status"], kept["counts"]) == ("imported", {"Condition": 1, "Patient": 1})
    assert refused["status"] == "failed" and [e["index"] for e in refused["errors"]] == [1]
    (patient,) = await _resources(client, "Patient", v)
    (condition,) = await _resources(client, "Condition", v)
    assert patient["name"][0]["family"] == "Eczema" and condition["subject"]["reference"] == f"Patient/{patient['id']}"
