"""Every resource type the platform uses is searchable by its own R4 parameters.

For each type, one official R4 example (copied into ``tests/fixtures/search/examples``)
is created with a fresh identifier and the run's tag; queries built from the
example's own values must find exactly it, and a query with a value the example
does not hold must find nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import uniq
from tests.fixtures.search.helpers import TAG_SYSTEM, create, ids, tagged

EXAMPLES = Path(__file__).parent / "fixtures" / "search" / "examples"

# type: (example file, queries that find it, queries that must not).
# ``{ident}`` is the example's first identifier, made unique for the run; ``{url}`` its canonical url.
CASES: dict[str, tuple[str, list[str], list[str]]] = {
    "Patient": ("Patient-example", ["identifier={ident}", "family=chalmers&given=jim", "birthdate=1974-12-25&gender=male",
                                    "address-city=pleasantville", "organization=Organization/1"], ["gender=female"]),
    "RelatedPerson": ("RelatedPerson-peter", ["patient=Patient/animal", "relationship=http://terminology.hl7.org/CodeSystem/v2-0131|C",
                                              "name=peter&address-postalcode=3999"], ["patient=Patient/example"]),
    "Practitioner": ("Practitioner-example", ["identifier={ident}", "family=careful&given=adam", "active=true"], ["family=careless"]),
    "PractitionerRole": ("PractitionerRole-example", ["specialty=http://snomed.info/sct|408443003", "practitioner=Practitioner/example",
                                                      "organization=Organization/f001&role=RP", "date=ge2012-03-01",
                                                      "email=adam.southern@example.org", "service=HealthcareService/example"],
                         ["specialty=http://snomed.info/sct|394814009", "date=gt2012-04-01"]),
    "Organization": ("Organization-f001", ["name=burgers", "identifier={ident}", "type=http://terminology.hl7.org/CodeSystem/organization-type|prov",
                                           "address-city=den burg"], ["name=university"]),
    "Location": ("Location-1", ["name=south wing", "address-city=den burg", "organization=Organization/f001&status=active",
                                "near=42.25475478|-83.6945691|1|km", "identifier={ident}"], ["status=inactive", "near=42.3|-83.7|1|km"]),
    "HealthcareService": ("HealthcareService-example", ["service-category=8", "specialty=http://snomed.info/sct|47505003",
                                                        "location=Location/1", "name=consulting&active=true", "identifier={ident}"],
                          ["specialty=394814009"]),
    "Endpoint": ("Endpoint-example", ["connection-type=http://terminology.hl7.org/CodeSystem/endpoint-connection-type|hl7-fhir-rest",
                                      "status=active", "name=health intersections", "organization=Organization/hl7"], ["status=off"]),
    "Schedule": ("Schedule-example", ["actor=Location/1", "active=true&date=2013-12-25", "service-type=57&specialty=408480009",
                                      "identifier={ident}"], ["actor=Location/2"]),
    "Slot": ("Slot-example", ["schedule=Schedule/example&status=free&start=ge2013-12-25T09:00:00Z", "service-type=57",
                              "appointment-type=WALKIN", "start=2013-12-25"], ["status=busy", "start=lt2013-12-25T09:15:00Z"]),
    "Appointment": ("Appointment-example", ["actor=Practitioner/example", "patient=Patient/example&status=booked",
                                            "date=2013-12-10", "service-type=52&specialty=394814009", "part-status=accepted"],
                    ["date=2013-12-11", "practitioner=Practitioner/f001"]),
    "Encounter": ("Encounter-f001", ["class=AMB&status=finished", "subject=Patient/f001", "length=140", "length=140|http://unitsofmeasure.org|min",
                                     "service-provider=Organization/f001", "type=270427003", "identifier={ident}"],
                  ["status=in-progress", "length=lt100"]),
    "Observation": ("Observation-example", ["code=http://loinc.org|29463-7", "subject=Patient/example&date=2016-03-28",
                                            "value-quantity=185|http://unitsofmeasure.org|[lb_av]", "category=vital-signs",
                                            "code-value-quantity=http://loinc.org|29463-7$gt180"], ["value-quantity=gt185"]),
    "DiagnosticReport": ("DiagnosticReport-102", ["code=38269-7", "subject=Patient/pat2&result=Observation/bmd",
                                                  "date=2008-06-17", "issued=ge2008-06-17T23:00:00Z", "conclusion=391040000"],
                         ["issued=lt2008-06-17"]),
    "Condition": ("Condition-example", ["code=http://snomed.info/sct|39065001", "clinical-status=active&onset-date=2012-05-24",
                                        "body-site=49521004", "subject=Patient/example&severity=24484000"], ["clinical-status=resolved"]),
    "AllergyIntolerance": ("AllergyIntolerance-example", ["patient=Patient/example", "code=227493005&criticality=high",
                                                          "onset=2004", "clinical-status=active", "identifier={ident}"],
                           ["criticality=low"]),
    "Medication": ("Medication-med0301", ["code=0069-2587-10", "form=385219001&ingredient-code=66955", "lot-number=9494788",
                                          "expiration-date=2017-05-22"], ["expiration-date=2018"]),
    "MedicationRequest": ("MedicationRequest-medrx0302", ["intent=order&status=active", "patient=Patient/pat1",
                                                          "authoredon=2015-01-15", "requester=Practitioner/f007", "identifier={ident}"],
                          ["intent=plan"]),
    "MedicationDispense": ("MedicationDispense-meddisp0301", ["status=in-progress", "patient=Patient/pat1", "whenprepared=2015-01-15",
                                                              "performer=Practitioner/f006", "prescription=MedicationRequest/medrx0318"],
                           ["status=completed"]),
    "Immunization": ("Immunization-example", ["vaccine-code=FLUVAX", "patient=Patient/example&date=2013-01-10",
                                              "lot-number=AAJN11K", "status=completed"], ["status=not-done"]),
    "Procedure": ("Procedure-example", ["code=80146002", "subject=Patient/example&date=2013-04-05", "status=completed"],
                  ["date=2013-04-06"]),
    "DocumentReference": ("DocumentReference-example", ["patient=Patient/xcda&type=http://loinc.org|34108-1", "date=2005-12-23",
                                                        "status=current", "description=physical", "identifier={ident}",
                                                        "period=ge2004-12-22T21:00:00Z"], ["type=http://loinc.org|11488-4", "period=2004-12-23"]),
    "Composition": ("Composition-example", ["type=11488-4", "subject=Patient/xcda", "title=consultation&date=2012-01-04",
                                            "section=11348-0", "entry=Condition/example", "identifier={ident}"], ["section=12345"]),
    "Media": ("Media-example", ["subject=Patient/xcda", "modality=diagram", "created=2017-12-17", "status=completed"],
              ["created=2017-12-18"]),
    "Communication": ("Communication-example", ["category=Alert", "sent=2014-12-13", "subject=Patient/example",
                                                "recipient=Practitioner/example&medium=WRITTEN", "identifier={ident}"],
                      ["sent=2015"]),
    "CommunicationRequest": ("CommunicationRequest-fm-solicit", ["category=SolicitedAttachmentRequest", "status=active&priority=routine",
                                                                  "authored=2016-06-10", "occurrence=ge2016-06-10T19:01:10Z",
                                                                  "identifier={ident}"], ["priority=urgent"]),
    "ServiceRequest": ("ServiceRequest-di", ["code=24627-2&intent=original-order", "subject=Patient/dicom",
                                             "occurrence=2013-05-08", "requester=Practitioner/example"], ["intent=plan"]),
    "Task": ("Task-example1", ["status=in-progress&priority=routine", "owner=Organization/1832473e-2fe0-452d-abe9-3cdb9879522f",
                               "authored-on=2016-10-30", "focus=ServiceRequest/lipid", "identifier={ident}"], ["status=completed"]),
    "CarePlan": ("CarePlan-example", ["activity-code=3141-9", "status=active&intent=plan", "subject=Patient/example",
                                      "date=lt2017-06-01", "goal=Goal/example"], ["date=gt2017-06-02"]),
    "CareTeam": ("CareTeam-example", ["category=LA27976-2", "status=active", "subject=Patient/example", "date=le2013-01-01",
                                      "identifier={ident}"], ["date=ge2013-01-02"]),
    "Goal": ("Goal-example", ["lifecycle-status=on-hold", "category=dietary", "target-date=2016-04-05", "start-date=2015-04-05",
                              "subject=Patient/example"], ["lifecycle-status=active"]),
    "Questionnaire": ("Questionnaire-f201", ["url={url}", "status=active&subject-type=Patient", "date=2010",
                                             "subject-type=Device,Patient"], ["date=2011", "url:below=http://hl7.org/fhir/Questionnaire/f2011"]),
    "QuestionnaireResponse": ("QuestionnaireResponse-f201", ["subject=Patient/f201", "status=completed",
                                                             "authored=2013-06-17", "author=Practitioner/f201"], ["status=in-progress"]),
    "Device": ("Device-f001", ["identifier={ident}", "status=active"], ["status=inactive"]),
    "Consent": ("Consent-consent-example-basic", ["status=active&patient=Patient/f001", "category=59284-0", "date=2016-05-11",
                                                  "scope=patient-privacy", "period=le1970"], ["period=gt2016-01-02"]),
    "Flag": ("Flag-example", ["subject=Patient/example", "date=ge2015-06-01", "author=Practitioner/example", "identifier={ident}"],
             ["date=sa2017"]),
    "AuditEvent": ("AuditEvent-example", ["type=110100", "action=E&date=2012-10-25", "entity-name=grahame", "altid=6580",
                                          "site=Development&outcome=0"], ["action=R"]),
    "Provenance": ("Provenance-example", ["target=Procedure/example", "agent=Practitioner/xcda-author", "recorded=2015-06-26",
                                          "agent-type=AUT"], ["recorded=2016"]),
    # The server moves a requested Subscription to active (or error) on its own, at any moment.
    "Subscription": ("Subscription-example", ["status=requested,active,error&type=rest-hook", "payload=application/fhir+json",
                                              "url=https://biliwatch.com/customers/mount-auburn-miu/on-result"], ["type=websocket"]),
    "Group": ("Group-herd1", ["type=animal&actual=true", "code=388393002", "identifier={ident}"], ["type=person"]),
}


def example(rtype: str, run: str) -> dict[str, Any]:
    """The example with a fresh identifier (and url), no id, and the run's tag."""
    body = json.loads((EXAMPLES / f"{CASES[rtype][0]}.json").read_text())
    assert body["resourceType"] == rtype
    body.pop("id")
    body.pop("meta", None)
    idents = body.get("identifier")
    if isinstance(idents, dict):
        idents = [idents]
    for ident in idents or []:
        ident["value"] = f"{ident['value']}-{run}"
    if "url" in body and rtype == "Questionnaire":
        body["url"] = f"{body['url']}/{run}"
    return tagged(body, run)


