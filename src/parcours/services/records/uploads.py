"""What an upload really is, before anything is stored.

The client's media type and file name are never trusted: the type is sniffed from the
bytes (``filetype`` for binary formats, then XML and text rules), must be one the shared
record accepts (PDF, JPEG, PNG, CDA R2, plain text), must agree with the file name's
extension when there is one, and the content must parse as that type:

* PDF: opens with pypdf, has pages, is not encrypted, carries no active content
  (JavaScript, launch actions, embedded files, XFA, rich media) and nothing after its
  last ``%%EOF`` but whitespace (a PDF with a ZIP or an HTML page appended is a
  polyglot). Decompression is bounded (pypdf's stream limits; a bomb is refused).
* JPEG / PNG: decoded by Pillow; more than 40 million pixels is refused before decoding
  (decompression bombs), truncated images too, and so is data after the end marker that
  looks like another format.
* CDA R2: well-formed XML without DTD or entities (defusedxml: no billion laughs, no
  external entity), root ``ClinicalDocument`` in the HL7 v3 namespace.
* Plain text: UTF-8 (or Latin-1), no NUL or control bytes, not HTML.

Every refusal is an :class:`~parcours.core.errors.UploadRejected` with a message for the
person who sent the file. The malware scan (:class:`ClamdScanner`, ClamAV's ``INSTREAM``
over its unix socket) runs after these checks when a socket is configured.

:func:`inspect` is a pure function of the bytes, so it may run in a worker thread or
process (the benchmark does the latter).
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

from parcours.core.errors import MalwareDetected, ScannerUnavailable, TooLarge, UploadRejected
from parcours.services.records import pdftext

PDF, JPEG, PNG, CDA, TEXT = "application/pdf", "image/jpeg", "image/png", "application/hl7-cda+xml", "text/plain"
ACCEPTED = (PDF, JPEG, PNG, CDA, TEXT)
EXTENSIONS = {".pdf": PDF, ".jpg": JPEG, ".jpeg": JPEG, ".png": PNG, ".xml": CDA, ".cda": CDA, ".txt": TEXT}
LABELS = {PDF: "a PDF document", JPEG: "a JPEG image", PNG: "a PNG image", CDA: "a CDA R2 document", TEXT: "plain text",
          "application/zip": "a ZIP archive", "application/xml": "an XML file that is not a CDA R2 document",
          "text/html": "an HTML page", "application/x-msdownload": "a program", "application/x-executable": "a program", "application/octet-stream": "binary data of an unknown kind"}
MAX_PIXELS = 40_000_000
MAX_TEXT = 200_000  # characters of extracted text kept for search
MAX_PAGES_READ = 300
CDA_NS = "urn:hl7-org:v3"
# Other formats whose signature, found inside a file, makes it a polyglot.
FOREIGN = (b"%PDF-", b"PK\x03\x04", b"<script", b"<html", b"<!DOCTYPE html", b"MZ\x90\x00", b"\x7fELF")
ACTIVE_PDF_NAMES = {"/JavaScript", "/JS", "/Launch", "/EmbeddedFile", "/EmbeddedFiles", "/RichMedia", "/XFA", "/SubmitForm",
                    "/ImportData", "/AA"}


@dataclass
class Inspected:
    """A file that passed the checks: its real type, its text for search, CDA header data."""

    content_type: str
    size: int
    text: str = ""
    pages: int | None = None
    cda: dict[str, Any] = field(default_factory=dict)


def _label(mime: str) -> str:
    return LABELS.get(mime, mime)


def sniff(data: bytes) -> str:
    """The media type of ``data`` from its bytes alone."""
    import filetype

    if data.startswith(b"%PDF-"):
        return PDF
    kind = filetype.guess(data[:8192])
    if kind is not None:
        return str(kind.mime)
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<script" in head[:1024]:
        return "text/html"
    if head.startswith(b"<"):
        return "application/xml"
    if b"\x00" in data[:65536]:
        return "application/octet-stream"
    return TEXT


def inspect(data: bytes, filename: str | None = None, *, max_bytes: int | None = None) -> Inspected:
    """Check an upload; its real type and extracted text, or :class:`UploadRejected`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"The file is {len(data) // 1024} KiB; the limit is {max_bytes // 1024} KiB")
    if not data:
        raise UploadRejected("The file is empty")
    mime = sniff(data)
    if mime == "application/xml":
        mime = CDA  # checked as such below: any other XML is refused there
    if mime not in ACCEPTED:
        raise UploadRejected(f"This file is {_label(mime)}: the shared record accepts PDF, JPEG, PNG, CDA R2 and plain text")
    ext = ""
    if filename and "." in filename.rsplit("/", 1)[-1]:
        ext = "." + filename.rsplit(".", 1)[-1].lower()
        expected = EXTENSIONS.get(ext)
        if expected is None:
            raise UploadRejected(f"Files ending in {ext} are not accepted: send PDF, JPEG, PNG, CDA R2 (.xml) or text (.txt)")
        if expected != mime:
            raise UploadRejected(f"The file is named {ext} but its content is {_label(mime)}: rename it or send the right file")
    if mime == PDF:
        return _pdf(data)
    if mime in (JPEG, PNG):
        return _image(data, mime)
    if mime == CDA:
        return _cda(data)
    return _text(data)


