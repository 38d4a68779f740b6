"""Secure messaging between professionals, and between patients (or proxies) and their professionals.

* :mod:`.model` — conversations and messages as FHIR Communications (one place);
* :mod:`.rule` — the write rule: who may write to whom, numbering, notices (every path);
* :mod:`.service` — start, send, read, mark read, mute, search, file into the record;
* :mod:`.attachments` — files: sniffed type, size limits;
* :mod:`.hub` — real-time delivery from the change feed, catch-up, read receipts, presence;
* :mod:`.notify` — e-mail notices for people offline (no clinical content), retention.

See ``docs/messaging.md``.
"""
