"""CDA R2 documents (CI-SIS): header metadata, narrative text, and laboratory results.

Parsed with defusedxml: no DTD, no entity expansion, no external resource, so a hostile
document (billion laughs, XXE) is refused rather than expanded. What is read:

* the header: document type (``code``), title, creation time, confidentiality, patient
  identifiers (INS), the author and its organization, the custodian, the date of care
  (``documentationOf/serviceEvent/effectiveTime``) and the practice setting;
* the narrative: the text of every ``section/title`` and ``section/text``, for search;
* level-3 lab entries (CR-BIO): each ``observation`` whose code is LOINC, with its value
  (PQ with a UCUM unit, or a coded or text value), reference range, interpretation and
  time; what :mod:`parcours.services.records.labs` turns into Observations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from xml.etree.ElementTree import Element

NS = "{urn:hl7-org:v3}"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
LOINC_OID = "2.16.840.1.113883.6.1"
CONFIDENTIALITY_OID = "2.16.840.1.113883.5.25"
INTERPRETATION_OID = "2.16.840.1.113883.5.83"
PRACTICE_SETTING_OID = "1.2.250.1.213.1.1.4.9"


class NotCda(ValueError):
    pass


@dataclass
class LabValue:
    code: str
    display: str
    effective: str | None
    value: float | None = None
    unit: str | None = None
    text: str | None = None
    coded: tuple[str, str, str] | None = None  # system oid, code, display
    low: float | None = None
    high: float | None = None
    interpretation: str | None = None
    status: str = "completed"


@dataclass
class CdaDocument:
    header: dict[str, Any]
    text: str
    results: list[LabValue] = field(default_factory=list)


def _t(el: Element | None, name: str) -> Element | None:
    return el.find(NS + name) if el is not None else None


def _path(el: Element | None, *names: str) -> Element | None:
    for n in names:
        el = _t(el, n)
        if el is None:
            return None
    return el


def _attr(el: Element | None, attr: str) -> str | None:
    return el.get(attr) if el is not None else None


def _text_of(el: Element | None) -> str:
    return " ".join(" ".join(el.itertext()).split()) if el is not None else ""


def _name(el: Element | None) -> str:
    if el is None:
        return ""
    parts = [_text_of(x) for x in el if x.tag in (NS + "prefix", NS + "given", NS + "family")]
    return " ".join(p for p in parts if p) or _text_of(el)


def parse_time(value: str | None) -> str | None:
    """HL7 TS (YYYYMMDD[HHMM[SS]][+ZZZZ]) as a FHIR date or dateTime."""
    if not value:
        return None
    v = value.strip()
    digits, tz = v, ""
    for sign in ("+", "-"):
        if sign in v[8:]:
            i = v.index(sign, 8)
            digits, tz = v[:i], v[i:]
    digits = digits.split(".")[0]
    if not digits.isdigit() or len(digits) < 4:
        return None
    if len(digits) == 4:
        return digits
    if len(digits) == 6:
        return f"{digits[:4]}-{digits[4:6]}" if 1 <= int(digits[4:6]) <= 12 else None
    date = f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}"
    try:  # senders do write month 20: such a time is no time
        datetime(int(digits[:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10] or 0), int(digits[10:12] or 0),
                 int(digits[12:14] or 0))
    except ValueError:
        return None
    if len(digits) < 12:
        return date
    sec = digits[12:14] or "00"
    zone = f"{tz[:3]}:{tz[3:5]}" if len(tz) == 5 else "+01:00"  # French senders omit it: Paris winter time
    return f"{date}T{digits[8:10]}:{digits[10:12]}:{sec}{zone}"


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None  # type: ignore[arg-type]
    except ValueError:
        return None


def parse(data: bytes) -> CdaDocument:
    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException

    try:
        root = DET.fromstring(data, forbid_dtd=True)
    except DefusedXmlException:
        raise NotCda("The XML file declares a DTD or entities, which are refused (XML entity attacks)") from None
    except Exception as e:
        raise NotCda(f"The XML file is not well-formed ({str(e)[:120]})") from None
    if root.tag != NS + "ClinicalDocument":
        raise NotCda("The XML file is not a CDA R2 document (no ClinicalDocument root in the HL7 v3 namespace): "
                     "other XML files are not accepted")
    code = _t(root, "code")
    header: dict[str, Any] = {
        "type_code": code.get("code") if code is not None else None,
        "type_system": code.get("codeSystem") if code is not None else None,
        "type_display": code.get("displayName") if code is not None else None,
        "title": _text_of(_t(root, "title")),
        "created": parse_time(_attr(_t(root, "effectiveTime"), "value")),
        "confidentiality": _attr(_t(root, "confidentialityCode"), "code"),
    }
    pr = _path(root, "recordTarget", "patientRole")
    header["patient_ids"] = [(i.get("root"), i.get("extension")) for i in pr.findall(NS + "id")] if pr is not None else []
    patient = _t(pr, "patient")
    header["patient_name"] = _name(_t(patient, "name"))
    header["patient_birth"] = parse_time(_attr(_t(patient, "birthTime"), "value"))
    author = _path(root, "author", "assignedAuthor")
    header["author_name"] = _name(_path(author, "assignedPerson", "name"))
    header["author_ids"] = [(i.get("root"), i.get("extension")) for i in author.findall(NS + "id")] if author is not None else []
    header["author_org"] = _text_of(_path(author, "representedOrganization", "name"))
    header["custodian"] = _text_of(_path(root, "custodian", "assignedCustodian", "representedCustodianOrganization", "name"))
    ev = _path(root, "documentationOf", "serviceEvent", "effectiveTime")
    header["care_date"] = parse_time(_attr(_t(ev, "low"), "value") or _attr(ev, "value"))
    setting = None
    for el in root.iter(NS + "standardIndustryClassCode"):
        if el.get("codeSystem") == PRACTICE_SETTING_OID:
            setting = (el.get("code"), el.get("displayName"))
            break
    for el in root.iter(NS + "practiceSettingCode"):
        setting = (el.get("code"), el.get("displayName"))
    header["practice_setting"] = setting
    body = _path(root, "component", "structuredBody")
    parts: list[str] = [header["title"]]
    if body is not None:
        for section in body.iter(NS + "section"):
            parts.append(_text_of(_t(section, "title")))
            parts.append(_text_of(_t(section, "text")))
    else:
        nb = _path(root, "component", "nonXMLBody", "text")
        if nb is not None and (nb.get("mediaType") or "").startswith("text/"):
            parts.append(_text_of(nb))
    results = _lab_results(body) if body is not None else []
    return CdaDocument(header, "\n".join(p for p in parts if p), results)


def _lab_results(body: Element) -> list[LabValue]:
    out: list[LabValue] = []
    for obs in body.iter(NS + "observation"):
        if obs.get("moodCode") not in (None, "EVN"):
            continue
        code = _t(obs, "code")
        value = _t(obs, "value")
        if code is None or value is None or code.get("codeSystem") != LOINC_OID or not code.get("code"):
            continue
        eff = _t(obs, "effectiveTime")
        when = _attr(eff, "value") or _attr(_t(eff, "low"), "value")
        lv = LabValue(code.get("code") or "", code.get("displayName") or code.get("code") or "", parse_time(when))
        status = _t(obs, "statusCode")
        lv.status = _attr(status, "code") or "completed"
        kind = value.get(XSI_TYPE, "")
        if kind.endswith("PQ") and not kind.startswith("IVL"):
            lv.value, lv.unit = _float(value.get("value")), value.get("unit")
        elif kind.endswith(("CD", "CE", "CV", "CO")):
            lv.coded = (value.get("codeSystem") or "", value.get("code") or "", value.get("displayName") or "")
        elif kind.endswith("ST") or kind.endswith("ED"):
            lv.text = _text_of(value)
        else:
            continue
        interp = _t(obs, "interpretationCode")
        if interp is not None:
            lv.interpretation = interp.get("code")
        rng = _path(obs, "referenceRange", "observationRange", "value")
        if rng is not None:
            lv.low = _float(_attr(_t(rng, "low"), "value"))
            lv.high = _float(_attr(_t(rng, "high"), "value"))
        out.append(lv)
    return out


__all__ = ["CdaDocument", "LabValue", "NotCda", "parse", "parse_time"]