def _foreign_after(tail: bytes) -> bool:
    low = tail.lower()
    return any(sig.lower() in low for sig in FOREIGN)


_ESCAPED_NAME_RE = re.compile(rb"/[A-Za-z0-9]*#[0-9A-Fa-f]{2}(?:[A-Za-z0-9]|#[0-9A-Fa-f]{2})*")
_DELIMITERS = b" \t\r\n\f\x00/<>[]()%"


# Longest first: "/JS" must not stop the match of "/JavaScript" short.
_ACTIVE_NAME_RE = re.compile(b"|".join(re.escape(n.encode()) for n in sorted(ACTIVE_PDF_NAMES, key=len, reverse=True)))


def _pdf_names(data: bytes) -> set[str]:
    """The active-content names that appear in the file's bytes (plain or #-escaped).
    One pass of a literal alternation (every name starts with "/"), not a regex over every
    name nor one search per name: the file may be megabytes of image data."""
    out = set()
    for m in _ACTIVE_NAME_RE.finditer(data):
        end = m.end()
        if end >= len(data) or data[end] in _DELIMITERS:
            out.add(m.group(0).decode())
    if b"#" in data:
        for m in _ESCAPED_NAME_RE.finditer(data):
            decoded = re.sub(rb"#([0-9A-Fa-f]{2})", lambda x: bytes([int(x.group(1), 16)]), m.group(0)).decode("latin-1")
            if decoded in ACTIVE_PDF_NAMES:
                out.add(decoded)
    return out


def pdf_text(data: bytes, max_pages: int = MAX_PAGES_READ) -> str | None:
    """The text of a PDF by PDFium (pypdfium2: C, far faster than pypdf), or None when it is
    not installed (pypdf then extracts). A PDF PDFium cannot open is refused."""
    try:
        import pypdfium2 as pdfium
    except ImportError:
        return None
    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        raise UploadRejected(f"The PDF cannot be read (it is damaged or not really a PDF): {str(e)[:80]}") from None
    try:
        if len(doc) == 0:
            raise UploadRejected("The PDF has no page")
        # PDFium opened the file and found its pages; plain generated PDFs are read
        # from their content streams, without loading pages (pdftext), the others by PDFium.
        simple = pdftext.simple_text(data, max_pages, len(doc))
        if simple is not None:
            return simple
        parts: list[str] = []
        size = 0
        for i in range(min(len(doc), max_pages)):
            page = doc[i]
            tp = page.get_textpage()
            t = tp.get_text_range()
            tp.close()
            page.close()
            parts.append(t)
            size += len(t)
            if size > MAX_TEXT:
                break
        return " ".join(parts)
    finally:
        doc.close()


def _pdf(data: bytes) -> Inspected:
    import pypdf
    from pypdf.errors import PdfReadError

    eof = data.rfind(b"%%EOF")
    if eof < 0:
        raise UploadRejected("The PDF is damaged: it has no end marker (%%EOF)")
    tail = data[eof + 5:]
    if tail.strip(b" \t\r\n\x00") and (len(tail.strip()) > 64 or _foreign_after(tail)):
        raise UploadRejected("The PDF has other data appended after its end (a polyglot file): it is refused")
    if _foreign_after(data[5:1024]):
        raise UploadRejected("The PDF's first bytes also look like another format (a polyglot file): it is refused")
    active = _pdf_names(data) & ACTIVE_PDF_NAMES
    if active:
        raise UploadRejected(f"The PDF carries active content ({', '.join(sorted(active))}): print it to a plain PDF and send that")
    if b"/ObjStm" not in data and b"/Encrypt" not in data:
        # Every dictionary is in plain sight (no object streams), so the scan above saw every
        # action; PDFium parsing the file and its pages is the structure check.
        text = pdf_text(data)
        if text is not None:
            return Inspected(PDF, len(data), _clean(text))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            if reader.is_encrypted:
                raise UploadRejected("The PDF is protected by a password: send an unprotected copy")
            pages = len(reader.pages)
            if pages == 0:
                raise UploadRejected("The PDF has no page")
            root = reader.trailer["/Root"]
            names = root.get("/Names")
            names = names.get_object() if names is not None else {}
            opening = str(root["/OpenAction"].get_object()) if "/OpenAction" in root else ""
            form = root["/AcroForm"].get_object() if "/AcroForm" in root else {}
            if ("/JS" in opening or "/Launch" in opening or "/AA" in root or "/JavaScript" in names or "/EmbeddedFiles" in names
                    or "/XFA" in form):
                raise UploadRejected("The PDF carries active content: print it to a plain PDF and send that")
            for page in reader.pages[:MAX_PAGES_READ]:
                if "/AA" in page:
                    raise UploadRejected("The PDF carries active content (page actions): print it to a plain PDF and send that")
            fast = pdf_text(data)
            parts: list[str] = [fast] if fast is not None else []
            size = 0
            for page in reader.pages[:MAX_PAGES_READ] if fast is None else []:
                t = page.extract_text() or ""
                parts.append(t)
                size += len(t)
                if size > MAX_TEXT:
                    break
    except UploadRejected:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError, RecursionError,
            struct.error, OSError, MemoryError) as e:
        raise UploadRejected(f"The PDF cannot be read (it is damaged or not really a PDF): {type(e).__name__}") from None
    except Exception as e:  # pypdf's LimitReachedError and kin: decompression bombs
        if "limit" in type(e).__name__.lower() or "limit" in str(e).lower():
            raise UploadRejected("The PDF expands to far more data than it holds (a decompression bomb): it is refused") from None
        raise UploadRejected(f"The PDF cannot be read: {type(e).__name__}") from None
    return Inspected(PDF, len(data), _clean(" ".join(parts)), pages=pages)


