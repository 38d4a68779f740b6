"""Document metadata as the national shared record (DMP) and the CI-SIS use them.

* type: LOINC codes of the French interoperability framework (JDV_J07-XdsTypeCode-CISIS),
  those the CI-SIS example documents carry, with the label the framework gives them;
* class: TRE_A03-ClasseDocument (``urn:oid:1.2.250.1.213.1.1.4.1``);
* practice setting: the CI-SIS ``practiceSettingCode`` values (``1.2.250.1.213.1.1.4.9``);
* confidentiality: HL7 v3 Confidentiality (N normal, R restricted, V very restricted);
  R and V are also put in ``meta.security``, where the access policy reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CLASS_SYSTEM = "urn:oid:1.2.250.1.213.1.1.4.1"
PRACTICE_SETTING_SYSTEM = "urn:oid:1.2.250.1.213.1.1.4.9"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
FORMAT_SYSTEM = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
RELATED_SYSTEM = "https://parcours.example/fhir/CodeSystem/record"


@dataclass(frozen=True)
class DocType:
    code: str
    fr: str
    en: str
    class_code: str | None


DOC_TYPES: tuple[DocType, ...] = (
    DocType("11502-2", "CR d'examens biologiques", "Laboratory report", "10"),
    DocType("11488-4", "CR de consultation", "Consultation note", "10"),
    DocType("18748-4", "CR d'imagerie médicale", "Diagnostic imaging report", "10"),
    DocType("11490-0", "Lettre de liaison à la sortie d'un établissement de soins", "Discharge summary", "10"),
    DocType("34133-9", "Synthèse d'épisode de soins", "Summary of episode note", "11"),
    DocType("60591-5", "Synthèse médicale", "Patient summary", "11"),
    DocType("85208-7", "CR d'acte de télémédecine", "Telehealth consult note", "10"),
    DocType("75496-0", "Demande d'acte de télémédecine", "Telehealth request", "13"),
    DocType("87273-9", "Note de vaccination", "Immunization note", "10"),
    DocType("96173-0", "Test rapide d'orientation diagnostique", "Rapid diagnostic test", "10"),
    DocType("29274-8", "Mesures de signes vitaux", "Vital signs measurements", "10"),
    DocType("57833-6", "Prescription de produits de santé", "Prescription for medication", "13"),
    DocType("34874-8", "CR opératoire", "Surgical operation note", "10"),
    DocType("11526-1", "CR d'anatomie et de cytologie pathologiques", "Pathology report", "10"),
    DocType("51855-5", "Document déposé par le patient", "Patient note", None),
)
TYPES = {t.code: t for t in DOC_TYPES}
PATIENT_NOTE = "51855-5"
LAB_REPORT = "11502-2"

CLASSES = {
    "10": ("Compte rendu", "Report"),
    "11": ("Synthèse", "Summary"),
    "12": ("Certificat, déclaration", "Certificate, declaration"),
    "13": ("Prescription, plan de soins", "Prescription, care plan"),
}
PRACTICE_SETTINGS = {
    "AMBULATOIRE": ("Ambulatoire", "Outpatient care"),
    "ETABLISSEMENT": ("Établissement de santé", "Health care facility"),
    "DEPISTAGE": ("Dépistage", "Screening"),
}
CONFIDENTIALITY_LEVELS = {
    "N": ("Normal", "Normal"),
    "R": ("Restreint : visible par l'auteur et le patient", "Restricted: seen by its author and the patient"),
    "V": ("Très restreint", "Very restricted"),
}
FORMATS = {
    "application/pdf": ("urn:ihe:iti:xds-sd:pdf:2008", "PDF embedded in CDA Document"),
    "text/plain": ("urn:ihe:iti:xds-sd:text:2008", "Text embedded in CDA Document"),
}
INTERPRETATIONS = {"N": "Normal", "L": "Low", "H": "High", "LL": "Critical low", "HH": "Critical high", "A": "Abnormal",
                   "AA": "Critical abnormal", "POS": "Positive", "NEG": "Negative"}


def type_label(code: str | None, lang: str) -> str:
    t = TYPES.get(code or "")
    if t is None:
        return code or ""
    return t.fr if lang == "fr" else t.en


def coding(system: str, code: str, display: str | None = None) -> dict:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out
