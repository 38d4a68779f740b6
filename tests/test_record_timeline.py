"""The timeline JSON API: a window (year, month, day) read from the database gives exactly the
events of the whole timeline that fall in it, under the access policy, audited once per request;
every date the timeline reads is indexed by the search parameter it names."""

from __future__ import annotations

import httpx
import pytest

from parcours.fhir.datatypes import parse_date_range
from parcours.fhir.indexing import index_resource
from parcours.fhir.registry import registry
from parcours.services.records import timeline
from tests.accounts_helpers import create_resource
from tests.record_helpers import people

TL = "/api/record/patients/{}/timeline"
VALUE = "2019-03-20T07:14:00+01:00"


@pytest.mark.parametrize("rtype", sorted(timeline.DATES))
def test_every_date_the_timeline_reads_is_indexed_where_it_says(rtype: str) -> None:
    reg = registry()
    for path, code in timeline.DATES[rtype]:
        resource: dict = {"resourceType": rtype}
        node = resource
        for step in path[:-1]:
            node = node.setdefault(step, {})
        node[path[-1]] = VALUE
        assert timeline.when_of(rtype, resource) == VALUE
        if code is None:  # no parameter: the key is looked for in the JSON text
            assert timeline.DATE_FILTERS[rtype].keys and path[-1] in timeline.DATE_FILTERS[rtype].keys
            continue
        assert code in timeline.DATE_FILTERS[rtype].codes
        rows = [r for r in index_resource(resource, reg, "http://x/fhir").rows if r[0] == code]
        assert any(r[3] == parse_date_range(VALUE)[0] for r in rows), (rtype, path, code, rows)


