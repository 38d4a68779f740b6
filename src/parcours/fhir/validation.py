"""Structural validation of FHIR R4 resources given as parsed JSON.

Two passes, both without I/O:

1. The pydantic models of ``fhir.resources`` check structure, cardinality and
   datatypes. We use the **R4B** (4.3.0) model set: ``fhir.resources`` no longer
   ships R4 (4.0.1) models and R4B is the nearest maintained set. The two releases
   share almost every element. Types new in R4B are not accepted; the R4 types
   R4B dropped (``R4_ONLY_TYPES``: MedicinalProduct*, Substance* details,
   *EvidenceSynthesis) cannot be validated and are reported as not supported.
   Evidence and EvidenceVariable were redesigned in R4B and follow the R4B shape.
2. A walk of the raw JSON, guided by metadata cached per model class, covers what
   the models accept too leniently or do not check at all: required code bindings
   (``enum_values``), reference syntax and target types, lax JSON types
   (``"active": "yes"``, ``"value": "1.5"``), id length, nulls and empty arrays,
   choice elements and required elements hidden behind an earlier pydantic error.

``validate_resource`` never raises: anything wrong in the input becomes an
:class:`~parcours.core.errors.Issue` whose ``expression`` is a FHIRPath-like path
such as ``Patient.name[0].given[1]``.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.types import FhirBase
from pydantic import ValidationError

from parcours.core.errors import Issue

__all__ = ["R4_ONLY_TYPES", "R4_RESOURCE_TYPES", "resource_types", "validate_resource"]

Model = type[FHIRAbstractModel]

# Every R4 4.0.1 resource type (the spec's resource list). Hard-coded rather than
# derived from the models: deriving means importing all 682 model classes (over a
# second), and R4B adds types that an R4 server must not accept (Citation,
# Ingredient, SubscriptionTopic, ...).
R4_RESOURCE_TYPES: frozenset[str] = frozenset(
    {
        "Account", "ActivityDefinition", "AdverseEvent", "AllergyIntolerance", "Appointment",
        "AppointmentResponse", "AuditEvent", "Basic", "Binary", "BiologicallyDerivedProduct",
        "BodyStructure", "Bundle", "CapabilityStatement", "CarePlan", "CareTeam", "CatalogEntry",
        "ChargeItem", "ChargeItemDefinition", "Claim", "ClaimResponse", "ClinicalImpression",
        "CodeSystem", "Communication", "CommunicationRequest", "CompartmentDefinition",
        "Composition", "ConceptMap", "Condition", "Consent", "Contract", "Coverage",
        "CoverageEligibilityRequest", "CoverageEligibilityResponse", "DetectedIssue", "Device",
        "DeviceDefinition", "DeviceMetric", "DeviceRequest", "DeviceUseStatement",
        "DiagnosticReport", "DocumentManifest", "DocumentReference", "EffectEvidenceSynthesis",
        "Encounter", "Endpoint", "EnrollmentRequest", "EnrollmentResponse", "EpisodeOfCare",
        "EventDefinition", "Evidence", "EvidenceVariable", "ExampleScenario",
        "ExplanationOfBenefit", "FamilyMemberHistory", "Flag", "Goal", "GraphDefinition", "Group",
        "GuidanceResponse", "HealthcareService", "ImagingStudy", "Immunization",
        "ImmunizationEvaluation", "ImmunizationRecommendation", "ImplementationGuide",
        "InsurancePlan", "Invoice", "Library", "Linkage", "List", "Location", "Measure",
        "MeasureReport", "Media", "Medication", "MedicationAdministration", "MedicationDispense",
        "MedicationKnowledge", "MedicationRequest", "MedicationStatement", "MedicinalProduct",
        "MedicinalProductAuthorization", "MedicinalProductContraindication",
        "MedicinalProductIndication", "MedicinalProductIngredient", "MedicinalProductInteraction",
        "MedicinalProductManufactured", "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect", "MessageDefinition",
        "MessageHeader", "MolecularSequence", "NamingSystem", "NutritionOrder", "Observation",
        "ObservationDefinition", "OperationDefinition", "OperationOutcome", "Organization",
        "OrganizationAffiliation", "Parameters", "Patient", "PaymentNotice",
        "PaymentReconciliation", "Person", "PlanDefinition", "Practitioner", "PractitionerRole",
        "Procedure", "Provenance", "Questionnaire", "QuestionnaireResponse", "RelatedPerson",
        "RequestGroup", "ResearchDefinition", "ResearchElementDefinition", "ResearchStudy",
        "ResearchSubject", "RiskAssessment", "RiskEvidenceSynthesis", "Schedule", "SearchParameter",
        "ServiceRequest", "Slot", "Specimen", "SpecimenDefinition", "StructureDefinition",
        "StructureMap", "Subscription", "Substance", "SubstanceNucleicAcid", "SubstancePolymer",
        "SubstanceProtein", "SubstanceReferenceInformation", "SubstanceSourceMaterial",
        "SubstanceSpecification", "SupplyDelivery", "SupplyRequest", "Task",
        "TerminologyCapabilities", "TestReport", "TestScript", "ValueSet", "VerificationResult",
        "VisionPrescription",
    }
)  # fmt: skip

# R4 types that R4B removed: no model exists, so they cannot be validated, but a
# reference to one of them is still a well-formed R4 reference.
R4_ONLY_TYPES: frozenset[str] = frozenset(
    {
        "EffectEvidenceSynthesis", "MedicinalProduct", "MedicinalProductAuthorization",
        "MedicinalProductContraindication", "MedicinalProductIndication",
        "MedicinalProductIngredient", "MedicinalProductInteraction",
        "MedicinalProductManufactured", "MedicinalProductPackaged",
        "MedicinalProductPharmaceutical", "MedicinalProductUndesirableEffect",
        "RiskEvidenceSynthesis", "SubstanceNucleicAcid", "SubstancePolymer", "SubstanceProtein",
        "SubstanceReferenceInformation", "SubstanceSourceMaterial", "SubstanceSpecification",
    }
)  # fmt: skip
_VALIDATABLE_TYPES: frozenset[str] = R4_RESOURCE_TYPES - R4_ONLY_TYPES

# Required bindings whose model metadata ends with "+" (the generator took the
# codes from the element's short description, which is truncated). Full code
# lists come from the R4 4.0.1 value sets.
_OBSERVATION_STATUS = ("registered", "preliminary", "final", "amended", "corrected", "cancelled",
                       "entered-in-error", "unknown")  # fmt: skip
_ENCOUNTER_STATUS = ("planned", "arrived", "triaged", "in-progress", "onleave", "finished",
                     "cancelled", "entered-in-error", "unknown")  # fmt: skip
_ENUM_OVERRIDES: dict[tuple[str, str], tuple[str, ...]] = {
    ("DetectedIssue", "status"): _OBSERVATION_STATUS,
    ("Observation", "status"): _OBSERVATION_STATUS,
    ("RiskAssessment", "status"): _OBSERVATION_STATUS,
    ("DeviceUdiCarrier", "entryType"): ("barcode", "rfid", "manual", "card", "self-reported", "unknown"),
    ("DeviceUseStatement", "status"): ("active", "completed", "entered-in-error", "intended", "stopped",
                                       "on-hold"),
    ("DiagnosticReport", "status"): ("registered", "partial", "preliminary", "final", "amended", "corrected",
                                     "appended", "cancelled", "entered-in-error", "unknown"),
    ("Encounter", "status"): _ENCOUNTER_STATUS,
    ("EncounterStatusHistory", "status"): _ENCOUNTER_STATUS,
    ("QuestionnaireItem", "type"): ("group", "display", "question", "boolean", "decimal", "integer", "date",
                                    "dateTime", "time", "string", "text", "url", "choice", "open-choice",
                                    "attachment", "reference", "quantity"),
    ("StructureMapGroupRuleTarget", "transform"): ("create", "copy", "truncate", "escape", "cast", "append",
                                                   "translate", "reference", "dateOp", "uuid", "pointer",
                                                   "evaluate", "cc", "c", "qty", "id", "cp"),
    ("SupplyRequest", "status"): ("draft", "active", "suspended", "cancelled", "completed", "entered-in-error",
                                  "unknown"),
    ("Task", "status"): ("draft", "requested", "received", "accepted", "rejected", "ready", "cancelled",
                         "in-progress", "on-hold", "failed", "completed", "entered-in-error"),
}  # fmt: skip

_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ID_HINT = "an id is 1 to 64 characters from A-Z, a-z, 0-9, '-' and '.'"
_ID = r"[A-Za-z0-9\-.]{1,64}"
_RELATIVE_REF_RE = re.compile(rf"([A-Za-z]+)/({_ID})(?:/_history/({_ID}))?")
# The tail of an absolute URL that points at a FHIR server resource, so that the
# target type of ``http://server/fhir/Patient/1`` can be checked as well.
_URL_TAIL_RE = re.compile(rf"(?:^|/)([A-Z][A-Za-z]+)/{_ID}(?:/_history/{_ID})?$")
_HTTP_RE = re.compile(r"https?://[^\s/?#]+[^\s]*")
_UUID_RE = re.compile(r"urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_OID_RE = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
_NO_SPACE_RE = re.compile(r"\S+")
_BASE64_CHARS_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_WS_RE = re.compile(r"\s+")
_ONE_OF_MANY_MSG = ("Any of one field value is expected", "Expect any of field value")

_FORMAT_HINTS: dict[str, str] = {
    "date": "expected YYYY, YYYY-MM or YYYY-MM-DD with a valid month and day",
    "dateTime": "expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.fff]+zz:zz (a time needs a time zone)",
    "instant": "expected YYYY-MM-DDThh:mm:ss[.fff]+zz:zz or ...Z",
    "time": "expected hh:mm:ss[.fff]",
    "id": _ID_HINT,
    "code": "a code is non-empty and has no leading, trailing or repeated whitespace",
    "string": "a string must not be empty",
    "markdown": "markdown must not be empty",
    "decimal": "expected a JSON number",
    "integer": "expected a JSON integer",
    "positiveInt": "expected a JSON integer of 1 or more",
    "unsignedInt": "expected a JSON integer of 0 or more",
    "boolean": "expected true or false",
    "uri": "a URI has no whitespace",
    "url": "a URL has no whitespace",
    "canonical": "a canonical URL has no whitespace",
    "oid": "expected urn:oid: followed by a dotted OID",
    "uuid": "expected urn:uuid: followed by a UUID",
    "base64Binary": "expected base64 content",
    "xhtml": 'expected an XHTML <div xmlns="http://www.w3.org/1999/xhtml"> element',
}

# The metadata classes of fhir_core's Annotated primitive types, by FHIR name.
_PRIMITIVE_MARKERS: dict[str, str] = {
    "String": "string", "Code": "code", "Uri": "uri", "Url": "url", "Canonical": "canonical",
    "Id": "id", "Oid": "oid", "UuidVersion": "uuid", "Markdown": "markdown", "Xhtml": "xhtml",
    "Date": "date", "DateTime": "dateTime", "Instant": "instant", "Time": "time",
    "Decimal": "decimal", "Integer": "integer", "Integer64": "integer64",
    "PositiveInt": "positiveInt", "UnsignedInt": "unsignedInt", "Base64Binary": "base64Binary",
}  # fmt: skip

_PRIM, _COMPLEX, _RESOURCE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Field:
    name: str  # JSON name, used in paths (``gender`` also for the ``_gender`` key)
    kind: int
    is_list: bool
    model: Model | None  # element model for complex fields
    prim: str | None  # FHIR primitive type name
    enum: frozenset[str] | None
    ref_types: frozenset[str] | None  # allowed Reference targets; None = any
    choice: str | None  # "deceased" for deceasedBoolean: a choice element allows one type


@dataclass(frozen=True, slots=True)
class _Meta:
    name: str
    fields: dict[str, _Field]  # by JSON key, ``_x`` keys included
    required: tuple[str, ...]  # JSON names that must be present (value or ``_x`` extension)
    choices: dict[str, tuple[str, ...]]  # choice prefix -> JSON names of its types
    required_choices: tuple[str, ...]  # prefixes of choices with min 1
    is_resource: bool
    is_reference: bool


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """Strip Optional/Union-with-None and List; return (inner type, is_list)."""
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or origin is types.UnionType:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, is_list
            annotation = args[0]
        elif origin is list:
            is_list = True
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation, is_list


def _primitive_name(inner: Any) -> str | None:
    if inner is bool:
        return "boolean"
    if typing.get_origin(inner) is typing.Annotated:
        for marker in getattr(inner, "__metadata__", ()):
            name = _PRIMITIVE_MARKERS.get(type(marker).__name__)
            if name:
                return name
    return None


def resource_types() -> frozenset[str]:
    """R4 resource types that this validator can check: every R4 type with an R4B model."""
    return _VALIDATABLE_TYPES


@cache
def _model(name: str) -> Model:
    """An R4B model class by name (resource, data type or backbone element)."""
    return get_fhir_model_class(name)


def _resource_model(rtype: Any) -> Model | None:
    return _model(rtype) if isinstance(rtype, str) and rtype in _VALIDATABLE_TYPES else None


_META_CACHE: dict[Model, _Meta] = {}


def _meta(model: Model) -> _Meta:
    # Built lazily and cached: the walk needs metadata only for classes that occur.
    cached = _META_CACHE.get(model)
    if cached is not None:
        return cached
    reference_model = _model("Reference")
    fields: dict[str, _Field] = {}
    required: list[str] = []
    choices: dict[str, list[str]] = {}
    required_choices: list[str] = []
    for attr, info in model.model_fields.items():
        extra: dict[str, Any] = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        json_name = info.alias or attr
        if attr.endswith("__ext"):
            continue  # handled together with its primitive below
        if attr == "fhir_comments":
            continue  # not FHIR JSON (a DSTU2 leftover): reported as an unknown element
        inner, is_list = _unwrap(info.annotation)
        prim = _primitive_name(inner)
        sub: Model | None = None
        if prim is not None:
            kind = _PRIM
        elif isinstance(inner, type) and issubclass(inner, FhirBase):
            sub = inner.get_model_klass()
            kind = _RESOURCE if sub.__name__ in ("Resource", "DomainResource") else _COMPLEX
        else:  # pragma: no cover - every element of the generated models is typed
            kind = _PRIM
        enum_values = extra.get("enum_values")
        enum: frozenset[str] | None = None
        if enum_values:
            override = _ENUM_OVERRIDES.get((model.__name__, json_name))
            if override:
                enum = frozenset(override)
            elif "+" not in enum_values:
                enum = frozenset(enum_values)
            # else: a truncated list without a known full value set is not enforced
        ref_list = extra.get("enum_reference_types")
        ref_types = frozenset(ref_list) if ref_list and "Resource" not in ref_list else None
        choice = extra.get("one_of_many") or None
        fields[json_name] = _Field(json_name, kind, is_list, sub, prim, enum, ref_types, choice)
        if prim is not None:
            ext_model = _model("FHIRPrimitiveExtension")
            fields["_" + json_name] = _Field(json_name, _COMPLEX, is_list, ext_model, None, None, None, choice)
        if choice:
            choices.setdefault(choice, []).append(json_name)
            if extra.get("one_of_many_required") and choice not in required_choices:
                required_choices.append(choice)
        elif info.is_required() or extra.get("element_required"):
            required.append(json_name)
    meta = _Meta(
        name=model.__name__,
        fields=fields,
        required=tuple(required),
        choices={prefix: tuple(names) for prefix, names in choices.items()},
        required_choices=tuple(required_choices),
        is_resource=model.has_resource_base(),
        is_reference=model is reference_model,
    )
    _META_CACHE[model] = meta
    return meta


def _short(value: Any, limit: int = 60) -> str:
    """A value as JSON for messages (clients sent JSON), cut to ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, TypeError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    """The JSON kind of a value with its article, for messages: 'a string', 'an array'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- walk


class _Walker:
    """Collects issues from the raw JSON; ``contained`` maps local ids to types."""

    __slots__ = ("issues",)

    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def add(self, code: str, message: str, path: str) -> None:
        self.issues.append(Issue(code, message, expression=(path,)))

    def resource(self, data: dict[str, Any], path: str, klass: Model) -> None:
        contained: dict[str, str] = {}
        items = data.get("contained")
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    contained[item["id"]] = str(item.get("resourceType"))
        self.element(data, path, _meta(klass), contained)

    def element(self, data: dict[str, Any], path: str, meta: _Meta, contained: dict[str, str]) -> None:
        fields = meta.fields
        chosen: dict[str, set[str]] | None = None  # choice prefix -> JSON names present
        for key, value in data.items():
            field = fields.get(key)
            if field is not None and field.choice is not None:
                if chosen is None:
                    chosen = {}
                chosen.setdefault(field.choice, set()).add(field.name)
            if field is None:
                if key == "resourceType" and meta.is_resource:
                    continue
                self.add("structure", f"Unknown element '{key}'", f"{path}.{key}")
                continue
            fpath = f"{path}.{field.name}"
            if value is None:
                self.add("structure", f"Element '{key}' is null; omit it instead", fpath)
                continue
            if field.is_list:
                if not isinstance(value, list):
                    self.add("structure", f"Element '{key}' must be an array, not {_json_type(value)}", fpath)
                    continue
                if not value:
                    self.add("structure", f"Array '{key}' is empty; omit it instead", fpath)
                    continue
                # Primitive arrays and their ``_x`` siblings use null as a placeholder.
                nulls_ok = field.kind == _PRIM or key[0] == "_"
                for index, item in enumerate(value):
                    ipath = f"{fpath}[{index}]"
                    if item is None:
                        if not nulls_ok:
                            self.add("structure", f"Array '{key}' must not contain null", ipath)
                        continue
                    self.value(field, key, item, ipath, contained)
            elif isinstance(value, list):
                self.add("structure", f"Element '{key}' must be a single value, not an array", fpath)
            else:
                self.value(field, key, value, fpath, contained)
        if meta.required or meta.required_choices or chosen:
            self.required(data, path, meta, chosen or {})

    def required(self, data: dict[str, Any], path: str, meta: _Meta, chosen: dict[str, set[str]]) -> None:
        for name in meta.required:
            if data.get(name) is None and not _has_extension(data.get("_" + name)):
                self.add("required", f"Missing required element '{name}'", f"{path}.{name}")
        for prefix, present in chosen.items():
            if len(present) > 1:
                names = ", ".join(sorted(present))
                self.add(
                    "structure",
                    f"Only one of {names} may be present ('{prefix}[x]' is a single choice)",
                    f"{path}.{prefix}[x]",
                )
        for prefix in meta.required_choices:
            if prefix not in chosen:
                self.add(
                    "required",
                    f"Missing required element '{prefix}[x]' (one of {', '.join(meta.choices[prefix])})",
                    f"{path}.{prefix}[x]",
                )

    def value(self, field: _Field, key: str, value: Any, path: str, contained: dict[str, str]) -> None:
        kind = field.kind
        if kind == _PRIM:
            self.primitive(field, value, path)
            return
        if not isinstance(value, dict):
            self.add("structure", f"Element '{key}' must be a JSON object, not {_json_type(value)}", path)
            return
        if kind == _RESOURCE:
            rtype = value.get("resourceType")
            if not isinstance(rtype, str) or not rtype:
                self.add("invalid", f"The resource in '{key}' has no resourceType", path)
                return
            klass = _resource_model(rtype)
            if klass is None:
                self.add("not-supported", f"Unknown resource type {_short(rtype)} in '{key}'", path)
                return
            if key == "contained":
                if "contained" in value:
                    self.add("invariant", "A contained resource must not contain resources (dom-2)", path)
                # Contained resources reference each other through their container.
                self.element(value, path, _meta(klass), contained)
            else:
                self.resource(value, path, klass)
            return
        if not value:
            self.add("structure", f"Element '{key}' is an empty object; omit it instead", path)
            return
        assert field.model is not None
        meta = _meta(field.model)
        self.element(value, path, meta, contained)
        if meta.is_reference:
            self.reference(value.get("reference"), field.ref_types, f"{path}.reference", contained)

    def primitive(self, field: _Field, value: Any, path: str) -> None:
        prim = field.prim
        problem = _primitive_problem(prim, value)
        if problem is not None:
            self.add("value", f"Invalid {prim} {_short(value)} for '{field.name}': {problem}", path)
            return
        enum = field.enum
        if enum is not None and isinstance(value, str) and value not in enum:
            codes = sorted(enum)
            allowed = ", ".join(codes) if len(codes) <= 20 else ", ".join(codes[:20]) + f", ... ({len(codes)} codes)"
            self.add("code-invalid", f"Unknown code {_short(value)} for '{field.name}'; allowed: {allowed}", path)

    def reference(self, ref: Any, allowed: frozenset[str] | None, path: str, contained: dict[str, str]) -> None:
        if not isinstance(ref, str):
            return  # absent (identifier-only reference) or a type error pydantic reports
        target: str | None = None
        if ref.startswith("#"):
            local = ref[1:]
            if not local:
                return  # "#" points at the containing resource itself
            if local not in contained:
                self.add("value", f"Reference {_short(ref)} does not match the id of a contained resource", path)
                return
            target = contained[local]
        elif ref.startswith(("http://", "https://")):
            if not _HTTP_RE.fullmatch(ref):
                self.add("value", f"Invalid reference {_short(ref)}: not a valid absolute URL", path)
                return
            tail = _URL_TAIL_RE.search(ref.split("?", 1)[0])
            if tail and tail.group(1) in R4_RESOURCE_TYPES:
                target = tail.group(1)
        elif ref.startswith("urn:uuid:"):
            if not _UUID_RE.fullmatch(ref):
                self.add("value", f"Invalid reference {_short(ref)}: malformed urn:uuid", path)
            return
        elif ref.startswith("urn:oid:"):
            if not _OID_RE.fullmatch(ref):
                self.add("value", f"Invalid reference {_short(ref)}: malformed urn:oid", path)
            return
        else:
            match = _RELATIVE_REF_RE.fullmatch(ref)
            if match is None:
                self.add(
                    "value",
                    f"Invalid reference {_short(ref)}: expected Type/id, Type/id/_history/vid, "
                    "an absolute URL or #contained-id",
                    path,
                )
                return
            target = match.group(1)
            if target not in R4_RESOURCE_TYPES:
                self.add("value", f"Invalid reference {_short(ref)}: unknown resource type '{target}'", path)
                return
        if allowed is not None and target is not None and target not in allowed:
            self.add(
                "value",
                f"Reference {_short(ref)} points at {target}; allowed targets: {', '.join(sorted(allowed))}",
                path,
            )


def _has_extension(ext: Any) -> bool:
    return isinstance(ext, dict) and bool(ext.get("extension"))


def _primitive_problem(prim: str | None, value: Any) -> str | None:
    """Checks the models skip or do leniently; other problems come from pydantic."""
    if prim == "boolean":
        return None if isinstance(value, bool) else f"expected true or false, got {_json_type(value)}"
    if prim in ("integer", "positiveInt", "unsignedInt", "integer64"):
        return None if type(value) is int else f"expected a JSON integer, got {_json_type(value)}"
    if prim == "decimal":
        ok = type(value) in (int, float) and value == value and value not in (float("inf"), float("-inf"))
        return None if ok else f"expected a JSON number, got {_json_type(value)}"
    if not isinstance(value, str):
        # pydantic reports this too, but not when an earlier error stopped it
        return f"expected a JSON string, got {_json_type(value)}"
    if prim == "id":
        return None if _ID_RE.fullmatch(value) else _ID_HINT
    if prim in ("uri", "url", "canonical"):
        return None if _NO_SPACE_RE.fullmatch(value) else _FORMAT_HINTS[prim]
    if prim == "uuid":
        return None if _UUID_RE.fullmatch(value) else _FORMAT_HINTS["uuid"]
    if prim == "base64Binary":
        # Whitespace-free check: the spec regex backtracks badly on long invalid input.
        compact = _WS_RE.sub("", value)
        ok = len(compact) % 4 == 0 and _BASE64_CHARS_RE.fullmatch(compact) is not None
        return None if ok else _FORMAT_HINTS["base64Binary"]
    if prim == "xhtml":
        text = value.strip()
        ok = text.startswith("<div") and text.endswith("</div>") and "http://www.w3.org/1999/xhtml" in text[:200]
        return None if ok else _FORMAT_HINTS["xhtml"]
    return None


# ----------------------------------------------------------------- pydantic errors


def _path_of(loc: tuple[Any, ...], root: str) -> str:
    parts = [root]
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            name = str(item)
            if name.startswith("_") and len(name) > 1:
                name = name[1:]  # FHIRPath has no _x: the extension belongs to x
            parts.append("." + name)
    return "".join(parts)


def _field_at(loc: tuple[Any, ...], data: Any, klass: Model) -> _Field | None:
    """The metadata of the element a pydantic ``loc`` points at, following the data."""
    meta: _Meta | None = _meta(klass)
    field: _Field | None = None
    node = data
    in_resource = False  # the last field holds resources: the data gives the concrete type
    for item in loc:
        if isinstance(item, int):
            node = node[item] if isinstance(node, list) and -len(node) <= item < len(node) else None
            continue
        if in_resource:
            meta = _resource_meta(node)
            in_resource = False
        if meta is None:
            return None
        field = meta.fields.get(str(item))
        if field is None:
            return None
        node = node.get(item) if isinstance(node, dict) else None
        meta = _meta(field.model) if field.kind == _COMPLEX and field.model is not None else None
        in_resource = field.kind == _RESOURCE
    return field


def _resource_meta(node: Any) -> _Meta | None:
    klass = _resource_model(node.get("resourceType")) if isinstance(node, dict) else None
    return _meta(klass) if klass is not None else None


def _issue_from_error(error: Any, data: dict[str, Any], klass: Model, root: str) -> Issue | None:
    etype: str = error.get("type", "")
    loc: tuple[Any, ...] = tuple(error.get("loc", ()))
    msg: str = str(error.get("msg", ""))
    if etype == "value_error" and any(m in msg for m in _ONE_OF_MANY_MSG):
        return None  # the walk reports choice problems with a precise path
    path = _path_of(loc, root)
    key = str(loc[-1]) if loc and not isinstance(loc[-1], int) else (str(loc[-2]) if len(loc) > 1 else root)
    given = error.get("input")
    if etype == "extra_forbidden":
        return Issue("structure", f"Unknown element '{key}'", expression=(path,))
    if etype in ("missing", "model_field_validation.missing"):
        return Issue("required", f"Missing required element '{key}'", expression=(path,))
    if etype == "list_type":
        if msg.startswith("None is not allowed"):
            return None  # the walk reports the null with its index
        return Issue("structure", f"Element '{key}' must be an array, not {_json_type(given)}", expression=(path,))
    if etype in ("model_type", "dict_type", "model_attributes_type", "json_invalid", "json_type", "is_instance_of"):
        return Issue("structure", f"Element '{key}' must be a JSON object, not {_json_type(given)}", expression=(path,))
    if etype in ("fhir-validation-wrong-resource-type", "model_validation_format"):
        return Issue("invalid", f"Wrong resource type at '{key}': {msg}", expression=(path,))
    field = _field_at(loc, data, klass)
    prim = field.prim if field is not None else None
    if etype == "string_type":
        return Issue("value", f"Element '{key}' must be a JSON string, not {_json_type(given)}", expression=(path,))
    if etype in ("bool_type", "bool_parsing"):
        return Issue("value", f"Element '{key}' must be true or false, not {_short(given)}", expression=(path,))
    if etype.startswith(("int_", "float_", "decimal_")) and etype not in ("decimal_whole_digits",):
        expected = "integer" if etype.startswith("int_") else "number"
        return Issue("value", f"Element '{key}' must be a JSON {expected}, not {_short(given)}", expression=(path,))
    if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        hint = _FORMAT_HINTS.get(prim or "", msg)
        return Issue("value", f"Value {_short(given)} of '{key}' is out of range: {hint}", expression=(path,))
    if prim is not None:
        hint = _FORMAT_HINTS.get(prim, msg.removeprefix("Value error, "))
        return Issue("value", f"Invalid {prim} {_short(given)} for '{key}': {hint}", expression=(path,))
    return Issue("value", f"Invalid value for '{key}': {msg.removeprefix('Value error, ')}", expression=(path,))


# ------------------------------------------------------------------------- public


def validate_resource(resource: dict[str, Any], *, expected_type: str | None = None) -> list[Issue]:
    """Return the problems of ``resource`` (parsed JSON); ``[]`` when it is valid.

    ``expected_type`` is the type the caller requires, e.g. from the URL of a
    create or update; a mismatch is reported alone, like a missing or unknown type.
    """
    if not isinstance(resource, dict):
        return [Issue("structure", f"A resource must be a JSON object, not {_json_type(resource)}")]
    rtype = resource.get("resourceType")
    if rtype is None:
        return [Issue("invalid", "The resource has no resourceType", expression=("resourceType",))]
    if not isinstance(rtype, str) or not rtype:
        return [Issue("invalid", f"resourceType must be a non-empty string, not {_short(rtype)}",
                      expression=("resourceType",))]  # fmt: skip
    if rtype not in resource_types():
        return [Issue("not-supported", f"Unknown resource type {_short(rtype, 80)}",
                      expression=("resourceType",))]  # fmt: skip
    if expected_type is not None and rtype != expected_type:
        return [Issue("invalid", f"Expected resourceType '{expected_type}' but got '{rtype}'",
                      expression=("resourceType",))]  # fmt: skip
    klass = _model(rtype)

    issues: list[Issue] = []
    crashed: BaseException | None = None
    try:
        klass.model_validate(resource)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            try:
                issue = _issue_from_error(error, resource, klass, rtype)
            except Exception:  # a message must never hide the error itself
                issue = Issue("value", str(error.get("msg")), expression=(_path_of(tuple(error["loc"]), rtype),))
            if issue is not None:
                issues.append(issue)
    except RecursionError:
        return [Issue("too-costly", "The resource is nested too deeply to be validated")]
    except Exception as exc:  # the models raise e.g. KeyError for an unknown contained type
        crashed = exc

    walker = _Walker()
    try:
        walker.resource(resource, rtype, klass)
    except RecursionError:
        return [Issue("too-costly", "The resource is nested too deeply to be validated")]
    except Exception as exc:  # pragma: no cover - a bug here must not turn into a 500
        walker.issues.append(Issue("exception", f"Validation failed: {type(exc).__name__}: {exc}"))
    seen = {i.expression for i in issues}
    for issue in walker.issues:
        if issue.expression not in seen:
            seen.add(issue.expression)
            issues.append(issue)
    if crashed is not None and not issues:
        issues.append(Issue("structure", f"The resource could not be parsed: {type(crashed).__name__}: {crashed}"))
    return issues
