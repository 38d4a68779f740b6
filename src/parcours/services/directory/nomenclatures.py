"""Directory nomenclatures: professions, specialties, care offers and languages.

Professions and specialties are the French national health directory tables
(NOS ``TRE_G15-ProfessionSante`` and ``TRE_R38-SpecialiteOrdinale``), bundled in
``data/nomenclatures.json`` with their French labels as published and English
labels of our own. Care offers are Parcours' code system, documented in
``docs/directory.md``.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources

PROFESSION_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_G15-ProfessionSante/FHIR/TRE-G15-ProfessionSante"
SPECIALTY_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R38-SpecialiteOrdinale/FHIR/TRE-R38-SpecialiteOrdinale"
CARE_OFFER_SYSTEM = "https://parcours.example/fhir/CodeSystem/care-offer"
LANGUAGE_SYSTEM = "urn:ietf:bcp:47"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# ANS tables also used in imported directory data.
ANS_LANGUAGE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_G00-Langue/FHIR/TRE-G00-Langue"

LANGS = ("fr", "en")


@dataclass(frozen=True)
class Concept:
    system: str
    code: str
    fr: str
    en: str
    status: str = "active"
    display: str = ""  # the official display, when it differs from the short label
    profession: str | None = None  # for a specialty: the G15 profession it belongs to
    act_code: str | None = None  # for a care offer: the v3 ActCode (AMB, VR, HH)

    def label(self, lang: str = "fr") -> str:
        return self.en if lang == "en" else self.fr

    def coding(self) -> dict:
        """A FHIR Coding with the official (French) display."""
        return {"system": self.system, "code": self.code, "display": self.display or self.fr}

    def as_json(self, lang: str | None = None) -> dict:
        out = {"system": self.system, "code": self.code, "fr": self.fr, "en": self.en}
        if lang:
            out["label"] = self.label(lang)
        if self.status != "active":
            out["status"] = self.status
        if self.profession:
            out["profession"] = self.profession
        return out


class Nomenclature:
    """One code system: lookup by code, search by label in either language."""

    def __init__(self, system: str, concepts: list[Concept]) -> None:
        self.system = system
        self.concepts = concepts
        self._by_code = {c.code.upper(): c for c in concepts}

    def get(self, code: str) -> Concept | None:
        return self._by_code.get(code.strip().upper())

    def __contains__(self, code: str) -> bool:
        return self.get(code) is not None

    def active(self) -> list[Concept]:
        return [c for c in self.concepts if c.status == "active"]

    def search(self, text: str, *, limit: int = 20, include_inactive: bool = False) -> list[Concept]:
        """Concepts whose code or a word of a label starts with ``text`` (accents ignored)."""
        q = fold(text)
        if not q:
            return []
        hits: list[tuple[int, Concept]] = []
        for c in self.concepts:
            if c.status != "active" and not include_inactive:
                continue
            labels = [fold(c.fr), fold(c.en), fold(c.display)]
            if c.code.lower() == q:
                rank = 0
            elif any(lb.startswith(q) for lb in labels):
                rank = 1
            elif any(w.startswith(q) for lb in labels for w in lb.replace("-", " ").split()):
                rank = 2
            elif any(q in lb for lb in labels):
                rank = 3
            else:
                continue
            hits.append((rank, c))
        hits.sort(key=lambda h: (h[0], h[1].fr))
        return [c for _, c in hits[:limit]]


@dataclass(frozen=True)
class Nomenclatures:
    professions: Nomenclature
    specialties: Nomenclature
    care_offers: Nomenclature
    languages: Nomenclature
    versions: dict[str, str]

    def specialties_of(self, profession: str) -> list[Concept]:
        return [c for c in self.specialties.active() if c.profession == profession]


def fold(text: str) -> str:
    """Lower-case without accents, for matching what people type."""
    nfkd = unicodedata.normalize("NFKD", text or "")
    return "".join(ch for ch in nfkd if not unicodedata.combining(ch)).lower().strip()


@cache
def nomenclatures() -> Nomenclatures:
    raw = json.loads(resources.files("parcours.services.directory").joinpath("data/nomenclatures.json").read_text("utf-8"))
    sy = raw["systems"]
    return Nomenclatures(
        professions=Nomenclature(sy["profession"], [
            Concept(sy["profession"], r["code"], r["fr"], r["en"], r["status"]) for r in raw["professions"]]),
        specialties=Nomenclature(sy["specialty"], [
            Concept(sy["specialty"], r["code"], r["fr"], r["en"], r["status"], r["display"], r["profession"]) for r in raw["specialties"]]),
        care_offers=Nomenclature(sy["care_offer"], [
            Concept(sy["care_offer"], r["code"], r["fr"], r["en"], act_code=r["act_code"]) for r in raw["care_offers"]]),
        languages=Nomenclature(sy["language"], [Concept(sy["language"], r["code"], r["fr"], r["en"]) for r in raw["languages"]]),
        versions=raw["versions"],
    )


def care_offer_codes() -> tuple[str, ...]:
    return tuple(c.code for c in nomenclatures().care_offers.concepts)


__all__ = [
    "ACT_CODE_SYSTEM", "ANS_LANGUAGE_SYSTEM", "CARE_OFFER_SYSTEM", "Concept", "LANGUAGE_SYSTEM", "Nomenclature",
    "Nomenclatures", "PROFESSION_SYSTEM", "SPECIALTY_SYSTEM", "care_offer_codes", "fold", "nomenclatures",
]
