"""The ``_summary`` and ``_elements`` result parameters, applied to one resource.

Element metadata (the summary flag, the required flag, choice groups) comes from
the R4B models of ``fhir.resources``, the nearest maintained model set to R4
4.0.1 (see :mod:`parcours.fhir.validation`). Only top-level elements are
filtered, as R4 specifies for ``_elements`` and as most servers do for
``_summary``.

The functions return a new top-level dict and a new ``meta``; the other values
are shared with the input, so callers must not mutate them in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

from parcours.core.errors import InvalidSearch

__all__ = ["SUBSETTED_TAG", "SUMMARY_MODES", "apply_elements", "apply_summary", "summary_elements"]

SUBSETTED_TAG: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
SUMMARY_MODES: frozenset[str] = frozenset({"true", "text", "data", "count", "false"})

# Kept in every subset: without them the result is not an addressable resource.
_ALWAYS: frozenset[str] = frozenset({"resourceType", "id", "meta"})


@dataclass(frozen=True, slots=True)
class _TypeInfo:
    summary: frozenset[str]  # JSON names, choice types expanded
    mandatory: frozenset[str]  # JSON names with min >= 1 (all types of a required choice)
    choices: dict[str, frozenset[str]]  # "deceased" -> {"deceasedBoolean", "deceasedDateTime"}
    names: frozenset[str]  # every top-level JSON name


@cache
def _info(resource_type: str) -> _TypeInfo | None:
    try:
        model = get_fhir_model_class(resource_type)
    except Exception:  # unknown name: no metadata, callers fall back to _ALWAYS
        return None
    if model.__resource_type__ != resource_type or not model.has_resource_base():
        return None  # a data type or backbone element, not a resource
    summary: set[str] = set()
    mandatory: set[str] = set()
    choices: dict[str, set[str]] = {}
    names: set[str] = set()
    for attr, field in model.model_fields.items():
        extra: dict[str, Any] = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if attr.endswith("__ext") or not extra.get("element_property"):
            continue
        name = field.alias or attr
        names.add(name)
        if extra.get("summary_element_property"):
            summary.add(name)
        choice = extra.get("one_of_many")
        if choice:
            choices.setdefault(choice, set()).add(name)
            if extra.get("one_of_many_required"):
                mandatory.add(name)
        elif field.is_required() or extra.get("element_required"):
            mandatory.add(name)
    return _TypeInfo(
        summary=frozenset(summary),
        mandatory=frozenset(mandatory),
        choices={prefix: frozenset(group) for prefix, group in choices.items()},
        names=frozenset(names),
    )


def summary_elements(resource_type: str) -> frozenset[str]:
    """Top-level JSON element names marked summary for ``resource_type``.

    Choice elements appear under each of their JSON names (``deceasedBoolean``,
    ``deceasedDateTime``); ``id``, ``meta`` and ``resourceType`` are always in.
    An unknown type yields just those three.
    """
    info = _info(resource_type)
    return _ALWAYS | info.summary if info is not None else _ALWAYS


def apply_summary(resource: dict[str, Any], mode: str) -> dict[str, Any]:
    """Apply ``_summary=<mode>`` to one resource and return a new dict.

    ``true`` keeps the summary elements; ``text`` keeps ``text``, ``id``, ``meta``
    and the mandatory top-level elements; ``data`` drops ``text``; ``false``
    keeps everything. ``count`` asks for no resources at all; applied to a single
    resource it leaves only ``resourceType``, ``id`` and ``meta``. A resource
    that lost anything gets the ``SUBSETTED`` tag.
    """
    if mode not in SUMMARY_MODES:
        raise InvalidSearch(f"Unknown _summary value '{mode}'; expected one of true, text, data, count, false")
    if mode == "false":
        return dict(resource)
    if mode == "data":
        return _subset(resource, lambda name: name != "text")
    info = _info(str(resource.get("resourceType")))
    if mode == "true":
        keep = summary_elements(str(resource.get("resourceType")))
    elif mode == "text":
        keep = _ALWAYS | {"text"} | (info.mandatory if info is not None else frozenset())
    else:  # count
        keep = _ALWAYS
    return _subset(resource, keep.__contains__)


def apply_elements(resource: dict[str, Any], elements: list[str]) -> dict[str, Any]:
    """Apply ``_elements=<names>`` to one resource and return a new dict.

    Names are top-level elements; a choice name such as ``deceased`` keeps every
    ``deceased[x]`` type, a ``Patient.name`` style prefix is accepted and a
    deeper path (``name.family``) keeps its whole top-level element.
    ``resourceType``, ``id`` and ``meta`` are always kept.
    """
    rtype = str(resource.get("resourceType"))
    info = _info(rtype)
    keep: set[str] = set(_ALWAYS)
    for raw in elements:
        name = raw.strip()
        if name.startswith(rtype + "."):
            name = name[len(rtype) + 1 :]
        name = name.split(".", 1)[0]
        if not name:
            continue
        keep.add(name)
        if info is not None and name in info.choices:
            keep |= info.choices[name]
    return _subset(resource, keep.__contains__)


def _subset(resource: dict[str, Any], wanted: Any) -> dict[str, Any]:
    """Copy the wanted top-level elements (with their ``_x`` extension siblings)."""
    out: dict[str, Any] = {}
    removed = False
    for key, value in resource.items():
        base = key[1:] if isinstance(key, str) and key.startswith("_") else key
        if base in _ALWAYS or wanted(base):
            out[key] = value
        else:
            removed = True
    if removed:
        _tag_subsetted(out)
    return out


def _tag_subsetted(out: dict[str, Any]) -> None:
    meta = out.get("meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    tags = meta.get("tag")
    tags = list(tags) if isinstance(tags, list) else []
    if not any(
        isinstance(t, dict) and t.get("system") == SUBSETTED_TAG["system"] and t.get("code") == "SUBSETTED"
        for t in tags
    ):
        tags.append(dict(SUBSETTED_TAG))
    meta["tag"] = tags
    out["meta"] = meta
    # Keep resourceType, id and meta at the top, as FHIR JSON writers do.
    ordered: dict[str, Any] = {k: out[k] for k in ("resourceType", "id", "meta") if k in out}
    ordered.update((k, v) for k, v in out.items() if k not in ordered)
    out.clear()
    out.update(ordered)