def query_values(body: dict[str, Any]) -> dict[str, str]:
    idents = body.get("identifier")
    first = (idents[0] if isinstance(idents, list) else idents) if idents else None
    out = {"url": body.get("url", "")}
    if first:
        out["ident"] = f"{first['system']}|{first['value']}" if first.get("system") else first["value"]
    return out


def test_every_platform_type_has_a_case() -> None:
    platform_types = (
        "Patient RelatedPerson Practitioner PractitionerRole Organization Location HealthcareService Endpoint Schedule Slot "
        "Appointment Encounter Observation DiagnosticReport Condition AllergyIntolerance Medication MedicationRequest "
        "MedicationDispense Immunization Procedure DocumentReference Composition Media Communication CommunicationRequest "
        "ServiceRequest Task CarePlan CareTeam Goal Questionnaire QuestionnaireResponse Device Consent Flag AuditEvent "
        "Provenance Subscription Group"
    ).split()
    assert sorted(CASES) == sorted(platform_types)
    for rtype, (_, found, missed) in CASES.items():
        assert len(found) >= 2 and missed, rtype


async def store_as_platform(platform, body: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """AuditEvent is written by the platform alone (the access policy refuses it to
    API callers): store it through the Repository's own write path, as the audit
    materializer does."""
    from parcours.core.ids import new_id
    from parcours.security.caller import SYSTEM

    async with platform.transaction(SYSTEM) as repo:
        stored = await repo._write(body["resourceType"], new_id(), body, version=1, method="POST", insert=True)
    return stored.resource()


@pytest.mark.parametrize("rtype", sorted(CASES))
async def test_type_is_searchable_by_its_parameters(client, platform, rtype: str) -> None:  # type: ignore[no-untyped-def]
    run = uniq(rtype.lower())
    body = example(rtype, run)
    created = await (store_as_platform(platform, body) if rtype == "AuditEvent" else create(client, body))
    values = query_values(body)
    _, found, missed = CASES[rtype]
    scope = [("_tag", f"{TAG_SYSTEM}|{run}")]
    for query in found + missed:
        params = [tuple(p.split("=", 1)) for p in query.format(**values).split("&")]
        got = await ids(client, rtype, [*params, *scope])
        want = [created["id"]] if query in found else []
        assert got == want, f"{rtype}?{query}: expected {want}, got {got}"
    # the identifier alone (no tag) finds exactly the new resource
    if "ident" in values:
        assert await ids(client, rtype, [("identifier", values["ident"])]) == [created["id"]]
