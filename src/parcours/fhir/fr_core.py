"""French identifiers and identity vigilance on FHIR resources (FR Core conventions), pure.

* INS (Identifiant National de Santé): ``Patient.identifier`` with system
  ``urn:oid:1.2.250.1.213.1.4.8`` (INS-NIR) and the FR Core identifier type ``INS-NIR``.
* RPPS: ``Practitioner.identifier`` with system ``urn:oid:1.2.250.1.71.4.2.1``.
* Identity status (RNIV, "statut de confiance de l'identité"): the FR Core extension
  ``fr-core-identity-reliability`` whose ``identityStatus`` coding is one of the four
  exclusive statuses PROV, RECUP, VALI, QUAL of the FR Core code system v2-0445.
"""

from __future__ import annotations

import copy
from typing import Any

INS_NIR_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
INS_NIA_SYSTEM = "urn:oid:1.2.250.1.213.1.4.9"
RPPS_SYSTEM = "urn:oid:1.2.250.1.71.4.2.1"
IDENTIFIER_TYPE_SYSTEM = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
RELIABILITY_URL = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
STATUS_SYSTEM = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445"

# Our names for the four RNIV statuses <-> FR Core codes.
STATUS_CODES = {"provisional": "PROV", "recovered": "RECUP", "validated": "VALI", "qualified": "QUAL"}
STATUS_DISPLAY = {"PROV": "Identité provisoire", "RECUP": "Identité récupérée",
                  "VALI": "Identité validée", "QUAL": "Identité qualifiée"}
CODE_STATUSES = {v: k for k, v in STATUS_CODES.items()}
# Statuses that need the INS returned by the INSi teleservice (RNIV: "récupérée", "qualifiée").
NEEDS_INS = frozenset({"recovered", "qualified"})


def identifier_value(resource: dict, system: str) -> str | None:
    for ident in resource.get("identifier") or []:
        if ident.get("system") == system and ident.get("value"):
            return str(ident["value"])
    return None


def ins(patient: dict) -> str | None:
    return identifier_value(patient, INS_NIR_SYSTEM)


def rpps(practitioner: dict) -> str | None:
    return identifier_value(practitioner, RPPS_SYSTEM)


def identity_status(patient: dict) -> str | None:
    """The RNIV status recorded on a Patient ("provisional"...), or None when none is."""
    for ext in patient.get("extension") or []:
        if ext.get("url") != RELIABILITY_URL:
            continue
        for sub in ext.get("extension") or []:
            coding = sub.get("valueCoding") or {}
            if sub.get("url") == "identityStatus" and coding.get("system") == STATUS_SYSTEM:
                status = CODE_STATUSES.get(str(coding.get("code")))
                if status:
                    return status
    return None


def with_identity_status(patient: dict, status: str) -> dict:
    """A copy of ``patient`` whose identity-reliability extension says ``status``.

    Other sub-extensions (validation date and mode) are kept; the INS identifier
    gets the FR Core ``INS-NIR`` type when it has none.
    """
    code = STATUS_CODES[status]
    out = copy.deepcopy(patient)
    status_ext: dict[str, Any] = {"url": "identityStatus",
                                  "valueCoding": {"system": STATUS_SYSTEM, "code": code, "display": STATUS_DISPLAY[code]}}
    exts = out.setdefault("extension", [])
    for ext in exts:
        if ext.get("url") == RELIABILITY_URL:
            subs = [s for s in ext.get("extension") or [] if s.get("url") != "identityStatus"]
            ext["extension"] = [status_ext, *subs]
            break
    else:
        exts.append({"url": RELIABILITY_URL, "extension": [status_ext]})
    for ident in out.get("identifier") or []:
        if ident.get("system") == INS_NIR_SYSTEM and not ident.get("type"):
            ident["type"] = {"coding": [{"system": IDENTIFIER_TYPE_SYSTEM, "code": "INS-NIR"}]}
    return out


def display_name(resource: dict) -> str:
    """"Given FAMILY" from the first usable HumanName (Patient, Practitioner, RelatedPerson)."""
    names = resource.get("name") or []
    if isinstance(names, dict):  # Organization-like resources have a string name
        names = [names]
    if isinstance(names, str):
        return names
    for name in sorted(names, key=lambda n: 0 if n.get("use") in ("usual", "official") else 1):
        if name.get("text"):
            return str(name["text"])
        given = " ".join(name.get("given") or [])
        family = name.get("family") or ""
        full = f"{given} {family}".strip()
        if full:
            return full
    return ""
