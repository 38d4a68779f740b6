"""Attachments of messages: what a file really is, before it is sent.

The sender's media type and file name are never trusted: the type is sniffed from the
bytes (``filetype``, then a plain-text rule), must be one messaging carries (PDF, JPEG,
PNG, WebP, HEIC photos, plain text) and must agree with the file name's extension
when there is one. Empty files and files over the size limit are refused. The checks
run on every write of a message (``rule.MessagingRule``), whatever the path: a FHIR
client posting a Communication with a disguised attachment is refused like a page.

The file travels in the message itself (``contentAttachment.data``): the access policy
of the message is the access policy of its files, through the pages and the FHIR API
alike; ``Settings.messaging_max_attachment_bytes`` keeps the message under the resource
size limit. Filing an attachment into the patient's record copies it into a document
of the shared record (``service.file_into_record``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from parcours.core.errors import TooLarge, UnsupportedMedia, Unprocessable, UploadRejected

PDF, JPEG, PNG, WEBP, HEIC, TEXT = "application/pdf", "image/jpeg", "image/png", "image/webp", "image/heic", "text/plain"
ACCEPTED = (PDF, JPEG, PNG, WEBP, HEIC, TEXT)
EXTENSIONS = {".pdf": PDF, ".jpg": JPEG, ".jpeg": JPEG, ".png": PNG, ".webp": WEBP, ".heic": HEIC, ".txt": TEXT}
MAX_PER_MESSAGE = 5
_CONTROL = re.compile(r"[\x00-\x1f\x7f/\\]")


@dataclass(frozen=True)
class Checked:
    content_type: str
    size: int
    title: str


def sniff(data: bytes) -> str:
    """The media type of ``data`` from its bytes alone."""
    import filetype

    if data.startswith(b"%PDF-"):
        return PDF
    kind = filetype.guess(data[:8192])
    if kind is not None:
        return str(kind.mime)
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<svg", b"<?xml")) or b"<script" in head[:1024]:
        return "text/html"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    if any(ord(ch) < 32 and ch not in "\t\r\n\f" for ch in text[:65536]):
        return "application/octet-stream"
    return TEXT


def clean_title(filename: str | None, content_type: str) -> str:
    name = _CONTROL.sub("", (filename or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1]).strip()[:200]
    if not name:
        ext = next((e for e, m in EXTENSIONS.items() if m == content_type), "")
        name = f"piece-jointe{ext}"
    return name


def inspect(data: bytes, filename: str | None, *, max_bytes: int) -> Checked:
    """Check one file; its real type, or a refusal (413 too large, 415 not carried, 422 empty)."""
    if not data:
        raise UploadRejected("The file is empty")
    if len(data) > max_bytes:
        raise TooLarge(f"The file is {len(data) // 1024} KiB; messages carry files up to {max_bytes // 1024} KiB")
    mime = sniff(data)
    if mime not in ACCEPTED:
        raise UnsupportedMedia(f"This file is {mime}: messages carry PDF documents, photos (JPEG, PNG, WebP, HEIC) and plain text")
    if filename and "." in filename.rsplit("/", 1)[-1]:
        ext = "." + filename.rsplit(".", 1)[-1].lower()
        expected = EXTENSIONS.get(ext)
        if expected is None:
            raise UnsupportedMedia(f"Files ending in {ext} are not carried: send PDF, JPEG, PNG, WebP, HEIC or text files")
        if expected != mime:
            raise UnsupportedMedia(f"The file is named {ext} but its content is {mime}: rename it or send the right file")
    return Checked(mime, len(data), clean_title(filename, mime))


def to_attachment(data: bytes, checked: Checked, created: str) -> dict:
    """The FHIR Attachment carrying the file (R4: ``hash`` is the base64 SHA-1)."""
    return {
        "contentType": checked.content_type, "data": base64.b64encode(data).decode(), "size": checked.size,
        "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(), "title": checked.title, "creation": created,
    }


def decode(attachment: dict) -> bytes:
    raw = attachment.get("data")
    if not isinstance(raw, str):
        raise Unprocessable("A message's attachment carries its file in data (no links to elsewhere)")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise Unprocessable("An attachment's data is not valid base64") from None


def check_attachment(attachment: dict, *, max_bytes: int) -> None:
    """An attachment as written in a Communication: its declared type must be its real one."""
    if attachment.get("url"):
        raise Unprocessable("A message's attachment carries its file in data (no links to elsewhere)")
    data = decode(attachment)
    checked = inspect(data, attachment.get("title") if isinstance(attachment.get("title"), str) else None, max_bytes=max_bytes)
    if attachment.get("contentType") != checked.content_type:
        raise UnsupportedMedia(f"The attachment says {attachment.get('contentType')!r} but its content is {checked.content_type}")
    if attachment.get("size") not in (None, checked.size):
        raise Unprocessable("The attachment's size does not match its data")


def without_data(attachment: dict) -> dict:
    """What pages and sockets show of an attachment (the file is fetched on its own)."""
    return {k: v for k, v in attachment.items() if k != "data"}