def _image(data: bytes, mime: str) -> Inspected:
    from PIL import Image, UnidentifiedImageError

    end = data.rfind(b"\xff\xd9") + 2 if mime == JPEG else data.rfind(b"IEND") + 8
    if end < 2 or _foreign_after(data[end:]):
        raise UploadRejected("The image has another file appended after its end (a polyglot file): it is refused")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format != ("JPEG" if mime == JPEG else "PNG"):
                    raise UploadRejected("The image is not what its first bytes say")
                if im.width * im.height > MAX_PIXELS:
                    raise UploadRejected(f"The image is {im.width}×{im.height} pixels: more than 40 megapixels is refused "
                                         "(send a smaller image)")
                im.verify()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except UploadRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadRejected("The image is far larger than its file (a decompression bomb): it is refused") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise UploadRejected(f"The image is damaged or truncated ({type(e).__name__})") from None
    return Inspected(mime, len(data))


def _text(data: bytes) -> Inspected:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    bad = sum(1 for c in text[:100_000] if ord(c) < 32 and c not in "\t\r\n\f")
    if bad:
        raise UploadRejected("The text file holds control characters: it is not plain text")
    return Inspected(TEXT, len(data), _clean(text))


def _cda(data: bytes) -> Inspected:
    from parcours.services.records import cda

    try:
        doc = cda.parse(data)
    except cda.NotCda as e:
        raise UploadRejected(str(e)) from None
    return Inspected(CDA, len(data), _clean(doc.text), cda=doc.header)


def _clean(text: str) -> str:
    return " ".join(text.split())[:MAX_TEXT]  # str.split and the regex \s+ split on the same (Unicode) spaces


# -- malware scanning -------------------------------------------------------------------------------

class ClamdScanner:
    """ClamAV's daemon over its unix socket: ``zINSTREAM``, chunks (4-byte big-endian length +
    bytes), a zero-length chunk, then one reply such as ``stream: OK`` or
    ``stream: Eicar-Test-Signature FOUND``. An unreachable daemon refuses the upload (fail closed)."""

    CHUNK = 64 * 1024

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    async def scan(self, data: bytes) -> None:
        try:
            reply = await asyncio.wait_for(self._scan(data), self.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            raise ScannerUnavailable(f"The malware scanner cannot be reached ({type(e).__name__}): nothing was stored, "
                                     "try again later") from None
        if reply.endswith("FOUND"):
            signature = reply.split(":", 1)[-1].removesuffix("FOUND").strip()
            raise MalwareDetected(f"The malware scanner found {signature} in this file: it was not stored")
        if not reply.endswith("OK"):
            raise ScannerUnavailable(f"The malware scanner could not check the file ({reply[:200]}): nothing was stored")

    async def _scan(self, data: bytes) -> str:
        reader, writer = await asyncio.open_unix_connection(self.socket_path)
        try:
            writer.write(b"zINSTREAM\0")
            view = memoryview(data)
            for i in range(0, len(view), self.CHUNK):
                chunk = view[i:i + self.CHUNK]
                writer.write(struct.pack(">I", len(chunk)) + bytes(chunk))
                await writer.drain()
            writer.write(struct.pack(">I", 0))
            await writer.drain()
            reply = await reader.readuntil(b"\0")
            return reply.rstrip(b"\0").decode("utf-8", "replace").strip()
        finally:
            writer.close()


class NoScanner:
    async def scan(self, data: bytes) -> None:
        return None


def scanner_for(socket_path: str | None) -> ClamdScanner | NoScanner:
    return ClamdScanner(socket_path) if socket_path else NoScanner()


__all__ = ["ACCEPTED", "CDA", "ClamdScanner", "Inspected", "JPEG", "NoScanner", "PDF", "PNG", "TEXT", "inspect", "scanner_for",
           "sniff"]
