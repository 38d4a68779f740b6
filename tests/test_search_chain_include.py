"""Chained parameters, _has (nested), _include and _revinclude (with :iterate and *).

One small care network is created per module; expected answers are computed by
following the references of the created records in Python.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.conftest import uniq
from tests.fixtures.search.helpers import (
    TAG_SYSTEM,
    create,
    expect_error,
    include_refs,
    match_ids,
    norm,
    ref,
    search,
    tagged,
)

LOINC = "http://loinc.org"
GLUCOSE, HBA1C = "2339-0", "4548-4"


@dataclass
class Network:
    run: str
    by_key: dict[str, dict[str, Any]]

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.by_key.values())

    def of(self, rtype: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["resourceType"] == rtype]

    def get(self, reference: str | None) -> dict[str, Any] | None:
        """Resolve a reference among the records (None when it points elsewhere)."""
        return next((r for r in self.records if reference and ref(r) == reference), None)

    def key(self, resource: dict[str, Any]) -> str:
        return next(k for k, r in self.by_key.items() if r is resource)

    def ids(self, rtype: str, predicate: Callable[[dict[str, Any]], bool]) -> list[str]:
        return sorted(r["id"] for r in self.of(rtype) if predicate(r))

    def fmt(self, query: str) -> str:
        return query.format(**{k: r["id"] for k, r in self.by_key.items()}, run=self.run)

    async def bundle(self, client: Any, rtype: str, query: str) -> dict[str, Any]:
        params = [tuple(p.split("=", 1)) for p in self.fmt(query).split("&") if p]
        return await search(client, rtype, [*params, ("_tag", f"{TAG_SYSTEM}|{self.run}"), ("_count", "100")])

    async def found(self, client: Any, rtype: str, query: str) -> list[str]:
        return sorted(match_ids(await self.bundle(client, rtype, query)))


def obs(code: str, subject: str | None, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": code}]}, **kw}
    if subject:
        body["subject"] = {"reference": subject}
    return body


@pytest_asyncio.fixture(scope="module")
async def net(client) -> Network:  # type: ignore[no-untyped-def]
    """Organizations (one part of a group), a GP, patients, a group, observations
    (one grouping others), an encounter, and provenance of one observation."""
    run = uniq("net")
    made: dict[str, dict[str, Any]] = {}

    async def add(key: str, body: dict[str, Any]) -> dict[str, Any]:
        made[key] = await create(client, tagged(body, run))
        return made[key]

    parent = await add("parent", {"resourceType": "Organization", "name": "Groupe Santé Nord"})
    lilas = await add("lilas", {"resourceType": "Organization", "name": "Clinique des Lilas", "partOf": {"reference": ref(parent)}})
    stlouis = await add("stlouis", {"resourceType": "Organization", "name": "Hôpital Saint-Louis"})
    gp = await add("gp", {"resourceType": "Practitioner", "name": [{"family": "Martin", "given": ["Claire"]}]})
    p1 = await add("p1", {"resourceType": "Patient", "name": [{"family": "Chaîne", "given": ["Inès"]}],
                          "managingOrganization": {"reference": ref(lilas)}, "generalPractitioner": [{"reference": ref(gp)}],
                          "identifier": [{"system": "urn:test:ins", "value": f"{run}-p1"}]})
    p2 = await add("p2", {"resourceType": "Patient", "name": [{"family": "Chainon", "given": ["Paul"]}],
                          "managingOrganization": {"reference": ref(stlouis)}})
    p3 = await add("p3", {"resourceType": "Patient", "name": [{"family": "Lefort"}]})
    group = await add("group", {"resourceType": "Group", "type": "person", "actual": True, "name": "Chaîne de soins diabète",
                                "identifier": [{"system": "urn:test:grp", "value": f"{run}-g"}]})
    o1 = await add("o1", obs(GLUCOSE, ref(p1), performer=[{"reference": ref(gp)}]))
    await add("o2", obs(HBA1C, ref(p2)))
    o3 = await add("o3", obs(GLUCOSE, ref(p3)))
    await add("o4", obs(GLUCOSE, ref(group)))
    await add("o5", obs(HBA1C, ref(p1), hasMember=[{"reference": ref(o1)}]))
    await add("o6", obs(HBA1C, None))
    await add("enc", {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                      "subject": {"reference": ref(p1)}, "serviceProvider": {"reference": ref(lilas)}})
    await add("prov", {"resourceType": "Provenance", "target": [{"reference": ref(o3)}], "recorded": "2024-01-01T10:00:00Z",
                       "agent": [{"who": {"reference": ref(gp)}}]})
    return Network(run, made)


# Cases whose right answer is "nothing".
EMPTY = {"partof:Organization.name=clinique", "_has:Observation:patient:code=0000-0", "_has:Encounter:subject:service-provider.name=lilas"}


# -- chains -----------------------------------------------------------------------------------
def family_starts(query: str) -> Callable[[dict[str, Any] | None], bool]:
    return lambda r: r is not None and r["resourceType"] == "Patient" and any(
        norm(n.get("family", "")).startswith(norm(query)) for n in r.get("name", []))


def name_starts(query: str) -> Callable[[dict[str, Any] | None], bool]:
    """Patient.name (any part) or Group.name, Organization.name."""
    def pred(r: dict[str, Any] | None) -> bool:
        if r is None:
            return False
        names = r.get("name")
        parts = [names] if isinstance(names, str) else [p for n in names or [] for p in [n.get("family", ""), *n.get("given", [])]]
        return any(norm(p).startswith(norm(query)) for p in parts)
    return pred


CHAIN_CASES: list[tuple[str, str, Callable[[Network, dict[str, Any]], bool]]] = [
    ("Observation", "subject:Patient.name=chaine",
     lambda n, r: (s := n.get(r.get("subject", {}).get("reference"))) is not None and s["resourceType"] == "Patient" and name_starts("chaine")(s)),
    ("Observation", "subject:Patient.name=chain",
     lambda n, r: (s := n.get(r.get("subject", {}).get("reference"))) is not None and s["resourceType"] == "Patient" and name_starts("chain")(s)),
    # without the type modifier: every target type of subject that has the parameter
    # ("name": Patient and Location, not Group; "identifier": Patient, Group, Device, Location)
    ("Observation", "subject.name=chaine",
     lambda n, r: (s := n.get(r.get("subject", {}).get("reference"))) is not None and s["resourceType"] != "Group" and name_starts("chaine")(s)),
    ("Observation", "subject.identifier={run}-g,urn:test:ins|{run}-p1",
     lambda n, r: r.get("subject", {}).get("reference") in (ref(n.by_key["p1"]), ref(n.by_key["group"]))),
    ("Observation", "patient.family=chainon", lambda n, r: family_starts("chainon")(n.get(r.get("subject", {}).get("reference")))),
    ("Observation", "subject:Patient.identifier=urn:test:ins|{run}-p1", lambda n, r: r.get("subject", {}).get("reference") == ref(n.by_key["p1"])),
    ("Observation", "subject._id={p2}", lambda n, r: r.get("subject", {}).get("reference") == ref(n.by_key["p2"])),
    # two and three levels
    ("Observation", "subject:Patient.organization.name=clinique",
     lambda n, r: name_starts("clinique")(n.get(((n.get(r.get("subject", {}).get("reference")) or {}).get("managingOrganization") or {}).get("reference")))),
    ("Observation", "subject.organization.partof.name=groupe",
     lambda n, r: r.get("subject", {}).get("reference") == ref(n.by_key["p1"])),
    ("Encounter", "subject:Patient.organization=Organization/{lilas}", lambda n, r: True),
    ("Patient", "general-practitioner.name=martin", lambda n, r: "generalPractitioner" in r),
    ("Patient", "organization.name=hopital", lambda n, r: r["id"] == n.by_key["p2"]["id"]),
    # a chain back to the same type (must not be confused with the outer row)
    ("Organization", "partof.name=groupe", lambda n, r: r["id"] == n.by_key["lilas"]["id"]),
    ("Organization", "partof:Organization.name=clinique", lambda n, r: False),
    ("Observation", "performer:Practitioner.family=martin", lambda n, r: "performer" in r),
    ("Observation", "subject:Patient.name=chaine&code=" + HBA1C,
     lambda n, r: r.get("subject", {}).get("reference") == ref(n.by_key["p1"]) and r["code"]["coding"][0]["code"] == HBA1C),
    ("Observation", "subject:Patient.name=lefort,chainon",
     lambda n, r: r.get("subject", {}).get("reference") in (ref(n.by_key["p2"]), ref(n.by_key["p3"]))),
]


@pytest.mark.parametrize("rtype, query, predicate", CHAIN_CASES, ids=[f"{c[0]}?{c[1]}" for c in CHAIN_CASES])
async def test_chain(client, net: Network, rtype: str, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    expected = net.ids(rtype, lambda r: predicate(net, r))
    assert expected or query in EMPTY, "a case that finds nothing proves little"
    assert await net.found(client, rtype, query) == expected


# -- _has -------------------------------------------------------------------------------------
def referrers(n: Network, rtype: str, target: dict[str, Any], field_refs: Callable[[dict[str, Any]], list[str]],
              predicate: Callable[[dict[str, Any]], bool]) -> bool:
    return any(ref(target) in field_refs(r) and predicate(r) for r in n.of(rtype))


def subject_of(r: dict[str, Any]) -> list[str]:
    return [r["subject"]["reference"]] if "subject" in r else []


def code_is(code: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["code"]["coding"][0]["code"] == code


def patient_subject(r: dict[str, Any]) -> list[str]:
    return [s for s in subject_of(r) if s.startswith("Patient/")]


HAS_CASES: list[tuple[str, str, Callable[[Network, dict[str, Any]], bool]]] = [
    ("Patient", f"_has:Observation:patient:code={GLUCOSE}", lambda n, r: referrers(n, "Observation", r, patient_subject, code_is(GLUCOSE))),
    ("Patient", f"_has:Observation:subject:code={HBA1C}", lambda n, r: referrers(n, "Observation", r, subject_of, code_is(HBA1C))),
    ("Patient", f"_has:Observation:patient:code={GLUCOSE}&_has:Observation:patient:code={HBA1C}",
     lambda n, r: referrers(n, "Observation", r, patient_subject, code_is(GLUCOSE)) and referrers(n, "Observation", r, patient_subject, code_is(HBA1C))),
    ("Patient", f"_has:Observation:patient:code={GLUCOSE},{HBA1C}", lambda n, r: referrers(n, "Observation", r, patient_subject, lambda o: True)),
    ("Group", f"_has:Observation:subject:code={GLUCOSE}", lambda n, r: True),
    ("Organization", "_has:Patient:organization:family=chaine", lambda n, r: r["id"] == n.by_key["lilas"]["id"]),
    # nested: patients with an observation that has a provenance by the GP
    ("Patient", "_has:Observation:patient:_has:Provenance:target:agent=Practitioner/{gp}", lambda n, r: r["id"] == n.by_key["p3"]["id"]),
    # the GP of patients who have an HbA1c
    ("Practitioner", f"_has:Patient:general-practitioner:_has:Observation:patient:code={HBA1C}", lambda n, r: True),
    # same type on both sides: observations that are a member of an HbA1c observation
    ("Observation", f"_has:Observation:has-member:code={HBA1C}", lambda n, r: r["id"] == n.by_key["o1"]["id"]),
    ("Patient", "_has:Encounter:subject:service-provider.name=clinique", lambda n, r: r["id"] == n.by_key["p1"]["id"]),
    ("Patient", "_has:Encounter:subject:service-provider.name=lilas", lambda n, r: False),  # string search matches the start
    ("Patient", "_has:Observation:patient:code=0000-0", lambda n, r: False),
]


@pytest.mark.parametrize("rtype, query, predicate", HAS_CASES, ids=[f"{c[0]}?{c[1]}" for c in HAS_CASES])
async def test_has(client, net: Network, rtype: str, query: str, predicate) -> None:  # type: ignore[no-untyped-def]
    expected = net.ids(rtype, lambda r: predicate(net, r))
    assert expected or query in EMPTY, "a case that finds nothing proves little"
    assert await net.found(client, rtype, query) == expected


# -- _include / _revinclude -------------------------------------------------------------------
def refs_of(r: dict[str, Any], *fields: str) -> list[str]:
    out = []
    for f in fields:
        v = r.get(f)
        for item in v if isinstance(v, list) else [v] if v else []:
            if "reference" in item:
                out.append(item["reference"])
    return out


def known(n: Network, references: list[str]) -> set[str]:
    return {x for x in references if n.get(x) is not None}


async def test_include_subject(client, net: Network) -> None:
    bundle = await net.bundle(client, "Observation", f"code={GLUCOSE}&_include=Observation:subject")
    matches = [r for r in net.of("Observation") if code_is(GLUCOSE)(r)]
    assert sorted(match_ids(bundle)) == sorted(r["id"] for r in matches)
    assert include_refs(bundle) == known(net, [x for r in matches for x in refs_of(r, "subject")])
    assert "total" not in bundle or bundle["total"] == len(matches)  # includes are not counted


async def test_include_with_target_type(client, net: Network) -> None:
    bundle = await net.bundle(client, "Observation", f"code={GLUCOSE}&_include=Observation:subject:Group")
    assert include_refs(bundle) == {ref(net.by_key["group"])}
    bundle = await net.bundle(client, "Observation", f"code={GLUCOSE}&_include=Observation:patient")
    assert include_refs(bundle) == {ref(net.by_key["p1"]), ref(net.by_key["p3"])}


async def test_include_iterate(client, net: Network) -> None:
    query = (f"code={GLUCOSE}&_include=Observation:subject&_include:iterate=Patient:organization"
             "&_include:iterate=Organization:partof&_include:iterate=Patient:general-practitioner")
    bundle = await net.bundle(client, "Observation", query)
    matches = [r for r in net.of("Observation") if code_is(GLUCOSE)(r)]
    level1 = known(net, [x for r in matches for x in refs_of(r, "subject")])
    patients = [net.get(x) for x in level1 if x.startswith("Patient/")]
    level2 = known(net, [x for p in patients for x in refs_of(p, "managingOrganization", "generalPractitioner")])
    level3 = known(net, [x for o in level2 if o.startswith("Organization/") for x in refs_of(net.get(o), "partOf")])
    assert include_refs(bundle) == level1 | level2 | level3
    assert ref(net.by_key["parent"]) in level3
    # without :iterate, the second level is not followed from included resources
    bundle = await net.bundle(client, "Observation", f"code={GLUCOSE}&_include=Observation:subject&_include=Patient:organization")
    assert include_refs(bundle) == level1


async def test_include_wildcard(client, net: Network) -> None:
    o1 = net.by_key["o1"]
    expected = known(net, refs_of(o1, "subject", "performer", "hasMember"))
    for query in ("_id={o1}&_include=*", "_id={o1}&_include=Observation:*"):
        bundle = await net.bundle(client, "Observation", query)
        assert match_ids(bundle) == [o1["id"]]
        assert include_refs(bundle) == expected == {ref(net.by_key["p1"]), ref(net.by_key["gp"])}


async def test_include_does_not_repeat_matches(client, net: Network) -> None:
    bundle = await net.bundle(client, "Observation", "_include=Observation:has-member")
    assert sorted(match_ids(bundle)) == sorted(r["id"] for r in net.of("Observation"))
    assert include_refs(bundle) == set()  # o1 is already a match
    entries = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]]
    assert len(entries) == len(set(entries))


async def test_revinclude(client, net: Network) -> None:
    p1 = net.by_key["p1"]
    bundle = await net.bundle(client, "Patient", "_id={p1}&_revinclude=Observation:subject")
    assert match_ids(bundle) == [p1["id"]]
    expected = {ref(r) for r in net.of("Observation") if ref(p1) in subject_of(r)}
    assert include_refs(bundle) == expected and len(expected) == 2
    # every reference parameter of the source type
    bundle = await net.bundle(client, "Patient", "_id={p1}&_revinclude=Observation:*&_revinclude=Encounter:*")
    assert include_refs(bundle) == expected | {ref(net.by_key["enc"])}
    # _revinclude with a target type: Patient matches only
    bundle = await net.bundle(client, "Patient", "_id={p1}&_revinclude=Observation:subject:Group")
    assert include_refs(bundle) == set()


async def test_revinclude_iterate(client, net: Network) -> None:
    p3 = net.by_key["p3"]
    bundle = await net.bundle(client, "Patient", "_id={p3}&_revinclude=Observation:patient&_revinclude:iterate=Provenance:target")
    observations = {ref(r) for r in net.of("Observation") if ref(p3) in subject_of(r)}
    provenance = {ref(r) for r in net.of("Provenance") if any(t["reference"] in observations for t in r["target"])}
    assert include_refs(bundle) == observations | provenance and len(provenance) == 1
    # mixed: organizations, their patients (revinclude) and those patients' GP (include, iterate)
    bundle = await net.bundle(client, "Organization",
                              "_id={lilas}&_revinclude=Patient:organization&_include:iterate=Patient:general-practitioner")
    assert include_refs(bundle) == {ref(net.by_key["p1"]), ref(net.by_key["gp"])}


@pytest.mark.parametrize("rtype, query, mentions", [
    ("Observation", "subject.foo=x", "foo"),
    ("Observation", "code.name=x", "not a reference"),
    ("Observation", "subject:Medication.code=x", "Medication"),
    ("Patient", "_has:Observation:foo:code=x", "foo"),
    ("Patient", "_has:Foo:patient:code=x", "Foo"),
    ("Patient", "_has:Observation:patient=x", "_has"),
    ("Patient", "_has:Observation:patient:foo=x", "foo"),
    ("Patient", "_has:Observation:encounter:code=x", "Patient"),
    ("Observation", "_include=Observation:foo", "foo"),
    ("Observation", "_include=Foo:subject", "Foo"),
    ("Observation", "_include=Observation:subject:Medication", "Medication"),
    ("Observation", "_include:bad=Observation:subject", "iterate"),
    ("Patient", "_revinclude=Observation:code", "code"),
])
async def test_chain_and_include_errors(client, rtype: str, query: str, mentions: str) -> None:  # type: ignore[no-untyped-def]
    key, _, value = query.partition("=")
    await expect_error(client, rtype, [(key, value)], mentions=mentions)
