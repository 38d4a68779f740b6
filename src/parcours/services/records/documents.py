"""Documents of the shared record: add, version, hide, retract, erase, list, open.

A document is a ``DocumentReference`` written through the caller's Repository (so the
access policy and the audit trail apply) plus its content in the encrypted blob store.

Rules:

* **Who adds**: professionals for the patients they care for; patients (and proxies)
  in their own record. The Patient is read first through the caller's Repository, so
  a professional without a care relationship is refused before anything is stored.
* **Checks**: :func:`parcours.services.records.uploads.inspect` (real type, parses,
  no polyglot, no bomb, no active content), then the malware scanner.
* **Duplicates**: the same bytes (SHA-256) already in this patient's record as a
  current document the caller can read: that document is returned, flagged
  ``duplicate``, and nothing new is stored.
* **New versions**: ``replaces`` names the previous document; the new one carries
  ``relatesTo = replaces`` and the old one becomes ``superseded``. Both stay, with
  their FHIR history.
* **Hiding**: the patient hides a document from professionals with the ``masked``
  security label (``Repository.set_masked``); its author and the patient still see it.
* **Deletion**: a professional never deletes: the author marks their document
  ``entered-in-error`` (it stays in the record, shown as withdrawn, with its history).
  A patient may erase a document *they* added: the DocumentReference is deleted (a
  FHIR delete: an empty version, history kept) and its content destroyed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from parcours.core.errors import BadRequest, Conflict, Forbidden, Gone, NotFound, UploadRejected
from parcours.core.ids import new_id
from parcours.security.policy import CONFIDENTIALITY as CONF_SYSTEM
from parcours.services.platform import Platform
from parcours.services.records import codes, uploads
from parcours.store import records as record_store
from parcours.store.blobs import BlobInfo, BlobStore, new_blob_id
from parcours.store.repository import Repository, Stored

BINARY_PATH = "/api/record/binary/"


class Scanner(Protocol):
    async def scan(self, data: bytes) -> None: ...


@dataclass
class NewDocument:
    patient_id: str
    data: bytes
    filename: str | None = None
    type_code: str | None = None
    class_code: str | None = None
    title: str | None = None
    care_date: str | None = None  # date of care, YYYY-MM-DD (or a dateTime)
    practice_setting: str | None = None
    confidentiality: str = "N"
    organization: str | None = None  # "Organization/id" the author acts for
    replaces: str | None = None  # id of the DocumentReference this one replaces
    language: str = "fr"
    identifier: dict | None = None  # the sender's identifier of the document (lab messages)
    masked: bool = False  # hidden from professionals from the start (CI-SIS MASQUE_PS)


@dataclass
class Added:
    stored: Stored
    duplicate: bool = False
    superseded: str | None = None
    text_chars: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def resource(self) -> dict:
        return self.stored.resource()


def binary_url(platform: Platform, blob_id: str) -> str:
    return platform.settings.base_url.rstrip("/") + BINARY_PATH + blob_id


def content_path(url: str | None) -> str:
    """The path of our content route for an attachment URL ("" if it is not ours); pages link
    to the path, as they may be served under another host name than ``base_url``."""
    if not url or BINARY_PATH not in url:
        return ""
    return BINARY_PATH + url.rsplit("/", 1)[-1]


def blob_id_of(url: str | None, base_url: str) -> str | None:
    """The blob a URL of our binary route names (absolute or relative), else None."""
    if not url:
        return None
    for prefix in (base_url.rstrip("/") + BINARY_PATH, BINARY_PATH):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            return rest if rest.isalnum() else None
    return None


def blobs_of(platform: Platform) -> BlobStore:
    assert platform.blobs is not None, "the platform was started without its blob store"
    return platform.blobs


def _author_refs(repo: Repository) -> list[str]:
    c = repo.caller
    return [c.fhir_user] if c.fhir_user else []


def _date_of_care(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip()
    if len(v) == 10 and v[4] == "-" and v[7] == "-":
        return v
    if "T" in v and len(v) >= 19:
        return v
    raise BadRequest(f"The date of care must be a date such as 2026-03-14, got {value!r}")


def display_name(resource: dict) -> str:
    if resource.get("resourceType") == "Organization":
        return str(resource.get("name") or "")
    n = (resource.get("name") or [{}])[0]
    return " ".join([*(n.get("prefix") or []), *(n.get("given") or []), str(n.get("family") or "")]).strip()


async def _names(repo: Repository, refs: list[str]) -> dict[str, str]:
    """Display names of the author references (directory entries, or the patient themself)."""
    out: dict[str, str] = {}
    for ref in refs:
        rtype, _, rid = ref.partition("/")
        try:
            out[ref] = display_name((await repo.read(rtype, rid)).resource())
        except (Forbidden, NotFound, Gone):
            continue
    return out


def build_resource(platform: Platform, repo: Repository, new: NewDocument, checked: uploads.Inspected, blob: BlobInfo,
                   now: datetime, names: dict[str, str] | None = None) -> dict:
    names = names or {}
    lang = new.language if new.language in ("fr", "en") else "fr"
    cda = checked.cda
    type_code = new.type_code or (cda.get("type_code") if cda.get("type_system") == "2.16.840.1.113883.6.1" else None)
    if repo.caller.kind in ("patient", "proxy") and not type_code:
        type_code = codes.PATIENT_NOTE
    if not type_code:
        raise BadRequest("Say what kind of document this is (its type)")
    dtype = codes.TYPES.get(type_code)
    display = dtype.fr if dtype else (cda.get("type_display") or type_code)
    class_code = new.class_code or (dtype.class_code if dtype else None)
    conf = (new.confidentiality or cda.get("confidentiality") or "N").upper()
    if conf not in codes.CONFIDENTIALITY_LEVELS:
        raise BadRequest(f"Unknown confidentiality {conf!r}: N, R or V")
    title = (new.title or cda.get("title") or (display if new.type_code else None) or new.filename or display).strip()[:250]
    care = _date_of_care(new.care_date) or cda.get("care_date")
    setting = new.practice_setting or ((cda.get("practice_setting") or (None, None))[0])
    attachment: dict[str, Any] = {
        "contentType": checked.content_type, "language": lang, "url": binary_url(platform, blob.id), "size": blob.size,
        "hash": base64.b64encode(hashlib.sha1(new.data).digest()).decode(),  # R4: SHA-1, base64 (SHA-256 kept with the blob)
        "title": (new.filename or title)[:250], "creation": cda.get("created") or _iso(now),
    }
    content: dict[str, Any] = {"attachment": attachment}
    if checked.content_type in codes.FORMATS:
        code, disp = codes.FORMATS[checked.content_type]
        content["format"] = codes.coding(codes.FORMAT_SYSTEM, code, disp)
    authors = [{"reference": r, **({"display": names[r]} if names.get(r) else {})} for r in _author_refs(repo)]
    if new.organization:
        if not new.organization.startswith("Organization/"):
            raise BadRequest("The organization must be a reference such as Organization/123")
        authors.append({"reference": new.organization, **({"display": names[new.organization]} if names.get(new.organization) else {})})
    elif cda.get("author_org"):
        authors.append({"display": cda["author_org"]})
    if not authors and cda.get("author_name"):
        authors.append({"display": cda["author_name"]})
    res: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{new_id()}"},
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [codes.coding(codes.LOINC, type_code, display)], "text": display},
        "subject": {"reference": f"Patient/{new.patient_id}"},
        "date": _iso(now),
        "description": title,
        "securityLabel": [{"coding": [codes.coding(CONF_SYSTEM, conf, codes.CONFIDENTIALITY_LEVELS[conf][1])]}],
        "content": [content],
    }
    if class_code in codes.CLASSES:
        res["category"] = [{"coding": [codes.coding(codes.CLASS_SYSTEM, class_code, codes.CLASSES[class_code][0])]}]
    if authors:
        res["author"] = authors
    if cda.get("custodian"):
        res["custodian"] = {"display": cda["custodian"]}
    context: dict[str, Any] = {}
    if care:
        context["period"] = {"start": care}
    if setting:
        label = codes.PRACTICE_SETTINGS.get(setting, (setting, setting))[0]
        context["practiceSetting"] = {"coding": [codes.coding(codes.PRACTICE_SETTING_SYSTEM, setting, label)]}
    if context:
        res["context"] = context
    security = [codes.coding(CONF_SYSTEM, conf)] if conf in ("R", "V") else []
    if new.masked:
        from parcours.store.repository import MASKED

        security.append(codes.coding(MASKED[0], MASKED[1], "masked"))
    if security:
        res["meta"] = {"security": security}
    if new.identifier:
        res["identifier"] = [new.identifier]
    return res


def _iso(dt: datetime) -> str:
    from datetime import UTC

    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def check(platform: Platform, scanner: Scanner, data: bytes, filename: str | None) -> uploads.Inspected:
    """The upload checks and the malware scan (nothing touches the database)."""
    checked = await asyncio.to_thread(uploads.inspect, data, filename, max_bytes=platform.settings.record_max_upload_bytes)
    await scanner.scan(data)
    return checked


async def add(platform: Platform, repo: Repository, new: NewDocument, *, scanner: Scanner,
              checked: uploads.Inspected | None = None, notify: bool = True) -> Added:
    """Add a document to a patient's record (see the module's rules)."""
    repo.authorize("create", "DocumentReference")
    await repo.read("Patient", new.patient_id)  # the caller reaches this record at all (care relationship, own record)
    if checked is None:
        checked = await check(platform, scanner, new.data, new.filename)
    blobs = blobs_of(platform)
    patient = f"Patient/{new.patient_id}"
    sha = hashlib.sha256(new.data).hexdigest()
    for same in await blobs.same_content(repo.conn, patient, sha):
        if not same.owner or not same.owner.startswith("DocumentReference/"):
            continue
        try:
            existing = await repo.read("DocumentReference", same.owner.split("/", 1)[1])
        except (Forbidden, NotFound, Gone):
            continue  # one the caller may not see: theirs is stored beside it
        if existing.resource().get("status") == "current":
            return Added(existing, duplicate=True)
    previous: dict | None = None
    if new.replaces:
        prev = await repo.read("DocumentReference", new.replaces)
        previous = prev.resource()
        if (previous.get("subject") or {}).get("reference") != patient:
            raise BadRequest(f"DocumentReference/{new.replaces} is not in this patient's record")
        if previous.get("status") != "current":
            raise Conflict(f"DocumentReference/{new.replaces} is {previous.get('status')}: only a current document gets a new version")
    now = platform.clock.now()
    rid = new_id()
    blob = await blobs.put(repo.conn, patient=patient, data=new.data, content_type=checked.content_type, text=checked.text,
                           now=now, owner=f"DocumentReference/{rid}", blob_id=new_blob_id())
    names = await _names(repo, _author_refs(repo) + ([new.organization] if new.organization else []))
    resource = build_resource(platform, repo, new, checked, blob, now, names)
    if previous is not None:
        resource["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{new.replaces}"}}]
    result = await repo.create("DocumentReference", resource, rid=rid, extra_text=checked.text or None)
    if previous is not None:
        await repo.update("DocumentReference", new.replaces, {**previous, "status": "superseded"})  # type: ignore[arg-type]
    if notify and repo.caller.kind not in ("patient", "proxy"):
        await record_store.notice_add(repo.conn, patient, "document", f"DocumentReference/{rid}", now)
    return Added(result.stored, superseded=new.replaces, text_chars=len(checked.text))


async def set_hidden(repo: Repository, doc_id: str, hidden: bool) -> Stored:
    return (await repo.set_masked("DocumentReference", doc_id, hidden)).stored


def _is_author(repo: Repository, resource: dict) -> bool:
    me = repo.caller.fhir_user
    return bool(me) and any((a or {}).get("reference") == me for a in resource.get("author") or [])


async def retract(repo: Repository, doc_id: str) -> Stored:
    """A professional's correction: their document becomes ``entered-in-error`` (kept, shown as withdrawn)."""
    current = (await repo.read("DocumentReference", doc_id)).resource()
    if not repo.caller.is_system and not _is_author(repo, current):
        raise Forbidden("Only the author of a document marks it as entered in error")
    if current.get("status") == "entered-in-error":
        return await repo.read("DocumentReference", doc_id)
    return (await repo.update("DocumentReference", doc_id, {**current, "status": "entered-in-error"})).stored