async def test_windows_equal_the_whole_timeline_under_the_policy(client, platform) -> None:  # type: ignore[no-untyped-def]
    p = await people(client, platform)
    subject = {"reference": f"Patient/{p.patient_id}"}
    listed = await create_resource(client, {"resourceType": "Observation", "status": "final", "subject": subject,
                                            "code": {"text": "HbA1c"}, "effectiveDateTime": "2026-03-02"})
    bodies = [
        # New Year's Eve in UTC is New Year's Day in Paris.
        {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "subject": subject,
         "type": [{"text": "Réveillon aux urgences"}], "period": {"start": "2025-12-31T23:30:00Z"}},
        # An open period starts once: not in every later window.
        {"resourceType": "Encounter", "status": "in-progress", "class": {"code": "IMP"}, "subject": subject,
         "type": [{"text": "Hospitalisation au long cours"}], "period": {"start": "2020-04-01"}},
        {"resourceType": "Observation", "status": "final", "subject": subject, "code": {"text": "Poids"},
         "issued": "2024-06-01T10:00:00+02:00", "valueQuantity": {"value": 70, "unit": "kg"}},
        {"resourceType": "Observation", "status": "final", "subject": subject, "code": {"text": "Tension"},
         "effectivePeriod": {"end": "2021-01-01"}, "issued": "2024-06-03T10:00:00+02:00"},
        {"resourceType": "Observation", "status": "final", "subject": subject, "code": {"text": "Pouls"},
         "effectiveDateTime": "2026-03-02T08:00:00+01:00", "valueQuantity": {"value": 64, "unit": "/min"}},
        {"resourceType": "DiagnosticReport", "status": "final", "subject": subject, "code": {"text": "Bilan"},
         "effectiveDateTime": "2026-03-01", "result": [{"reference": f"Observation/{listed}"}]},
        {"resourceType": "DocumentReference", "status": "current", "subject": subject, "date": "2026-03-05T09:00:00+01:00",
         "description": "Courrier daté", "content": [{"attachment": {"contentType": "text/plain", "title": "c.txt"}}]},
        {"resourceType": "Condition", "subject": subject, "code": {"text": "Asthme"}, "recordedDate": "2023-09-09"},
        {"resourceType": "Condition", "subject": subject, "code": {"text": "Rhinite"}, "onsetPeriod": {"start": "2026-03-03"}},
        {"resourceType": "Immunization", "status": "completed", "patient": subject, "vaccineCode": {"text": "Tétanos"},
         "occurrenceString": "enfance", "recorded": "2022-02-02"},
        {"resourceType": "Immunization", "status": "entered-in-error", "patient": subject, "vaccineCode": {"text": "Doublon"},
         "occurrenceDateTime": "2026-03-04"},
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subject, "authoredOn": "2026-03-02",
         "medicationCodeableConcept": {"text": "Ventoline"}},
        # Restricted: seen by the patient, not by the professional (not its author).
        {"resourceType": "Flag", "status": "active", "subject": subject, "code": {"text": "Alerte confidentielle"},
         "period": {"start": "2026-03-06"},
         "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}},
    ]
    for b in bodies:
        await create_resource(client, b)

    async def whole(who: dict[str, str]) -> list[dict]:
        r = await client.get(TL.format(p.patient_id), headers=who)
        assert r.status_code == 200, r.text
        return r.json()["events"]

    doctor_all, patient_all = await whole(p.doctor), await whole(p.patient)
    titles = [e["title"] for e in doctor_all]
    assert "Alerte confidentielle" not in titles and "Alerte confidentielle" in [e["title"] for e in patient_all]
    assert "HbA1c" not in titles and "Pouls" in titles and "Bilan" in titles  # the listed observation shows through its report
    assert "Doublon" not in titles
    whens = {e["title"]: e["when"] for e in doctor_all}
    assert whens["Poids"] == "2024-06-01T10:00:00+02:00" and whens["Tension"] == "2024-06-03T10:00:00+02:00"
    assert whens["Asthme"] == "2023-09-09" and whens["Tétanos"] == "2022-02-02"

    windows = [("year", y) for y in ("2019", "2020", "2021", "2022", "2023", "2024", "2025", "2026")]
    windows += [("month", "2026-01"), ("month", "2025-12"), ("month", "2026-03"), ("day", "2026-01-01"), ("day", "2025-12-31"),
                ("day", "2026-03-02")]
    for who, events in ((p.doctor, doctor_all), (p.patient, patient_all)):
        for zoom, at in windows:
            r = await client.get(TL.format(p.patient_id), headers=who, params={"zoom": zoom, "at": at})
            assert r.status_code == 200, r.text
            start, end = timeline.window(zoom, timeline.day_of(at))
            expected = [e for e in events if start <= timeline.day_of(e["when"]) < end]
            assert r.json()["events"] == expected, (zoom, at)
            assert r.json()["total"] == len(expected)
    jan1 = await client.get(TL.format(p.patient_id), headers=p.doctor, params={"zoom": "day", "at": "2026-01-01"})
    assert [e["title"] for e in jan1.json()["events"]] == ["Réveillon aux urgences"]
    y2026 = await client.get(TL.format(p.patient_id), headers=p.doctor, params={"zoom": "year", "at": "2026"})
    assert "Hospitalisation au long cours" not in [e["title"] for e in y2026.json()["events"]]

    # One door: a professional without a care relationship is refused, and each request is audited once.
    assert (await client.get(TL.format(p.patient_id), headers=p.outsider, params={"zoom": "year", "at": "2026"})).status_code == 403
    async with platform.pool.connection() as conn:
        async def count() -> int:
            cur = await conn.execute("SELECT count(*) FROM audit_log WHERE action = 'everything' AND resource_id = %s",
                                     (p.patient_id,))
            return (await cur.fetchone())[0]

        before = await count()
        for at in ("2024", "2025", "2026"):
            await client.get(TL.format(p.patient_id), headers=p.doctor, params={"zoom": "year", "at": at})
        assert await count() == before + 3


async def test_category_filter_and_bad_zoom(client: httpx.AsyncClient, platform) -> None:  # type: ignore[no-untyped-def]
    p = await people(client, platform)
    subject = {"reference": f"Patient/{p.patient_id}"}
    await create_resource(client, {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subject,
                                   "authoredOn": "2026-05-02", "medicationCodeableConcept": {"text": "Amoxicilline"}})
    await create_resource(client, {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "subject": subject,
                                   "period": {"start": "2026-05-02T10:00:00+02:00"}, "type": [{"text": "Consultation"}]})
    r = await client.get(TL.format(p.patient_id), headers=p.doctor,
                         params={"zoom": "month", "at": "2026-05", "category": "prescription"})
    assert [e["title"] for e in r.json()["events"]] == ["Amoxicilline"]
    assert (await client.get(TL.format(p.patient_id), headers=p.doctor, params={"zoom": "week"})).status_code == 400
