"""Directory imports: national directory FHIR examples and CSV, both idempotent."""

from __future__ import annotations

import copy
import random
from collections import Counter

import httpx

from parcours.services.directory import model
from parcours.services.directory.importers import import_csv, import_fhir, read_csv, read_fhir
from parcours.services.platform import Platform
from tests.conftest import FIXTURES, uniq

SOURCE = FIXTURES / "directory"


def _unique_examples(suffix: str) -> list[tuple[str, dict]]:
    """The IG examples with every identifier value made unique to this test (other tests may load them too)."""
    out = []
    for where, res in read_fhir(SOURCE):
        res = copy.deepcopy(res)
        for ident in res.get("identifier") or []:
            if "value" in ident:
                ident["value"] += suffix
        out.append((where, res))
    return out


async def _count(client: httpx.AsyncClient, rtype: str, system: str, value: str) -> list[dict]:
    r = await client.get(f"/fhir/{rtype}", params={"identifier": f"{system}|{value}", "_count": "10"})
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", [])]


async def test_fhir_import_of_ig_examples_is_idempotent(platform: Platform, client: httpx.AsyncClient) -> None:
    suffix = "-" + uniq("ig")
    items = _unique_examples(suffix)
    first = await import_fhir(platform, items)
    assert first.errors == []
    # 8 ANS organizations are 4 entities (restricted + public versions of 3, plus 2 alone) + FR Core's.
    assert dict(first.created) == {"Organization": 6, "Location": 1, "Practitioner": 2, "HealthcareService": 1, "PractitionerRole": 3}
    assert dict(first.merged) == {"Organization": 3, "Practitioner": 2, "PractitionerRole": 3}
    assert dict(first.skipped) == {"Person": 2}

    second = await import_fhir(platform, _unique_examples(suffix))
    assert second.errors == [] and not second.created and not second.updated
    assert dict(second.unchanged) == dict(first.created)

    # One resource per entity, found by its national identifier.
    pracs = await _count(client, "Practitioner", model.IDNPS_SYSTEM, "810003461033" + suffix)
    assert len(pracs) == 1
    prac = pracs[0]
    # Restricted and public versions merged: the restricted one's birth date, the public one's MSSanté address.
    assert prac["birthDate"] == "1995-01-08"
    assert any(t.get("value") == "jeromebonnet@pro.mssante.fr" for t in prac["telecom"])
    orgs = await _count(client, "Organization", model.IDNST_SYSTEM, "1754567860" + suffix)
    assert len(orgs) == 1 and orgs[0]["name"] == "CH EURE-SEINE"
    # The role is found under either system of the directory, once, pointing at the stored resources.
    roles = await _count(client, "PractitionerRole", "https://annuaire.sante.fr", "F58000880311022013" + suffix)
    assert len(roles) == 1
    assert roles == await _count(client, "PractitionerRole", "https://rpps.esante.gouv.fr", "F58000880311022013" + suffix)
    assert roles[0]["practitioner"]["reference"] == f"Practitioner/{prac['id']}"
    assert roles[0]["organization"]["reference"] == f"Organization/{orgs[0]['id']}"
    # FR Core: the Location keeps its position and now points at the stored organization.
    locs = await _count(client, "Location", "urn:oid:1.2.250.1.1.1.2", "HOSPZ-RADIO" + suffix)
    assert len(locs) == 1 and locs[0]["position"]["latitude"] == 48.8333
    fr_org = locs[0]["managingOrganization"]["reference"]
    assert fr_org.startswith("Organization/") and fr_org != "Organization/FRCoreOrganizationExample"

    # A changed entity is updated in place, not duplicated.
    changed = _unique_examples(suffix)
    for _, res in changed:
        if res["resourceType"] == "Organization" and res.get("name") == "PHARMACIE NOLOT":
            res["name"] = "PHARMACIE NOLOT ET FILS"
    third = await import_fhir(platform, changed)
    assert dict(third.updated) == {"Organization": 1} and not third.created
    orgs = await _count(client, "Organization", model.IDNST_SYSTEM, "1580008803" + suffix)
    assert [o["name"] for o in orgs] == ["PHARMACIE NOLOT ET FILS"]


async def test_fhir_import_reports_invalid_resources_and_keeps_the_rest(platform: Platform) -> None:
    tag = uniq("bad")
    good = {"resourceType": "Organization", "identifier": [{"system": model.IDNST_SYSTEM, "value": f"1{tag}"}], "name": "Bonne"}
    bad = {"resourceType": "Organization", "identifier": [{"system": model.IDNST_SYSTEM, "value": f"2{tag}"}], "name": 42}
    anonymous = {"resourceType": "Location", "name": "No id, no identifier"}
    report = await import_fhir(platform, [("a.json", good), ("b.json", bad), ("c.json", anonymous)])
    assert dict(report.created) == {"Organization": 1}
    # Organizations go first (dependency order), then Locations.
    assert [e.where for e in report.errors] == ["b.json", "c.json"]
    assert "PRC-1422" in report.errors[0].message and "identifier" in report.errors[1].message


HEADER = ("rpps;family;given;gender;profession;specialty;languages;organization;finess;siret;address;postal_code;city;insee;"
          "lat;lon;phone;accepts_new_patients;wheelchair;offers;opening_hours")


def _rpps(rng: random.Random) -> str:
    return model.with_luhn("1" + "".join(rng.choice("0123456789") for _ in range(9)))


