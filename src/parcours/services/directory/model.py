"""How the care-offer directory is written in FHIR R4, in one place.

Builders turn plain values into Organization, Location, Practitioner,
PractitionerRole and HealthcareService resources; readers get the same values
back from stored resources. The importers, the demo generator and the search
service all go through here, so the encoding below is the only one.

Encoding (see ``docs/directory.md``):

* identifiers follow the national directory (Annuaire Santé): a practitioner's
  IDNPS (``urn:oid:1.2.250.1.71.4.2.1``, "8" + RPPS) and RPPS
  (``https://rpps.esante.gouv.fr``); an organization's IDNST
  (``urn:oid:1.2.250.1.71.4.2.2``, "1" + FINESS, or "4" + SIRET for a private
  practice) and FINESS (``https://finess.esante.gouv.fr``);
* profession: TRE_G15 coding in ``Practitioner.qualification.code`` (as the
  directory does) and in ``PractitionerRole.code`` (so roles are searchable by
  profession with ``role=``); specialty: TRE_R38 in ``PractitionerRole.specialty``;
* languages spoken: ``Practitioner.communication`` (BCP-47 codes);
* accepts new patients: extension ``ACCEPTING_NEW_PATIENTS`` (valueBoolean) on
  the PractitionerRole, mirrored in ``availabilityExceptions`` for people;
* wheelchair access: the R5 cross-version extension
  ``http://hl7.org/fhir/5.0/StructureDefinition/extension-Location.characteristic``
  with ``http://hl7.org/fhir/location-characteristic#wheelchair`` on the Location;
* offers (teleconsultation, unscheduled care, tele-expertise, home visits,
  vaccination, consultation): ``HealthcareService.type`` coded in Parcours'
  ``care-offer`` system plus the v3 ActCode used by the SAS slots (AMB, VR, HH),
  specialty in ``HealthcareService.specialty``; roles point at them with
  ``PractitionerRole.healthcareService``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from parcours.services.directory.geo import COMMUNE_SYSTEM, INSEE_CODE_EXTENSION, Commune
from parcours.services.directory.nomenclatures import (
    ACT_CODE_SYSTEM,
    ANS_LANGUAGE_SYSTEM,
    CARE_OFFER_SYSTEM,
    LANGUAGE_SYSTEM,
    PROFESSION_SYSTEM,
    SPECIALTY_SYSTEM,
    nomenclatures,
)

IDNPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
RPPS_SYSTEM = "https://rpps.esante.gouv.fr"
IDNST_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2"
FINESS_SYSTEM = "https://finess.esante.gouv.fr"
# The directory gives a role identifier under either system (restricted or public extract).
ROLE_SYSTEMS = ("https://annuaire.sante.fr", "https://rpps.esante.gouv.fr")
ID_TYPE_SYSTEM = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"

PARCOURS = "https://parcours.example/fhir"
ACCEPTING_NEW_PATIENTS = f"{PARCOURS}/StructureDefinition/accepting-new-patients"
LOCATION_CHARACTERISTIC = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Location.characteristic"
LOCATION_CHARACTERISTIC_SYSTEM = "http://hl7.org/fhir/location-characteristic"
# Identifiers Parcours gives to what the national directory does not identify.
LOCATION_ID_SYSTEM = f"{PARCOURS}/NamingSystem/location"
SERVICE_ID_SYSTEM = f"{PARCOURS}/NamingSystem/healthcare-service"
ROLE_ID_SYSTEM = f"{PARCOURS}/NamingSystem/practitioner-role"
ORGANIZATION_ID_SYSTEM = f"{PARCOURS}/NamingSystem/organization"
DATASET_TAG_SYSTEM = f"{PARCOURS}/CodeSystem/dataset"
# The two criteria that live in extensions are mirrored as ``meta.tag`` codes, so that the
# search engine (``_tag``, GIN-indexed tokens) filters them in SQL: ``accepting-new-patients``
# on the PractitionerRole, ``wheelchair`` on the Location. ``flag_tags`` keeps them in step.
FLAG_TAG_SYSTEM = f"{PARCOURS}/CodeSystem/directory-flag"
FLAG_NEW_PATIENTS = "accepting-new-patients"
FLAG_WHEELCHAIR = "wheelchair"

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# -- builders -----------------------------------------------------------------------------------
def _id_type(code: str) -> dict:
    return {"coding": [{"system": ID_TYPE_SYSTEM, "code": code}]}


def practitioner_identifiers(rpps: str) -> list[dict]:
    return [
        {"use": "official", "type": _id_type("IDNPS"), "system": IDNPS_SYSTEM, "value": "8" + rpps},
        {"use": "official", "type": _id_type("RPPS"), "system": RPPS_SYSTEM, "value": rpps},
    ]


def organization_identifiers(*, finess: str | None = None, siret: str | None = None) -> list[dict]:
    if finess:
        return [
            {"use": "official", "type": _id_type("IDNST"), "system": IDNST_SYSTEM, "value": "1" + finess},
            {"use": "official", "type": _id_type("FINEG"), "system": FINESS_SYSTEM, "value": finess},
        ]
    if siret:
        return [{"use": "official", "type": _id_type("IDNST"), "system": IDNST_SYSTEM, "value": "4" + siret}]
    raise ValueError("an organization needs a FINESS or a SIRET number")


def address(line: str, commune: Commune, postal_code: str | None = None) -> dict:
    pc = postal_code or commune.postal_code
    return {
        "extension": [{"url": INSEE_CODE_EXTENSION, "valueCoding": {"system": COMMUNE_SYSTEM, "code": commune.code}}],
        "use": "work", "type": "physical", "line": [line], "city": commune.name, "postalCode": pc,
        "district": commune.departement, "country": "FR",
    }


def tag(dataset: str | None) -> dict:
    return {"tag": [{"system": DATASET_TAG_SYSTEM, "code": dataset}]} if dataset else {}


def practitioner(*, rpps: str, family: str, given: str, gender: str | None, profession: str,
                 languages: Iterable[str] = ("fr",), phone: str | None = None, dataset: str | None = None) -> dict:
    nom = nomenclatures()
    prof = nom.professions.get(profession)
    if prof is None:
        raise ValueError(f"unknown profession code {profession!r}")
    res: dict[str, Any] = {
        "resourceType": "Practitioner",
        "meta": tag(dataset),
        "identifier": practitioner_identifiers(rpps),
        "active": True,
        "name": [{"use": "usual", "family": family, "given": [given], "prefix": ["Dr"] if profession in ("10", "40") else []}],
        "qualification": [{"code": {"coding": [prof.coding()]}}],
        "communication": [_language(code) for code in languages],
    }
    if not res["name"][0]["prefix"]:
        del res["name"][0]["prefix"]
    if gender:
        res["gender"] = gender
    if phone:
        res["telecom"] = [{"system": "phone", "value": phone, "use": "work"}]
    if not dataset:
        del res["meta"]
    return res


def _language(code: str) -> dict:
    lang = nomenclatures().languages.get(code)
    coding = {"system": LANGUAGE_SYSTEM, "code": code}
    if lang:
        coding["display"] = lang.fr
    return {"coding": [coding]}


def organization(*, name: str, identifiers: list[dict], line: str, commune: Commune, phone: str | None = None,
                 kind: str = "cabinet", extra_identifiers: Iterable[dict] = (), dataset: str | None = None) -> dict:
    res: dict[str, Any] = {
        "resourceType": "Organization",
        "meta": tag(dataset),
        "identifier": [*identifiers, *extra_identifiers],
        "active": True,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov",
                              "display": "Healthcare Provider"}], "text": kind}],
        "name": name,
        "address": [address(line, commune)],
    }
    if phone:
        res["telecom"] = [{"system": "phone", "value": phone, "use": "work"}]
    if not dataset:
        del res["meta"]
    return res


def opening_hours(days: Iterable[str], opening: str, closing: str) -> list[dict]:
    return [{"daysOfWeek": list(days), "allDay": False, "openingTime": opening, "closingTime": closing}]


def location(*, key: str, name: str, line: str, commune: Commune, lat: float, lon: float, organization_ref: str | None,
             wheelchair: bool, hours: list[dict] | None = None, phone: str | None = None, dataset: str | None = None) -> dict:
    res: dict[str, Any] = {
        "resourceType": "Location",
        "meta": tag(dataset),
        "identifier": [{"system": LOCATION_ID_SYSTEM, "value": key}],
        "status": "active",
        "name": name,
        "mode": "instance",
        "address": address(line, commune),
        "physicalType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/location-physical-type", "code": "bu",
                                     "display": "Building"}]},
        "position": {"latitude": round(lat, 6), "longitude": round(lon, 6)},
    }
    if wheelchair:
        res["extension"] = [{"url": LOCATION_CHARACTERISTIC, "valueCodeableConcept": {"coding": [
            {"system": LOCATION_CHARACTERISTIC_SYSTEM, "code": "wheelchair", "display": "Wheelchair accessible"}]}}]
    if organization_ref:
        res["managingOrganization"] = {"reference": organization_ref}
    if hours:
        res["hoursOfOperation"] = hours
    if phone:
        res["telecom"] = [{"system": "phone", "value": phone, "use": "work"}]
    if not dataset:
        del res["meta"]
    return flag_tags(res)


def healthcare_service(*, key: str, offer: str, name: str, organization_ref: str, location_refs: list[str],
                       specialty: str | None = None, profession: str | None = None, hours: list[dict] | None = None,
                       dataset: str | None = None) -> dict:
    nom = nomenclatures()
    o = nom.care_offers.get(offer)
    if o is None:
        raise ValueError(f"unknown care offer {offer!r}")
    types = [o.coding()]
    if o.act_code:
        types.append({"system": ACT_CODE_SYSTEM, "code": o.act_code})
    res: dict[str, Any] = {
        "resourceType": "HealthcareService",
        "meta": tag(dataset),
        "identifier": [{"system": SERVICE_ID_SYSTEM, "value": key}],
        "active": True,
        "providedBy": {"reference": organization_ref},
        "type": [{"coding": types, "text": o.fr}],
        "location": [{"reference": r} for r in location_refs],
        "name": name,
        "appointmentRequired": offer not in ("unscheduled-care",),
    }
    if specialty:
        sp = nom.specialties.get(specialty)
        if sp is not None:
            res["specialty"] = [{"coding": [sp.coding()]}]
    if profession and not specialty:
        prof = nom.professions.get(profession)
        if prof is not None:
            res["category"] = [{"coding": [prof.coding()]}]
    if hours:
        res["availableTime"] = [{"daysOfWeek": h["daysOfWeek"], "availableStartTime": h["openingTime"],
                                 "availableEndTime": h["closingTime"]} for h in hours]
    if offer == "teleconsultation":
        res["characteristic"] = [{"coding": [o.coding()]}]
    if not dataset:
        del res["meta"]
    return res


def practitioner_role(*, key: str, practitioner_ref: str, organization_ref: str, location_refs: list[str],
                      service_refs: list[str], profession: str, specialty: str | None, accepts_new_patients: bool | None,
                      phone: str | None = None, dataset: str | None = None) -> dict:
    nom = nomenclatures()
    prof = nom.professions.get(profession)
    if prof is None:
        raise ValueError(f"unknown profession code {profession!r}")
    res: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "meta": tag(dataset),
        "identifier": [{"system": ROLE_ID_SYSTEM, "value": key}],
        "active": True,
        "practitioner": {"reference": practitioner_ref},
        "organization": {"reference": organization_ref},
        "code": [{"coding": [prof.coding()]}],
        "location": [{"reference": r} for r in location_refs],
        "healthcareService": [{"reference": r} for r in service_refs],
    }
    if specialty:
        sp = nom.specialties.get(specialty)
        if sp is None:
            raise ValueError(f"unknown specialty code {specialty!r}")
        res["specialty"] = [{"coding": [sp.coding()]}]
    if accepts_new_patients is not None:
        res["extension"] = [{"url": ACCEPTING_NEW_PATIENTS, "valueBoolean": accepts_new_patients}]
        res["availabilityExceptions"] = ("Accepte de nouveaux patients" if accepts_new_patients
                                         else "N'accepte pas de nouveaux patients")
    if phone:
        res["telecom"] = [{"system": "phone", "value": phone, "use": "work"}]
    if not service_refs:
        del res["healthcareService"]
    if not dataset:
        del res["meta"]
    return flag_tags(res)


def flag_tags(res: dict) -> dict:
    """Set (or remove) the ``FLAG_TAG_SYSTEM`` tags of a PractitionerRole or Location from its
    extensions; other resources are returned unchanged. Modifies and returns ``res``."""
    rtype = res.get("resourceType")
    if rtype == "PractitionerRole":
        code, on = FLAG_NEW_PATIENTS, accepts_new_patients(res) is True
    elif rtype == "Location":
        code, on = FLAG_WHEELCHAIR, wheelchair_accessible(res)
    else:
        return res
    meta = dict(res.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if not (t.get("system") == FLAG_TAG_SYSTEM and t.get("code") == code)]
    if on:
        tags.append({"system": FLAG_TAG_SYSTEM, "code": code})
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)
    if meta:
        res["meta"] = meta
    else:
        res.pop("meta", None)
    return res


# -- readers ------------------------------------------------------------------------------------
def codes(concepts: Iterable[dict] | None, system: str) -> list[str]:
    out = []
    for cc in concepts or []:
        for c in cc.get("coding") or []:
            if c.get("system") == system and c.get("code"):
                out.append(c["code"])
    return out


def role_professions(role: dict) -> list[str]:
    return codes(role.get("code"), PROFESSION_SYSTEM)


def practitioner_professions(prac: dict) -> list[str]:
    return codes([q.get("code") or {} for q in prac.get("qualification") or []], PROFESSION_SYSTEM)


def role_specialties(role: dict) -> list[str]:
    return codes(role.get("specialty"), SPECIALTY_SYSTEM)


def accepts_new_patients(role: dict) -> bool | None:
    for ext in role.get("extension") or []:
        if ext.get("url") == ACCEPTING_NEW_PATIENTS and isinstance(ext.get("valueBoolean"), bool):
            return ext["valueBoolean"]
    return None


def wheelchair_accessible(loc: dict) -> bool:
    for ext in loc.get("extension") or []:
        if ext.get("url") == LOCATION_CHARACTERISTIC:
            for c in (ext.get("valueCodeableConcept") or {}).get("coding") or []:
                if c.get("system") == LOCATION_CHARACTERISTIC_SYSTEM and c.get("code") == "wheelchair":
                    return True
    return False


def languages(prac: dict) -> list[str]:
    out = []
    for cc in prac.get("communication") or []:
        for c in cc.get("coding") or []:
            if c.get("system") in (LANGUAGE_SYSTEM, ANS_LANGUAGE_SYSTEM) and c.get("code"):
                out.append(c["code"])
    return out


def service_offers(service: dict) -> list[str]:
    return codes(service.get("type"), CARE_OFFER_SYSTEM)


def position(loc: dict) -> tuple[float, float] | None:
    p = loc.get("position") or {}
    lat, lon = p.get("latitude"), p.get("longitude")
    if isinstance(lat, (int, float)) and isinstance(lon, (int, float)):
        return float(lat), float(lon)
    return None


def display_name(prac: dict) -> str:
    for n in prac.get("name") or []:
        parts = [*(n.get("prefix") or []), *(n.get("given") or []), n.get("family") or ""]
        text = n.get("text") or " ".join(p for p in parts if p)
        if text:
            return text
    return ""


def reference_id(ref: dict | None, rtype: str) -> str | None:
    r = (ref or {}).get("reference") or ""
    if r.startswith(rtype + "/"):
        return r.split("/")[1]
    return None


def address_text(addr: dict | None) -> str:
    if not addr:
        return ""
    street = " ".join(addr.get("line") or [])
    town = " ".join(x for x in (addr.get("postalCode"), addr.get("city")) if x)
    return ", ".join(p for p in (street, town) if p)


def luhn_ok(number: str) -> bool:
    """Luhn check. Corsica's FINESS numbers start with its département, ``2A`` or ``2B``:
    the letter counts as 0 in the key (as ``20``), so a number like ``2A0001234`` checks."""
    total = 0
    for i, ch in enumerate(reversed(number.upper())):
        if ch in "AB":
            ch = "0"
        if not ch.isdigit():
            return False
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def with_luhn(prefix: str) -> str:
    """``prefix`` followed by the Luhn check digit (RPPS, SIRET and FINESS use it)."""
    for d in "0123456789":
        if luhn_ok(prefix + d):
            return prefix + d
    raise AssertionError("unreachable")


__all__ = [
    "ACCEPTING_NEW_PATIENTS", "DATASET_TAG_SYSTEM", "FLAG_NEW_PATIENTS", "FLAG_TAG_SYSTEM", "FLAG_WHEELCHAIR", "flag_tags", "DAYS", "FINESS_SYSTEM", "IDNPS_SYSTEM", "IDNST_SYSTEM",
    "LOCATION_CHARACTERISTIC", "LOCATION_ID_SYSTEM", "ORGANIZATION_ID_SYSTEM", "ROLE_ID_SYSTEM", "ROLE_SYSTEMS",
    "RPPS_SYSTEM", "SERVICE_ID_SYSTEM", "accepts_new_patients", "address", "address_text", "display_name",
    "healthcare_service", "languages", "location", "opening_hours", "organization", "position", "practitioner",
    "practitioner_role", "role_professions", "role_specialties", "service_offers", "wheelchair_accessible", "with_luhn",
]
