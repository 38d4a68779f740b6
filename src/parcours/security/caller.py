"""Who is calling: the identity every Repository is created for."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Caller:
    """An authenticated principal.

    ``kind`` is ``system`` (automation with a system-scoped token), or a user role:
    ``patient``, ``practitioner``, ``staff``, ``admin``, ``proxy``.
    ``fhir_user`` is the FHIR resource the account is linked to (``Patient/1``).
    ``scopes`` are the granted SMART scopes.
    ``patient_context`` is the Patient a SMART app was launched for ("Patient/123"):
    ``patient/`` scopes reach that patient only. ``client_id`` is the SMART app
    acting for the user (None for first-party pages and operator tokens).
    """

    kind: str
    user_id: str | None = None
    fhir_user: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    display: str = ""
    address: str | None = None  # network address, for the audit trail
    patient_context: str | None = None
    client_id: str | None = None

    @property
    def is_system(self) -> bool:
        return self.kind in ("system", "platform")


SYSTEM = Caller(kind="system", display="Parcours", scopes=frozenset({"system/*.*"}))
# The platform itself (audit materializer...): the only caller that writes AuditEvents.
PLATFORM = Caller(kind="platform", user_id="parcours", display="Parcours", scopes=frozenset({"system/*.*"}))
