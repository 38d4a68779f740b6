"""The CapabilityStatement, generated from what the server really supports."""

from __future__ import annotations

from functools import cache
from typing import Any

import parcours
from parcours.fhir.registry import Registry

INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]


@cache
def _resources(reg: Registry) -> list[dict[str, Any]]:
    out = []
    for rtype in reg.resource_types:
        params = [
            {"name": sp.code, "definition": sp.url, "type": sp.type}
            for code, sp in sorted(reg.params(rtype).items())
        ]
        if rtype == "Location":
            params.append({"name": "near", "definition": "http://hl7.org/fhir/SearchParameter/Location-near", "type": "special"})
        params += [
            {"name": "_text", "type": "string", "documentation": "French-aware full-text search of the narrative"},
            {"name": "_content", "type": "string", "documentation": "French-aware full-text search of the whole resource"},
        ]
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": c} for c in INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "not-supported",
            "conditionalUpdate": True,
            "conditionalDelete": "multiple",
            "referencePolicy": ["literal", "logical", "local"],
            "searchInclude": sorted({f"{rtype}:{sp.code}" for sp in reg.params(rtype).values() if sp.type == "reference"}),
            "searchRevInclude": [],
            "searchParam": params,
        }
        if rtype == "Patient":
            entry["operation"] = [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]
        out.append(entry)
    return out


def capability_statement(platform: Any) -> dict[str, Any]:
    reg: Registry = platform.registry
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "publisher": "Parcours",
        "kind": "instance",
        "software": {"name": "Parcours", "version": parcours.__version__},
        "implementation": {"description": "Parcours FHIR R4 server", "url": platform.settings.fhir_base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [
            {
                "mode": "server",
                "security": {"cors": True, "description": "Bearer tokens (SMART on FHIR scopes)"},
                "resource": _resources(reg),
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "search-system"}, {"code": "history-system"}],
                "searchParam": [
                    {"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"},
                    {"name": "_type", "type": "token"},
                ],
                "operation": [{"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}],
            }
        ],
    }
