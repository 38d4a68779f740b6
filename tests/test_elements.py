"""The _summary and _elements helpers (parcours.fhir.elements)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from parcours.core.errors import InvalidSearch, ParcoursError
from parcours.fhir.elements import SUBSETTED_TAG, apply_elements, apply_summary, summary_elements
from parcours.fhir.validation import validate_resource

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def synthea_resources() -> list[dict]:
    return [e["resource"] for e in load("synthea-sample.json")["entry"]]


def synthea(resource_type: str, index: int = 0) -> dict:
    found = [r for r in synthea_resources() if r["resourceType"] == resource_type]
    return copy.deepcopy(found[index])


def deceased_patient() -> dict:
    return next(copy.deepcopy(r) for r in synthea_resources() if "deceasedDateTime" in r)


def is_subsetted(resource: dict) -> bool:
    return SUBSETTED_TAG in [
        {"system": t.get("system"), "code": t.get("code")} for t in resource.get("meta", {}).get("tag", [])
    ]


# ---------------------------------------------------------------- summary_elements


def test_summary_elements_patient() -> None:
    names = summary_elements("Patient")
    assert {"id", "meta", "resourceType", "implicitRules", "identifier", "active", "name", "telecom", "gender",
            "birthDate", "address", "managingOrganization", "link", "deceasedBoolean",
            "deceasedDateTime"} == names  # fmt: skip


def test_summary_elements_observation_expands_choices() -> None:
    names = summary_elements("Observation")
    assert {"status", "code", "subject", "encounter", "effectiveDateTime", "effectivePeriod", "valueQuantity",
            "valueString", "component", "performer", "issued"} <= names  # fmt: skip
    assert not {"text", "contained", "extension", "note", "referenceRange", "interpretation"} & names
    assert "value" not in names


def test_summary_elements_of_unknown_types() -> None:
    base = {"id", "meta", "resourceType"}
    assert summary_elements("Foo") == base
    assert summary_elements("HumanName") == base  # a data type, not a resource
    assert summary_elements("") == base


# ------------------------------------------------------------------- apply_summary


def test_summary_true() -> None:
    patient = synthea("Patient")
    before = copy.deepcopy(patient)
    out = apply_summary(patient, "true")
    assert patient == before, "the input must not change"
    assert out is not patient
    assert set(out) <= summary_elements("Patient")
    assert {"resourceType", "id", "meta", "name", "gender", "birthDate"} <= set(out)
    assert not {"text", "extension", "maritalStatus", "communication"} & set(out)
    assert out["name"] == patient["name"]
    assert list(out)[:3] == ["resourceType", "id", "meta"]
    assert is_subsetted(out)
    # The original tags stay, the SUBSETTED tag is added once.
    assert out["meta"]["tag"][:-1] == patient["meta"]["tag"]
    assert out["meta"]["tag"][-1] == SUBSETTED_TAG


def test_summary_true_keeps_choice_types() -> None:
    out = apply_summary(deceased_patient(), "true")
    assert "deceasedDateTime" in out


def test_summary_text() -> None:
    observation = synthea("Observation")
    observation["text"] = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}
    out = apply_summary(observation, "text")
    # Mandatory top-level elements (status, code) stay with text, id and meta.
    assert set(out) == {"resourceType", "id", "meta", "text", "status", "code"}
    assert is_subsetted(out)
    assert set(apply_summary(synthea("Patient"), "text")) == {"resourceType", "id", "meta", "text"}


def test_summary_data() -> None:
    patient = synthea("Patient")
    out = apply_summary(patient, "data")
    assert "text" not in out
    assert set(out) == set(patient) - {"text"}
    assert is_subsetted(out)
    observation = synthea("Observation")  # Synthea observations have no narrative
    assert "text" not in observation
    out = apply_summary(observation, "data")
    assert out == observation and not is_subsetted(out), "nothing removed, so no tag"


def test_summary_false_and_count() -> None:
    patient = synthea("Patient")
    out = apply_summary(patient, "false")
    assert out == patient and out is not patient
    count = apply_summary(patient, "count")
    assert set(count) == {"resourceType", "id", "meta"} and is_subsetted(count)


@pytest.mark.parametrize("mode", ["TRUE", "yes", "", "summary"])
def test_summary_unknown_mode(mode: str) -> None:
    with pytest.raises(InvalidSearch) as raised:
        apply_summary(synthea("Patient"), mode)
    assert isinstance(raised.value, ParcoursError) and raised.value.status == 400


def test_subsetted_tag_is_not_duplicated_and_meta_is_created() -> None:
    patient = synthea("Patient")
    once = apply_summary(patient, "true")
    twice = apply_summary(once, "data")
    assert twice["meta"]["tag"].count(SUBSETTED_TAG) == 1
    bare = {"resourceType": "Patient", "id": "p1", "gender": "male", "maritalStatus": {"text": "M"}}
    out = apply_summary(bare, "true")
    assert out == {"resourceType": "Patient", "id": "p1", "meta": {"tag": [SUBSETTED_TAG]}, "gender": "male"}
    assert "meta" not in bare


def test_summaries_of_valid_resources_stay_valid() -> None:
    for resource in synthea_resources():
        for mode in ("true", "text", "data"):
            out = apply_summary(resource, mode)
            issues = validate_resource(out)
            if "contained" in resource and "contained" not in out:
                # contained is not a summary element: local "#id" references dangle, as with any server.
                issues = [i for i in issues if "contained resource" not in i.diagnostics]
            assert issues == [], (resource["resourceType"], mode)


# ------------------------------------------------------------------ apply_elements


def test_elements_keeps_listed_and_base_elements() -> None:
    patient = synthea("Patient")
    before = copy.deepcopy(patient)
    out = apply_elements(patient, ["name", "gender"])
    assert patient == before
    assert set(out) == {"resourceType", "id", "meta", "name", "gender"}
    assert is_subsetted(out)


def test_elements_choice_name() -> None:
    patient = deceased_patient()
    out = apply_elements(patient, ["deceased"])
    assert out["deceasedDateTime"] == patient["deceasedDateTime"]
    assert set(out) == {"resourceType", "id", "meta", "deceasedDateTime"}
    assert "deceasedDateTime" in apply_elements(patient, ["deceasedDateTime"])
    assert "deceasedDateTime" not in apply_elements(patient, ["deceasedBoolean"])


def test_elements_keeps_primitive_extension_siblings() -> None:
    patient = load("fhir-r4-examples/Patient-example.json")
    assert "_birthDate" in patient
    out = apply_elements(patient, ["birthDate"])
    assert out["_birthDate"] == patient["_birthDate"]
    assert "birthDate" in out


def test_elements_name_forms() -> None:
    patient = synthea("Patient")
    out = apply_elements(patient, [" Patient.gender ", "address.city", "nosuchelement", ""])
    assert set(out) == {"resourceType", "id", "meta", "gender", "address"}
    assert out["address"] == patient["address"]


def test_elements_nothing_removed_means_no_tag() -> None:
    resource = {"resourceType": "Patient", "id": "p1", "gender": "female"}
    out = apply_elements(resource, ["gender"])
    assert out == resource and "meta" not in out


def test_elements_on_unknown_type() -> None:
    out = apply_elements({"resourceType": "Foo", "id": "1", "a": 1, "b": 2}, ["a"])
    assert set(out) == {"resourceType", "id", "meta", "a"}