async def erase(platform: Platform, repo: Repository, doc_id: str) -> list[str]:
    """A patient erases a document they added themselves; returns the blob ids to purge after commit."""
    if repo.caller.kind not in ("patient", "proxy"):
        raise Forbidden("Professionals do not delete documents: the author marks a wrong one as entered in error")
    current = (await repo.read("DocumentReference", doc_id)).resource()
    if not _is_author(repo, current):
        raise Forbidden("You can erase only the documents you added yourself; you can hide the others from professionals")
    base = platform.settings.base_url
    blob_ids = [b for b in (blob_id_of((c.get("attachment") or {}).get("url"), base) for c in current.get("content") or []) if b]
    await repo.delete("DocumentReference", doc_id)
    now = platform.clock.now()
    for bid in blob_ids:
        await blobs_of(platform).erase(repo.conn, bid, now)
    return blob_ids


@dataclass
class Content:
    info: BlobInfo
    data: bytes
    filename: str
    owner: Stored


async def open_content(platform: Platform, repo: Repository, blob_id: str) -> Content:
    """The content of a document, for a caller who may read the resource presenting it.
    Reading that resource goes through the Repository: the policy decides, the audit records."""
    blobs = blobs_of(platform)
    if not blob_id.isalnum():
        raise NotFound("No such content")
    info = await blobs.info(repo.conn, blob_id)
    if not info.owner or "/" not in info.owner:
        raise NotFound("No such content")
    rtype, rid = info.owner.split("/", 1)
    try:
        owner = await repo.read(rtype, rid)
    except Gone:
        raise Gone("The document holding this content was deleted") from None
    resource = owner.resource()
    attachments = [c.get("attachment") or {} for c in resource.get("content") or []] + list(resource.get("presentedForm") or [])
    match = [a for a in attachments if blob_id_of(a.get("url"), platform.settings.base_url) == blob_id]
    if not match:
        raise NotFound("No such content")
    data = await blobs.read(repo.conn, info)
    return Content(info, data, str(match[0].get("title") or f"document-{rid}"), owner)


async def list_documents(repo: Repository, patient_id: str, *, query: str | None = None, include_old: bool = False,
                         count: int = 200) -> list[dict]:
    """The patient's documents the caller may see, newest first; ``query`` searches their text."""
    items = [("subject", f"Patient/{patient_id}"), ("_sort", "-date"), ("_count", str(count))]
    if not include_old:
        items.append(("status", "current"))
    if query:
        items.append(("_content", query))
    res = await repo.search(repo.parse_search("DocumentReference", items))
    return [m.resource() for m in res.matches]


def hidden(resource: dict) -> bool:
    from parcours.store.repository import MASKED

    return any((s.get("system"), s.get("code")) == MASKED for s in (resource.get("meta") or {}).get("security") or [])


__all__ = ["Added", "Content", "NewDocument", "add", "blob_id_of", "binary_url", "check", "erase", "hidden", "list_documents",
           "open_content", "retract", "set_hidden", "UploadRejected"]
