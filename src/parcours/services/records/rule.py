"""The shared record's write rule: content links stay honest, content text stays searchable.

Registered on the platform, it runs in the transaction of every write of a
DocumentReference or DiagnosticReport, whatever the path (REST, Bundles, services):

* an attachment that points at the platform's content route must name content of the
  same patient, not yet presented by another DocumentReference: nobody gets to read
  another record's file by writing a resource that points at it (a DiagnosticReport may
  present its own document's content; downloads are checked on the content's owner);
* ``indexed_text`` gives the Repository the text extracted from the document's content
  (kept encrypted with the blob), so that a metadata update made through the FHIR API
  or a patient hiding the document keeps its ``_content`` search working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from parcours.core.errors import NotFound, Unprocessable
from parcours.core.settings import Settings
from parcours.store.blobs import BlobStore

if TYPE_CHECKING:
    from parcours.store.repository import Repository


def _urls(rtype: str, resource: dict) -> list[str]:
    if rtype == "DocumentReference":
        return [str((c.get("attachment") or {}).get("url") or "") for c in resource.get("content") or [] if isinstance(c, dict)]
    return [str(a.get("url") or "") for a in resource.get("presentedForm") or [] if isinstance(a, dict)]


class RecordRule:
    types = frozenset({"DocumentReference", "DiagnosticReport"})

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.blobs: BlobStore | None = None  # set by Platform.start

    def _blob_ids(self, rtype: str, resource: dict) -> list[str]:
        from parcours.services.records.documents import blob_id_of

        return [b for b in (blob_id_of(u, self.settings.base_url) for u in _urls(rtype, resource)) if b]

    async def before_write(self, repo: Repository, rtype: str, rid: str, resource: dict | None, previous: dict | None) -> None:
        if resource is None or self.blobs is None:
            return
        ids = self._blob_ids(rtype, resource)
        if not ids:
            return
        subject = (resource.get("subject") or {}).get("reference")
        me = f"{rtype}/{rid}"
        for bid in ids:
            try:
                info = await self.blobs.info(repo.conn, bid)
            except NotFound:
                raise Unprocessable(f"The attachment names content {bid} that does not exist") from None
            if info.patient != subject:
                raise Unprocessable("An attachment may only name content of the same patient's record")
            if rtype == "DiagnosticReport":
                continue  # a report may present its document's content; downloads check the document
            if info.owner not in (None, me):
                raise Unprocessable(f"Content {bid} belongs to {info.owner}; upload the file again to present it elsewhere")
            if info.owner is None:
                await self.blobs.set_owner(repo.conn, bid, me)

    async def indexed_text(self, repo: Repository, rtype: str, rid: str, resource: dict) -> str | None:
        if rtype != "DocumentReference" or self.blobs is None:
            return None
        parts = [t for t in [await self.blobs.text(repo.conn, b) for b in self._blob_ids(rtype, resource)] if t]
        return "\n".join(parts) or None
