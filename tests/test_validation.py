"""Structural validation of FHIR R4 resources (parcours.fhir.validation)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from parcours.core.errors import Issue
from parcours.fhir.validation import R4_ONLY_TYPES, resource_types, validate_resource

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path("/work/shared/data")
SYNTHEA_BUNDLES = (
    "Alejandro_Riojas_a9fcc685-c7a2-4474-bf25-26c8fe4b48f9.json",
    "Rudolf_Weber_a4b93263-c55f-4d39-8c4e-31dfba932181.json",
    "Patria_Schimmel_d2f8f862-3856-490d-b56f-98e0ed984b1e.json",
)


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def synthea(resource_type: str, index: int = 0) -> dict:
    """A fresh copy of a real Synthea resource from the fixture bundle."""
    entries = load("synthea-sample.json")["entry"]
    found = [e["resource"] for e in entries if e["resource"]["resourceType"] == resource_type]
    return copy.deepcopy(found[index])


def where(issues: list[Issue], path: str) -> list[Issue]:
    return [i for i in issues if path in i.expression]


def assert_one(issues: list[Issue], code: str, path: str) -> Issue:
    """Exactly one issue at ``path`` and it has ``code``; other paths may have issues too."""
    hits = where(issues, path)
    assert len(hits) == 1, f"expected one issue at {path}, got {issues}"
    assert hits[0].code == code, hits[0]
    assert hits[0].severity == "error"
    assert hits[0].diagnostics
    return hits[0]


def fmt(issues: list[Issue]) -> str:
    return "\n".join(f"  {i.code} {i.expression}: {i.diagnostics}" for i in issues)


# --------------------------------------------------------------------------- types


def test_resource_types_are_r4_types_with_a_model() -> None:
    types = resource_types()
    assert {"Patient", "Observation", "Bundle", "Parameters", "Binary", "OperationOutcome"} <= types
    # R4B-only types are not R4; R4-only types have no model; abstract and data types are not resources.
    assert not types & {"Citation", "Ingredient", "SubscriptionTopic", "SubscriptionStatus"}
    assert not types & R4_ONLY_TYPES
    assert not types & {"Resource", "DomainResource", "HumanName", "PatientContact", "Reference"}
    assert len(types) == 128
    from fhir.resources.R4B import get_fhir_model_class

    for name in types:
        model = get_fhir_model_class(name)
        assert model.__resource_type__ == name and model.has_resource_base(), name


# ------------------------------------------------------------------- valid real data


def test_synthea_sample_resources_are_valid() -> None:
    bundle = load("synthea-sample.json")
    failures = {}
    for index, entry in enumerate(bundle["entry"]):
        issues = validate_resource(entry["resource"])
        if issues:
            failures[f"{index} {entry['resource']['resourceType']}"] = issues
    assert not failures, failures
    assert len(bundle["entry"]) == 75


def test_synthea_sample_bundle_is_valid_as_a_whole() -> None:
    assert validate_resource(load("synthea-sample.json"), expected_type="Bundle") == []


def test_three_full_synthea_bundles_are_valid() -> None:
    folder = SHARED / "synthea-r4-smart" / "bundles"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not available")
    for name in SYNTHEA_BUNDLES:
        bundle = json.loads((folder / name).read_text(encoding="utf-8"))
        assert bundle["type"] == "transaction"
        for index, entry in enumerate(bundle["entry"]):
            issues = validate_resource(entry["resource"])
            assert issues == [], f"{name} entry {index} ({entry['resource']['resourceType']}):\n{fmt(issues)}"
        assert validate_resource(bundle) == []


@pytest.mark.parametrize(
    "name",
    [
        "Patient-example.json",
        "Observation-example.json",
        "Observation-10minute-apgar-score.json",
        "CarePlan-f202.json",
        "Bundle-bundle-response-simplesummary.json",
    ],
)
def test_official_examples_are_valid(name: str) -> None:
    resource = load(f"fhir-r4-examples/{name}")
    assert validate_resource(resource, expected_type=resource["resourceType"]) == []


@pytest.mark.parametrize(
    ("name", "path"),
    [
        # R4: DeviceMetric.parent is Reference(Device); the example points at a DeviceDefinition.
        ("DeviceMetric-example.json", "DeviceMetric.parent.reference"),
        # R4: MedicationRequest.dispenseRequest.performer is Reference(Organization).
        ("MedicationRequest-medrx0301.json", "MedicationRequest.dispenseRequest.performer.reference"),
    ],
)
def test_official_examples_with_wrong_reference_targets_are_flagged(name: str, path: str) -> None:
    issues = validate_resource(load(f"fhir-r4-examples/{name}"))
    assert len(issues) == 1
    assert_one(issues, "value", path)


def test_evidence_follows_the_r4b_shape() -> None:
    # Known gap: Evidence was redesigned in R4B, so the R4 example does not fit the model.
    issues = validate_resource(load("fhir-r4-examples/Evidence-example.json"))
    assert {i.expression[0] for i in issues} == {"Evidence.exposureBackground", "Evidence.variableDefinition"}


def test_official_r4_examples_mostly_validate(capsys: pytest.CaptureFixture[str]) -> None:
    folder = SHARED / "fhir-r4-examples" / "resources"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not available")
    files = sorted(folder.glob("*.json"))
    assert len(files) > 600
    failures: dict[str, list[Issue]] = {}
    for path in files:
        issues = validate_resource(json.loads(path.read_text(encoding="utf-8")))
        if issues:
            failures[path.name] = issues
    with capsys.disabled():
        print(f"\n{len(files) - len(failures)}/{len(files)} official R4 examples valid; failures:")
        for name, issues in failures.items():
            print(f"{name}\n{fmt(issues[:3])}" + (f"\n  ... {len(issues) - 3} more" if len(issues) > 3 else ""))
    assert len(failures) / len(files) <= 0.05


# ------------------------------------------------------------------------ bad input


def test_bad_gender() -> None:
    patient = synthea("Patient")
    patient["gender"] = "M"
    issues = validate_resource(patient)
    assert len(issues) == 1
    issue = assert_one(issues, "code-invalid", "Patient.gender")
    assert '"M"' in issue.diagnostics and "female" in issue.diagnostics


def test_bad_birth_date() -> None:
    patient = synthea("Patient")
    patient["birthDate"] = "1990-13-45"
    issues = validate_resource(patient)
    assert len(issues) == 1
    assert "YYYY-MM-DD" in assert_one(issues, "value", "Patient.birthDate").diagnostics


@pytest.mark.parametrize("value", ["1990-02-30", "19900101", "1990-1-1", "1990-01-01T10:00:00Z", 1990])
def test_more_bad_dates(value: Any) -> None:
    patient = synthea("Patient")
    patient["birthDate"] = value
    assert_one(validate_resource(patient), "value", "Patient.birthDate")


def test_unknown_elements_top_level_and_nested() -> None:
    patient = synthea("Patient")
    patient["foo"] = 1
    patient["name"][0]["bar"] = "x"
    patient["fhir_comments"] = "not FHIR JSON"
    issues = validate_resource(patient)
    assert assert_one(issues, "structure", "Patient.foo").diagnostics == "Unknown element 'foo'"
    assert assert_one(issues, "structure", "Patient.name[0].bar").diagnostics == "Unknown element 'bar'"
    assert_one(issues, "structure", "Patient.fhir_comments")
    assert len(issues) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("active", "yes"),  # pydantic alone would read this as true
        ("active", "true"),
        ("active", 1),
        ("multipleBirthInteger", "2"),
        ("multipleBirthInteger", True),
        ("multipleBirthInteger", 1.5),
        ("gender", 5),
        ("birthDate", {"value": "1990"}),
    ],
)
def test_wrong_json_type_for_a_primitive(field: str, value: Any) -> None:
    patient = synthea("Patient")
    patient.pop("multipleBirthBoolean", None)
    patient[field] = value
    issues = validate_resource(patient)
    assert len(issues) == 1, fmt(issues)
    assert_one(issues, "value", f"Patient.{field}")


def test_wrong_types_inside_lists_and_objects() -> None:
    patient = synthea("Patient")
    patient["name"][0]["given"].append(3)
    patient["telecom"] = {"system": "phone", "value": "555"}  # must be an array
    patient["maritalStatus"] = "M"  # must be an object
    issues = validate_resource(patient)
    given = len(patient["name"][0]["given"]) - 1
    assert_one(issues, "value", f"Patient.name[0].given[{given}]")
    assert "must be an array" in assert_one(issues, "structure", "Patient.telecom").diagnostics
    assert "JSON object" in assert_one(issues, "structure", "Patient.maritalStatus").diagnostics


def test_decimal_given_as_string() -> None:
    observation = synthea("Observation")
    observation["valueQuantity"]["value"] = "178.6"
    issues = validate_resource(observation)
    assert len(issues) == 1
    assert_one(issues, "value", "Observation.valueQuantity.value")


def test_missing_required_elements_are_all_reported() -> None:
    observation = synthea("Observation")
    del observation["status"], observation["code"]
    issues = validate_resource(observation)
    assert len(issues) == 2, fmt(issues)
    assert "'status'" in assert_one(issues, "required", "Observation.status").diagnostics
    assert_one(issues, "required", "Observation.code")


def test_required_nested_element() -> None:
    patient = synthea("Patient")
    patient["link"] = [{"type": "seealso"}]  # Patient.link.other is 1..1
    patient["extension"][0].pop("url")
    issues = validate_resource(patient)
    assert_one(issues, "required", "Patient.link[0].other")
    assert_one(issues, "required", "Patient.extension[0].url")
    assert len(issues) == 2


def test_required_primitive_may_be_replaced_by_an_extension() -> None:
    observation = synthea("Observation")
    del observation["status"]
    observation["_status"] = {
        "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]
    }
    assert validate_resource(observation) == []


def test_required_choice_and_double_choice() -> None:
    request = synthea("MedicationRequest")
    request.pop("medicationCodeableConcept")
    assert_one(validate_resource(request), "required", "MedicationRequest.medication[x]")
    patient = synthea("Patient")
    patient["deceasedBoolean"] = False
    patient["deceasedDateTime"] = "2020-01-01"
    issues = validate_resource(patient)
    assert len(issues) == 1
    assert_one(issues, "structure", "Patient.deceased[x]")


@pytest.mark.parametrize(
    "reference",
    ["Patient/a b", "Patient", "Patient/", "/Patient/1", "patient 1", "Patient/1/_history/", "Patient/" + "x" * 65,
     "urn:uuid:not-a-uuid", "urn:oid:1.2.x", "http://", "ftp://example.org/Patient/1"],
)  # fmt: skip
def test_bad_reference_syntax(reference: str) -> None:
    observation = synthea("Observation")
    observation["subject"] = {"reference": reference}
    issues = validate_resource(observation)
    assert len(issues) == 1, fmt(issues)
    assert_one(issues, "value", "Observation.subject.reference")


def test_reference_to_unknown_resource_type() -> None:
    observation = synthea("Observation")
    observation["subject"] = {"reference": "Pateint/123"}
    issue = assert_one(validate_resource(observation), "value", "Observation.subject.reference")
    assert "Pateint" in issue.diagnostics


@pytest.mark.parametrize(
    "reference",
    ["Patient/123", "Patient/123/_history/2", "urn:uuid:b1756d32-c4c4-4fd2-9023-ff241b55bae0",
     "http://example.org/fhir/Patient/123", "https://example.org/fhir/Patient/123/_history/1",
     "urn:oid:1.2.3.4", "http://example.org/some/thing"],
)  # fmt: skip
def test_good_references(reference: str) -> None:
    observation = synthea("Observation")
    observation["subject"] = {"reference": reference, "display": "x"}
    assert validate_resource(observation) == []


def test_wrong_reference_target_type() -> None:
    patient = synthea("Patient")
    patient["managingOrganization"] = {"reference": "Patient/1"}
    patient["generalPractitioner"] = [
        {"reference": "Practitioner/1"},
        {"reference": "http://example.org/fhir/Observation/2"},
    ]
    issues = validate_resource(patient)
    assert "Organization" in assert_one(issues, "value", "Patient.managingOrganization.reference").diagnostics
    assert_one(issues, "value", "Patient.generalPractitioner[1].reference")
    assert len(issues) == 2


def test_identifier_only_reference_is_fine() -> None:
    patient = synthea("Patient")
    patient["managingOrganization"] = {"identifier": {"system": "urn:oid:1.2.250.1.71.4.2.2", "value": "1"}}
    assert validate_resource(patient) == []


def test_contained_references() -> None:
    patient = synthea("Patient")
    patient["contained"] = [{"resourceType": "Organization", "id": "org1", "name": "Clinic"}]
    patient["managingOrganization"] = {"reference": "#org1"}
    assert validate_resource(patient) == []
    patient["generalPractitioner"] = [{"reference": "#nope"}]
    patient["link"] = [{"other": {"reference": "#org1"}, "type": "seealso"}]  # must be Patient/RelatedPerson
    issues = validate_resource(patient)
    assert_one(issues, "value", "Patient.generalPractitioner[0].reference")
    assert_one(issues, "value", "Patient.link[0].other.reference")
    assert len(issues) == 2


@pytest.mark.parametrize("bad_id", ["a b", "x" * 65, "", "é", "a/b", 12])
def test_bad_id(bad_id: Any) -> None:
    patient = synthea("Patient")
    patient["id"] = bad_id
    issues = validate_resource(patient)
    assert len(issues) == 1, fmt(issues)
    assert_one(issues, "value", "Patient.id")


def test_longest_id_is_fine() -> None:
    patient = synthea("Patient")
    patient["id"] = "A-z.0" + "x" * 59
    assert validate_resource(patient) == []


@pytest.mark.parametrize(
    ("resource", "code"),
    [
        ({"id": "1"}, "invalid"),
        ({"resourceType": None}, "invalid"),
        ({"resourceType": ""}, "invalid"),
        ({"resourceType": ["Patient"]}, "invalid"),
        ({"resourceType": "Foo"}, "not-supported"),
        ({"resourceType": "patient"}, "not-supported"),
        ({"resourceType": "Citation"}, "not-supported"),  # R4B only
        ({"resourceType": "MedicinalProduct"}, "not-supported"),  # R4 only, no model
        ({"resourceType": "HumanName", "family": "x"}, "not-supported"),  # a data type
    ],
)
def test_missing_or_unknown_resource_type(resource: dict, code: str) -> None:
    issues = validate_resource(resource)
    assert len(issues) == 1
    assert issues[0].code == code
    assert issues[0].expression == ("resourceType",)


def test_expected_type() -> None:
    patient = synthea("Patient")
    assert validate_resource(patient, expected_type="Patient") == []
    issues = validate_resource(patient, expected_type="Observation")
    assert len(issues) == 1
    assert issues[0].code == "invalid" and "Observation" in issues[0].diagnostics


def test_nested_required_bindings() -> None:
    patient = synthea("Patient")
    patient["contact"] = [{"gender": "F", "name": {"family": "Doe", "use": "official"}}]
    patient["name"][0]["use"] = "nick"
    patient["telecom"][0]["system"] = "telephone"
    issues = validate_resource(patient)
    assert_one(issues, "code-invalid", "Patient.contact[0].gender")
    assert_one(issues, "code-invalid", "Patient.name[0].use")
    assert_one(issues, "code-invalid", "Patient.telecom[0].system")
    assert len(issues) == 3


def test_truncated_bindings_use_the_full_r4_value_set() -> None:
    # The model lists only "registered | preliminary | final | amended +" for Observation.status.
    observation = synthea("Observation")
    for status in ("corrected", "cancelled", "entered-in-error", "unknown"):
        observation["status"] = status
        assert validate_resource(observation) == []
    observation["status"] = "done"
    assert_one(validate_resource(observation), "code-invalid", "Observation.status")


def test_bindings_in_contained_and_bundled_resources() -> None:
    patient = synthea("Patient")
    patient["contained"] = [{"resourceType": "Observation", "status": "done", "code": {"text": "x"}}]
    assert_one(validate_resource(patient), "code-invalid", "Patient.contained[0].status")
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": synthea("Patient")}]}
    bundle["entry"][0]["resource"]["gender"] = "x"
    assert_one(validate_resource(bundle), "code-invalid", "Bundle.entry[0].resource.gender")


def test_bad_contained_resources() -> None:
    patient = synthea("Patient")
    patient["gender"] = "x"
    patient["contained"] = [{"resourceType": "Foo"}, {"id": "1"}, "text", {"resourceType": "Organization", "id": "o"}]
    issues = validate_resource(patient)
    assert_one(issues, "not-supported", "Patient.contained[0]")
    assert_one(issues, "invalid", "Patient.contained[1]")
    assert_one(issues, "structure", "Patient.contained[2]")
    assert_one(issues, "code-invalid", "Patient.gender")  # still found although the models gave up


def test_nulls_and_empty_values() -> None:
    patient = synthea("Patient")
    patient["birthDate"] = None
    patient["photo"] = []
    patient["identifier"].append(None)
    patient["maritalStatus"] = {}
    issues = validate_resource(patient)
    assert_one(issues, "structure", "Patient.birthDate")
    assert_one(issues, "structure", "Patient.photo")
    assert_one(issues, "structure", f"Patient.identifier[{len(patient['identifier']) - 1}]")
    assert_one(issues, "structure", "Patient.maritalStatus")
    assert len(issues) == 4, fmt(issues)


def test_nulls_line_up_primitive_arrays_with_their_extensions() -> None:
    patient = synthea("Patient")
    patient["name"][0]["given"] = ["Ann", None]
    patient["name"][0]["_given"] = [None, {"extension": [{"url": "http://example.org/x", "valueString": "?"}]}]
    assert validate_resource(patient) == []


def test_primitive_formats_the_models_accept() -> None:
    patient = synthea("Patient")
    patient["photo"] = [{"data": "not base64!"}]
    patient["text"] = {"status": "generated", "div": "plain text"}
    patient["extension"][0]["url"] = "http://example.org/has space"
    issues = validate_resource(patient)
    assert_one(issues, "value", "Patient.photo[0].data")
    assert_one(issues, "value", "Patient.text.div")
    assert_one(issues, "value", "Patient.extension[0].url")
    assert len(issues) == 3


def test_valueuuid_needs_the_urn_prefix() -> None:
    patient = synthea("Patient")
    patient["extension"] = [{"url": "http://example.org/x", "valueUuid": "b1756d32-c4c4-4fd2-9023-ff241b55bae0"}]
    assert_one(validate_resource(patient), "value", "Patient.extension[0].valueUuid")
    patient["extension"][0]["valueUuid"] = "urn:uuid:b1756d32-c4c4-4fd2-9023-ff241b55bae0"
    assert validate_resource(patient) == []


def test_primitive_extension_paths_use_the_element_name() -> None:
    patient = synthea("Patient")
    patient["_gender"] = {"extension": [{"valueString": "no url"}]}
    issues = validate_resource(patient)
    assert_one(issues, "required", "Patient.gender.extension[0].url")


# ------------------------------------------------------------------ never raises


GARBAGE: list[Any] = [None, 0, 1.5, True, "x", "", [], {}, [None], [1, "a"], {"a": 1}, [{}], {"resourceType": 1}]


@pytest.mark.parametrize("resource", [*GARBAGE, [{"resourceType": "Patient"}], "Patient"])
def test_garbage_top_level(resource: Any) -> None:
    issues = validate_resource(resource)  # type: ignore[arg-type]
    assert issues and all(isinstance(i, Issue) for i in issues)


def test_every_element_with_every_wrong_type_never_raises() -> None:
    for resource_type in ("Patient", "Observation", "Claim", "ExplanationOfBenefit", "Encounter"):
        original = synthea(resource_type)
        for key in list(original):
            if key == "resourceType":
                continue
            for value in GARBAGE:
                resource = copy.deepcopy(original)
                resource[key] = value
                issues = validate_resource(resource)
                assert all(isinstance(i, Issue) and isinstance(i.expression, tuple) for i in issues)
                if value is None or value in ([], {}, [{}]):  # never valid anywhere in FHIR JSON
                    assert issues, (resource_type, key, value)


def test_odd_keys_and_deep_nesting_never_raise() -> None:
    odd: dict[Any, Any] = {"resourceType": "Patient", 1: 2, "": 3, "_": 4, "name": [{"given": [{"a": 1}]}]}
    issues = validate_resource(odd)
    assert_one(issues, "value", "Patient.name[0].given[0]")
    assert len(issues) == 4
    deep: dict = {"url": "http://example.org/x"}
    node = deep
    for _ in range(5000):
        child: dict = {"url": "http://example.org/x"}
        node["extension"] = [child]
        node = child
    issues = validate_resource({"resourceType": "Patient", "extension": [deep]})
    assert len(issues) == 1 and issues[0].code == "too-costly"


def test_input_is_not_modified() -> None:
    patient = synthea("Patient")
    patient["gender"] = "x"
    before = copy.deepcopy(patient)
    validate_resource(patient)
    assert patient == before


