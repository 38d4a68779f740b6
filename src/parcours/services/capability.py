"""The CapabilityStatement, generated from what the server really supports.

Interactions, operations and conditional support are those the FHIR router and
the Repository implement; search parameters, includes and revincludes come from
the search-parameter registry that the indexer and the search compiler read.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

import parcours
from parcours.fhir.registry import Registry

# What /fhir/{type} and /fhir/{type}/{id} answer (web/fhir.py routes).
INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
SYSTEM_INTERACTIONS = ["transaction", "batch", "search-system", "history-system"]
RESULT_PARAMS = [
    ("_count", "number", "Page size"),
    ("_offset", "number", "Index of the first match to return"),
    ("_sort", "string", "Sort order: comma-separated parameter codes, '-' for descending"),
    ("_include", "special", "Add the resources the matches reference (:iterate supported)"),
    ("_revinclude", "special", "Add the resources that reference the matches (:iterate supported)"),
    ("_summary", "token", "true | text | data | count | false"),
    ("_elements", "string", "Return only these elements"),
    ("_total", "token", "none | estimate | accurate"),
]
VALIDATE = {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}
EVERYTHING = {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}
# Booking (docs/booking.md): free slots as Slots or proposed Appointments, and booking one.
FIND = {"name": "find", "definition": "https://parcours.example/fhir/OperationDefinition/find"}
BOOK = {"name": "book", "definition": "https://parcours.example/fhir/OperationDefinition/book"}
OPERATIONS = {"Patient": [EVERYTHING, VALIDATE], "Slot": [FIND, VALIDATE], "Appointment": [FIND, BOOK, VALIDATE]}


@cache
def _revincludes(reg: Registry) -> dict[str, list[str]]:
    """For each type, the ``Source:param`` references that can point at it."""
    out: dict[str, set[str]] = {}
    for source in reg.resource_types:
        for sp in reg.params(source).values():
            if sp.type != "reference":
                continue
            for target in sp.targets or reg.resource_types:
                out.setdefault(target, set()).add(f"{source}:{sp.code}")
    return {k: sorted(v) for k, v in out.items()}


@cache
def _resources(reg: Registry) -> list[dict[str, Any]]:
    revs = _revincludes(reg)
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
            # If-None-Match and If-Modified-Since on read.
            "conditionalRead": "full-support",
            "conditionalUpdate": True,
            # Several matches are a 412 unless the client opts in (Prefer: handling=multiple).
            "conditionalDelete": "multiple",
            "referencePolicy": ["literal", "logical", "local"],
            "searchInclude": ["*"] + sorted({f"{rtype}:{sp.code}" for sp in reg.params(rtype).values() if sp.type == "reference"}),
            "searchRevInclude": revs.get(rtype, []),
            "searchParam": params,
            "operation": OPERATIONS.get(rtype, [VALIDATE]),
        }
        out.append(entry)
    return out


def _security(fhir_base: str) -> dict[str, Any]:
    """SMART on FHIR: where apps get their tokens (the same URLs as .well-known/smart-configuration)."""
    base = fhir_base.removesuffix("/fhir")
    return {
        "cors": False,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR"}]}],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "authorize", "valueUri": f"{base}/oauth/authorize"},
                {"url": "token", "valueUri": f"{base}/oauth/token"},
                {"url": "revoke", "valueUri": f"{base}/oauth/revoke"},
                {"url": "introspect", "valueUri": f"{base}/oauth/introspect"},
            ],
        }],
        "description": "Bearer tokens (SMART on FHIR scopes) on every call but /metadata; "
                       f"discovery at {fhir_base}/.well-known/smart-configuration",
    }


@cache
def _statement(reg: Registry, fhir_base: str) -> bytes:
    return orjson.dumps({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "publisher": "Parcours",
        "kind": "instance",
        "software": {"name": "Parcours", "version": parcours.__version__},
        "implementation": {"description": "Parcours FHIR R4 server", "url": fhir_base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/merge-patch+json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Conditional create takes If-None-Exist (or the criteria as the query string of the POST). "
                    "Conditional delete removes several matches only when asked with 'Prefer: handling=multiple'; "
                    "otherwise several matches are a 412. PATCH takes JSON Patch (and JSON Merge Patch); "
                    "FHIRPath Patch is not supported. Read honours If-None-Match and If-Modified-Since; "
                    "update, patch and delete honour If-Match."
                ),
                "security": _security(fhir_base),
                "resource": _resources(reg),
                "interaction": [{"code": c} for c in SYSTEM_INTERACTIONS],
                "searchParam": [
                    {"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"},
                    {"name": "_type", "type": "token"},
                ] + [{"name": n, "type": t, "documentation": d} for n, t, d in RESULT_PARAMS],
            }
        ],
    })


def capability_statement(platform: Any) -> bytes:
    """The statement as JSON bytes (built once per registry and base URL)."""
    return _statement(platform.registry, platform.settings.fhir_base)
