"""The shared record: documents, lab results, the patient timeline and summary.

* :mod:`.documents` — DocumentReference + encrypted content (``store.blobs``): add,
  versions, hiding, retraction, erasure, download; :mod:`.uploads` checks files and
  scans them; :mod:`.cda` reads CDA R2 documents; :mod:`.rule` keeps attachment links
  honest and content text searchable on every write.
* :mod:`.hl7v2`, :mod:`.labs`, :mod:`.mllp` — ORU^R01 lab results over MLLP and HTTP,
  mapped to DiagnosticReport + Observations, unmatched messages to a reconciliation queue.
* :mod:`.results` — results per analyte over time and their SVG trend charts.
* :mod:`.timeline` and :mod:`.summary` — the patient's timeline and printable summary.
* :mod:`.notices` — patients told of new documents and results (no clinical detail).

Every read and write goes through the caller's Repository: the access policy and the
audit trail apply to the record as to the FHIR API.
"""
