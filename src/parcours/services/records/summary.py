"""A printable patient summary in the spirit of the International Patient Summary (IPS):
identity, problems, allergies, medications, immunizations and recent results, as a PDF.

Read through the caller's Repository (one ``$everything``: the policy decides, the audit
records), drawn with reportlab's platypus in the DejaVu-like Vera font that reportlab ships
(French accents and symbols print as they are).
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

from parcours.services.records.timeline import text_of
from parcours.store.repository import Repository

TYPES = ["Condition", "AllergyIntolerance", "MedicationRequest", "MedicationStatement", "Immunization", "Observation"]

TEXTS = {
    "fr": {"title": "Synthèse du dossier patient", "born": "Né(e) le", "ins": "INS", "generated": "Édité le {when} par Parcours",
           "problems": "Problèmes de santé", "allergies": "Allergies et intolérances", "medications": "Traitements en cours",
           "immunizations": "Vaccinations", "results": "Résultats récents", "none": "Aucune information enregistrée.",
           "note": "Document de synthèse généré automatiquement à partir du dossier partagé ; il ne remplace pas les documents sources."},
    "en": {"title": "Patient summary", "born": "Born", "ins": "INS", "generated": "Printed on {when} by Parcours",
           "problems": "Problems", "allergies": "Allergies and intolerances", "medications": "Current medications",
           "immunizations": "Immunizations", "results": "Recent results", "none": "Nothing recorded.",
           "note": "Summary generated from the shared record; it does not replace the source documents."},
}


def _font() -> tuple[str, str]:
    import reportlab
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    fonts = Path(reportlab.__file__).parent / "fonts"
    try:
        if "Vera" not in pdfmetrics.getRegisteredFontNames():
            pdfmetrics.registerFont(TTFont("Vera", str(fonts / "Vera.ttf")))
            pdfmetrics.registerFont(TTFont("VeraBd", str(fonts / "VeraBd.ttf")))
        return "Vera", "VeraBd"
    except Exception:  # a reportlab without its fonts: Helvetica (Latin-1) still prints French
        return "Helvetica", "Helvetica-Bold"


def sections(resources: list[tuple[str, dict]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"problems": [], "allergies": [], "medications": [], "immunizations": [], "results": []}
    obs: list[tuple[str, str]] = []
    for rtype, r in resources:
        status = text_of(r.get("clinicalStatus")).lower()
        if rtype == "Condition" and status not in ("inactive", "resolved", "remission"):
            onset = str(r.get("onsetDateTime") or r.get("recordedDate") or "")[:10]
            out["problems"].append(" — ".join(x for x in (text_of(r.get("code")), onset) if x))
        elif rtype == "AllergyIntolerance" and status != "resolved":
            crit = r.get("criticality")
            out["allergies"].append(" — ".join(x for x in (text_of(r.get("code")), crit or "") if x))
        elif rtype in ("MedicationRequest", "MedicationStatement") and r.get("status") in ("active", "intended", "on-hold", None):
            name = text_of(r.get("medicationCodeableConcept")) or (r.get("medicationReference") or {}).get("display") or ""
            dose = "; ".join(str(d.get("text") or "") for d in (r.get("dosageInstruction") or r.get("dosage") or []) if d.get("text"))
            out["medications"].append(" — ".join(x for x in (name, dose) if x))
        elif rtype == "Immunization" and r.get("status") != "entered-in-error":
            out["immunizations"].append(" — ".join(x for x in (text_of(r.get("vaccineCode")),
                                                             str(r.get("occurrenceDateTime") or "")[:10]) if x))
        elif rtype == "Observation" and r.get("status") not in ("entered-in-error", "cancelled"):
            q = r.get("valueQuantity") or {}
            value = f"{q.get('value')} {q.get('unit') or ''}".strip() if q else str(r.get("valueString") or text_of(r.get("valueCodeableConcept")))
            when = str(r.get("effectiveDateTime") or r.get("issued") or "")
            obs.append((when, f"{text_of(r.get('code'))} : {value} ({when[:10]})"))
    out["results"] = [t for _, t in sorted(obs, reverse=True)[:15]]
    for k in ("problems", "allergies", "medications", "immunizations"):
        out[k] = sorted(set(x for x in out[k] if x))
    return out


async def collect(repo: Repository, patient_id: str) -> tuple[dict, dict[str, list[str]]]:
    stored = await repo.everything(patient_id, types=["Patient", *TYPES])
    patient = next((s.resource() for s in stored if s.resource_type == "Patient"), {})
    return patient, sections([(s.resource_type, s.resource()) for s in stored if s.resource_type != "Patient"])


def render_pdf(patient: dict, secs: dict[str, list[str]], *, lang: str, now: datetime) -> bytes:
    from xml.sax.saxutils import escape

    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer

    t = TEXTS.get(lang, TEXTS["fr"])
    regular, bold = _font()
    body = ParagraphStyle("body", fontName=regular, fontSize=10, leading=13)
    h1 = ParagraphStyle("h1", fontName=bold, fontSize=16, leading=20, spaceAfter=6)
    h2 = ParagraphStyle("h2", fontName=bold, fontSize=12, leading=15, spaceBefore=10, spaceAfter=4, textColor=colors.HexColor("#1d4f91"))
    small = ParagraphStyle("small", fontName=regular, fontSize=8, leading=10, textColor=colors.HexColor("#555555"))
    name = (patient.get("name") or [{}])[0]
    full = " ".join([*(name.get("given") or []), str(name.get("family") or "")]).strip()
    ins = next((i.get("value") for i in patient.get("identifier") or [] if str(i.get("system", "")).endswith("1.2.250.1.213.1.4.8")), None)
    buf = io.BytesIO()
    doc = SimpleDocTemplate(buf, pagesize=A4, leftMargin=18 * mm, rightMargin=18 * mm, topMargin=16 * mm, bottomMargin=16 * mm,
                            title=f"{t['title']} — {full}", author="Parcours", lang=lang)
    flow = [Paragraph(escape(t["title"]), h1), Paragraph(f"<b>{escape(full)}</b>", body)]
    ident = [f"{t['born']} {patient.get('birthDate', '')}"] + ([f"{t['ins']} {ins}"] if ins else [])
    flow.append(Paragraph(escape(" · ".join(ident)), body))
    flow.append(Paragraph(escape(t["generated"].format(when=now.strftime("%Y-%m-%d %H:%M UTC"))), small))
    for key in ("problems", "allergies", "medications", "immunizations", "results"):
        flow.append(Paragraph(escape(t[key]), h2))
        items = secs.get(key) or []
        if not items:
            flow.append(Paragraph(escape(t["none"]), body))
        for item in items:
            flow.append(Paragraph("• " + escape(item), body))
    flow += [Spacer(1, 8 * mm), Paragraph(escape(t["note"]), small)]
    doc.build(flow)
    return buf.getvalue()


async def summary_pdf(repo: Repository, patient_id: str, *, lang: str, now: datetime) -> tuple[bytes, str]:
    patient, secs = await collect(repo, patient_id)
    name = (patient.get("name") or [{}])[0]
    filename = f"synthese-{str(name.get('family') or patient_id).lower().replace(' ', '-')}.pdf"
    return render_pdf(patient, secs, lang=lang, now=now), filename


__all__ = ["collect", "render_pdf", "sections", "summary_pdf"]
