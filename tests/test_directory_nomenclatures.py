"""Directory nomenclatures: TRE_G15 professions, TRE_R38 specialties, care offers; commune lookups."""

from __future__ import annotations

import json

import pytest

from parcours.core.errors import BadRequest
from parcours.services.directory.geo import communes, haversine_km
from parcours.services.directory.nomenclatures import PROFESSION_SYSTEM, SPECIALTY_SYSTEM, nomenclatures
from tests.conftest import FIXTURES


def test_professions_and_specialties_have_both_languages() -> None:
    nom = nomenclatures()
    gp = nom.specialties.get("SM54")
    assert gp is not None and gp.fr == "Médecine générale" and gp.display == "Médecine générale (SM)"
    assert gp.en == "General practice" and gp.profession == "10"
    assert nom.professions.get("10").fr == "Médecin"  # type: ignore[union-attr]
    assert nom.professions.get("60").label("en") == "Nurse"  # type: ignore[union-attr]
    assert nom.specialties.get("sm04").code == "SM04"  # type: ignore[union-attr]  # codes are case-insensitive
    assert nom.specialties.get("SM99") is None
    assert len(nom.specialties.concepts) == 110 and len(nom.professions.concepts) == 30
    for c in nom.specialties.concepts + nom.professions.concepts:
        assert c.fr and c.en and c.status in ("active", "deprecated")
    assert [c.code for c in nom.specialties_of("40")] == ["SCD01", "SCD02", "SCD03"]
    assert nom.professions.get("93").status == "deprecated"  # type: ignore[union-attr]  # psychologist left G15
    assert "93" not in [c.code for c in nom.professions.active()]


def test_label_search_ignores_case_and_accents() -> None:
    nom = nomenclatures()
    found = [c.code for c in nom.specialties.search("generale")]
    assert "SM54" in found and "SM05" in found  # Médecine générale, Chirurgie générale
    assert nom.specialties.search("SM54")[0].code == "SM54"
    assert "SM04" in [c.code for c in nom.specialties.search("cardio")]
    assert [c.code for c in nom.professions.search("kiné")] == ["70"]
    assert "70" in [c.code for c in nom.professions.search("physio")]  # English label
    assert nom.care_offers.get("teleconsultation").act_code == "VR"  # type: ignore[union-attr]
    assert nom.specialties.search("") == []


def _codings(node: object, out: list[dict]) -> list[dict]:
    if isinstance(node, dict):
        if node.get("system") in (PROFESSION_SYSTEM, SPECIALTY_SYSTEM) and "code" in node:
            out.append(node)
        for v in node.values():
            _codings(v, out)
    elif isinstance(node, list):
        for v in node:
            _codings(v, out)
    return out


def test_codes_of_the_implementation_guide_examples_are_known() -> None:
    """Every G15/R38 coding in the Annuaire Santé and FR Core examples exists in the bundled tables,
    with the official display or its short label."""
    nom = nomenclatures()
    seen = 0
    for path in sorted((FIXTURES / "directory").rglob("*.json")):
        for coding in _codings(json.loads(path.read_text()), []):
            table = nom.professions if coding["system"] == PROFESSION_SYSTEM else nom.specialties
            concept = table.get(coding["code"])
            assert concept is not None, f"{path.name}: unknown {coding}"
            if "display" in coding:
                assert coding["display"] in (concept.fr, concept.display), f"{path.name}: {coding}"
            seen += 1
    assert seen >= 5


def test_communes_lookup_and_distances() -> None:
    geo = communes()
    amiens = geo.get("80021")
    assert amiens.name == "Amiens" and amiens.departement == "80" and amiens.region == "32"
    assert "80000" in amiens.postal_codes and amiens.population > 100_000
    assert abs(amiens.lat - 49.894) < 0.05 and abs(amiens.lon - 2.296) < 0.05
    lille = geo.get("59350")
    # Lille - Amiens: about 100 km as the crow flies.
    assert 95 < haversine_km(lille.lat, lille.lon, amiens.lat, amiens.lon) < 110
    assert geo.resolve_place("80021") is amiens
    assert geo.resolve_place("80000") is amiens
    assert geo.resolve_place("amiens") is amiens
    assert geo.resolve_place("Saint Quentin").code == "02691"
    # Paris is listed by arrondissement for generation; the city row stays for lookups.
    assert geo.get("75056").name == "Paris"
    assert not any(c.code == "75056" for c in geo.in_region("11"))
    assert sum(1 for c in geo.in_region("32")) > 3700
    with pytest.raises(BadRequest, match="Unknown place"):
        geo.resolve_place("Nowhere-sur-Rien")


def test_autocomplete_by_name_and_postal_code() -> None:
    geo = communes()
    assert geo.autocomplete("amie")[0].code == "80021"
    assert geo.autocomplete("AMIENS")[0].code == "80021"
    assert geo.autocomplete("etaples")[0].code == "62318"  # Étaples: accents ignored
    assert geo.autocomplete("saint quentin")[0].code == "02691"  # the biggest of the Saint-Quentin
    assert geo.autocomplete("saint-quentin", region="32")[0].code == "02691"
    by_pc = geo.autocomplete("02100")
    assert by_pc[0].code == "02691"
    assert all("02100" in c.postal_codes for c in by_pc)
    assert [c.code for c in geo.autocomplete("59000")] == ["59350"]
    assert len(geo.autocomplete("saint", limit=7)) == 7
    assert geo.autocomplete("") == [] and geo.autocomplete("zzzzqqq") == []