def _csv(rpps: list[str], org: str, *, phone: str = "0495000000") -> str:
    rows = [
        HEADER,
        f"{rpps[0]};Casanova;Paola;F;10;SM54;fr en;{org};;;2 cours Napoléon;20000;;2A004;41.9270;8.7370;{phone};oui;oui;"
        "consultation teleconsultation;mon-fri 08:30-19:00 | sat 09:00-12:00",
        f"{rpps[1]};Pietri;Ange;M;60;;fr;{org};;;2 cours Napoléon;20000;;;;;{phone};non;oui;home-visit vaccination;",
        f"{rpps[2]};Mattei;Jean;M;10;SM99;fr;{org};;;2 cours Napoléon;20000;;;;;;;;;",  # unknown specialty
        f"{rpps[3]};Santoni;Marie;F;Infirmier;;fr;{org};;;5 rue Fesch;20000;Ajaccio;;;;;;;;",  # profession by label
        f"{rpps[4]};Leca;Paul;M;10;SM54;fr;Cabinet {org};;;1 place Foch;13001;;;;;;;;;",  # 13001: Marseille only
        f"{rpps[5]};Rossi;Luc;M;10;SM54;fr;{org};;;1 rue A;;;;;;;;;;",  # no place
    ]
    return "\n".join(rows) + "\n"


async def test_csv_import_is_idempotent_and_rejects_bad_rows(platform: Platform, client: httpx.AsyncClient) -> None:
    rng = random.Random(uniq())
    rpps = [_rpps(rng) for _ in range(6)]
    org = f"Maison de santé {uniq('msp')}"
    text = _csv(rpps, org)
    first = await import_csv(platform, text)
    assert first.rows == 6
    assert [(e.where, e.message.split(":")[0]) for e in first.errors] == [
        ("line 4", "specialty"), ("line 7", "the place needs insee, or postal_code (and city)")]
    # Rows 2, 3 and 5 share a practice (rows 2 and 3 also their place); row 6 is another practice.
    assert dict(first.created) == {"Organization": 2, "Location": 3, "Practitioner": 4, "HealthcareService": 6, "PractitionerRole": 4}

    second = await import_csv(platform, text)
    assert not second.created and not second.updated
    assert dict(second.unchanged) == dict(first.created)
    assert [e.where for e in second.errors] == ["line 4", "line 7"]

    # The bad rows left nothing behind.
    assert await _count(client, "Practitioner", model.RPPS_SYSTEM, rpps[2]) == []
    # Row 2: one role, its place in Ajaccio with the given position, accessible, with its opening hours.
    prac = (await _count(client, "Practitioner", model.RPPS_SYSTEM, rpps[0]))[0]
    assert model.languages(prac) == ["fr", "en"]
    r = await client.get("/fhir/PractitionerRole", params={"practitioner": f"Practitioner/{prac['id']}",
                                                          "_include": ["PractitionerRole:location", "PractitionerRole:service"]})
    entries = r.json()["entry"]
    role = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "PractitionerRole")
    loc = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "Location")
    services = [e["resource"] for e in entries if e["resource"]["resourceType"] == "HealthcareService"]
    assert model.accepts_new_patients(role) is True and model.role_specialties(role) == ["SM54"]
    assert model.position(loc) == (41.927, 8.737) and model.wheelchair_accessible(loc)
    assert loc["address"]["city"] == "Ajaccio" and loc["hoursOfOperation"][1]["daysOfWeek"] == ["sat"]
    assert sorted(o for s in services for o in model.service_offers(s)) == ["consultation", "teleconsultation"]
    # Row 6 (Marseille 1er, one commune for 13001) was placed at its commune's point.
    marseille = (await _count(client, "Practitioner", model.RPPS_SYSTEM, rpps[4]))[0]
    assert marseille["name"][0]["family"] == "Leca"

    # A change updates the resources concerned only.
    third = await import_csv(platform, _csv(rpps, org, phone="0495999999"))
    assert not third.created
    assert Counter(third.updated) == Counter({"Organization": 1, "Location": 1, "PractitionerRole": 2})


def test_csv_reader_reports_line_numbers_and_columns() -> None:
    text = "rpps,family,given,profession,organization,address,insee,colour\n" \
           "123,A,B,10,Cab,1 rue X,80021,blue\n" \
           "12345678901,A,B,10,Cab,1 rue X,80021,red\n" \
           "12345678901,A,B,10,Cab,1 rue X,99999,red\n" \
           "12345678901,A,B,10,Cab,1 rue X,80021,red,extra\n"
    rows, errors, warnings, n = read_csv(text)
    assert n == 4 and [r.line for r in rows] == [3]
    assert [(e.where, e.message) for e in errors] == [
        ("line 2", "rpps: expected 11 digits, got '123'"), ("line 4", "insee: unknown commune code '99999'"),
        ("line 5", "more fields than the header has columns (quote a field that contains the separator)")]
    assert warnings[0].message == "unknown columns ignored: colour"
    _, errors, _, _ = read_csv("family;given\nA;B\n")
    assert errors[0].where == "line 1" and "rpps" in errors[0].message


async def test_empty_csv_report_serialises(platform: Platform) -> None:
    """The report as the CLI's --json prints it (what operators script against)."""
    report = await import_csv(platform, HEADER + "\n")
    assert report.as_json() == {"created": {}, "updated": {}, "unchanged": {}, "merged": {}, "skipped": {}, "rows": 0,
                                "errors": [], "warnings": []}
