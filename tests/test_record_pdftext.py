"""Text of plain PDFs read from their content streams (services.records.pdftext): the same words
as PDFium for what it reads, and ``None`` (PDFium reads it) for anything else."""

from __future__ import annotations

import io

import pypdfium2 as pdfium
import pytest

from parcours.services.records import pdftext, uploads
from tests.record_helpers import make_pdf


def pdfium_text(data: bytes) -> tuple[str, int]:
    doc = pdfium.PdfDocument(data)
    try:
        parts = []
        for i in range(len(doc)):
            page = doc[i]
            tp = page.get_textpage()
            parts.append(tp.get_text_range())
            tp.close()
            page.close()
        return " ".join(" ".join(parts).split()), len(doc)
    finally:
        doc.close()


def words(text: str | None) -> str | None:
    return None if text is None else " ".join(text.split())


def build_pdf(content: bytes, font: bytes = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
              extra: list[bytes] | None = None, xobjects: bytes = b"", stream_dict: bytes = b"") -> bytes:
    """A one-page PDF with a classic cross-reference table: catalog 1, pages 2, page 3, font 4,
    content 5, then ``extra`` objects from 6."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 5 0 R /Resources << /Font << /F1 4 0 R >> "
               + xobjects + b">> >>", font,
               b"<< /Length %d " % len(content) + stream_dict + b">>\nstream\n" + content + b"\nendstream", *(extra or [])]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % n + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def reportlab_pdf(compress: int, image: bool) -> bytes:
    from PIL import Image
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4, invariant=True, pageCompression=compress)
    for page in range(2):
        c.setFont("Times-Roman", 11)
        c.drawString(60, 800, f"Page {page + 1} : glycémie à jeun 1,32 g/L (contrôle) — « suivi » ; œdème")
        c.setFont("Courier-Bold", 9)
        c.drawString(60, 780, "Référence (interne) \\ 2026-02-10")
        t = c.beginText(60, 760)
        t.setFont("Helvetica", 10)
        t.textLines("Première ligne\nDeuxième ligne, fin.")
        c.drawText(t)
        if image:
            c.drawImage(ImageReader(Image.new("RGB", (16, 16), (200, 30, 30))), 60, 500, 16, 16)
        c.showPage()
    c.save()
    return buf.getvalue()


@pytest.mark.parametrize("data", [
    make_pdf("Compte rendu", "Fond d'oeil normal"),
    make_pdf("Glycémies", "HbA1c à 6,8 %", pages=3),
    reportlab_pdf(0, True), reportlab_pdf(1, True), reportlab_pdf(1, False),
    build_pdf(b"BT /F1 12 Tf 72 700 Td (Tension \\(13/8\\) normale) Tj 0 -14 Td [(Fr) 20 (\\351quence) -400 (cardiaque)] TJ "
              b"T* (Suite) ' 0 0 (fin (nested) ok) \" T* <48656C6C6F> Tj ET"),
], ids=["make_pdf", "pages", "a85-image", "flate-image", "flate", "operators"])
def test_same_words_as_pdfium(data: bytes) -> None:
    ref, pages = pdfium_text(data)
    assert words(pdftext.simple_text(data, 300, pages)) == ref
    # The upload check takes this path and gives the same text.
    assert uploads.inspect(data, "cr.pdf").text == ref


def test_a_wide_tj_gap_is_a_space_and_the_page_limit_holds() -> None:
    data = build_pdf(b"BT /F1 12 Tf 72 700 Td [(Bilan) -600 (sanguin)] TJ ET")
    assert words(pdftext.simple_text(data, 300, 1)) == "Bilan sanguin"
    assert pdftext.simple_text(data, 300, 2) is None  # PDFium counted another number of pages


@pytest.mark.parametrize("data", [
    # Fonts whose codes need their own maps: PDFium reads them.
    build_pdf(b"BT /F1 12 Tf (abc) Tj ET", font=b"<< /Type /Font /Subtype /Type0 /BaseFont /X /Encoding /Identity-H >>"),
    build_pdf(b"BT /F1 12 Tf (abc) Tj ET", font=b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /ToUnicode 6 0 R >>",
              extra=[b"<< /Length 0 >>\nstream\n\nendstream"]),
    build_pdf(b"BT /F1 12 Tf (abc) Tj ET", font=b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
                                                 b"/Encoding << /Differences [97 /b] >> >>"),
    build_pdf(b"BT /F1 12 Tf (\\351) Tj ET", font=b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"),  # beyond ASCII
    build_pdf(b"BT /F1 12 Tf (abc) Tj ET", font=b"<< /Type /Font /Subtype /Type1 /BaseFont /Symbol >>"),
    # Text may hide in a form XObject, an inline image is not tokenized, strings nested deeper.
    build_pdf(b"/X1 Do", xobjects=b"/XObject << /X1 6 0 R >>",
              extra=[b"<< /Type /XObject /Subtype /Form /BBox [0 0 10 10] /Length 0 >>\nstream\n\nendstream"]),
    build_pdf(b"BI /W 1 /H 1 /BPC 8 /CS /G ID \x00 EI BT /F1 12 Tf (abc) Tj ET"),
    build_pdf(b"BT /F1 12 Tf (a (b (c) d) e) Tj ET"),
    # Not the plainest structure: a filter with parameters, an unknown font, no xref table.
    build_pdf(b"BT /F9 12 Tf (abc) Tj ET"),
    build_pdf(b"BT /F1 12 Tf (abc) Tj ET").replace(b"xref\n0 6", b"xref\n0 7"),
    make_pdf("abc").replace(b"startxref", b"startxre_"),
], ids=["type0", "tounicode", "differences", "standard-beyond-ascii", "symbol", "form", "inline-image", "deep-parens",
        "unknown-font", "bad-xref", "no-startxref"])
def test_anything_else_goes_to_pdfium(data: bytes) -> None:
    assert pdftext.simple_text(data, 300, 1) is None


def test_an_incremental_update_goes_to_pdfium() -> None:
    data = make_pdf("Version une")
    xref = data[data.rindex(b"startxref"):].split()[1]
    at = str(len(data)).encode()
    data += b"xref\n0 0\ntrailer\n<< /Size 9 /Root 5 0 R /Prev " + xref + b" >>\nstartxref\n" + at + b"\n%%EOF\n"
    assert pdftext.simple_text(data, 300, 1) is None


def test_huge_content_goes_to_pdfium() -> None:
    import zlib

    flate = b"/Filter /FlateDecode "
    huge = zlib.compress(b"BT /F1 12 Tf " + b"0 0 Td " * 200_000 + b"(fin) Tj ET")
    assert pdftext.simple_text(build_pdf(huge, stream_dict=flate), 300, 1) is None  # more than 1 MiB once inflated
    small = build_pdf(zlib.compress(b"BT /F1 12 Tf (court) Tj ET"), stream_dict=flate)
    assert words(pdftext.simple_text(small, 300, 1)) == pdfium_text(small)[0] == "court"
