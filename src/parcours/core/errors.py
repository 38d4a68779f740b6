"""One family of errors with stable machine codes, rendered once at each edge.

A code is ``PRC-`` followed by a number that never changes meaning; the web layer
renders an error as an OperationOutcome (FHIR) or JSON, the CLI as a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Issue:
    """One problem, shaped after OperationOutcome.issue."""

    code: str  # FHIR issue-type code: invalid, not-found, conflict, ...
    diagnostics: str
    severity: str = "error"
    expression: tuple[str, ...] = ()

    def to_fhir(self) -> dict:
        out: dict = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = list(self.expression)
        return out


@dataclass
class ParcoursError(Exception):
    """Base error. ``status`` is the HTTP status the edges use."""

    message: str
    issues: list[Issue] = field(default_factory=list)
    status: int = 400
    code: str = "PRC-1000"
    fhir_code: str = "processing"
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if not self.issues:
            self.issues = [Issue(self.fhir_code, f"{self.code}: {self.message}")]

    def __str__(self) -> str:  # pragma: no cover - trivial
        return f"{self.code}: {self.message}"


def _kind(name: str, status: int, code: str, fhir_code: str) -> type[ParcoursError]:
    def init(self: ParcoursError, message: str, issues: list[Issue] | None = None, **kw: object) -> None:
        ParcoursError.__init__(
            self, message, list(issues or []), status, code, fhir_code, dict(kw.get("headers") or {})  # type: ignore[arg-type]
        )

    return type(name, (ParcoursError,), {"__init__": init})


BadRequest = _kind("BadRequest", 400, "PRC-1400", "invalid")
MalformedJson = _kind("MalformedJson", 400, "PRC-1401", "structure")
InvalidSearch = _kind("InvalidSearch", 400, "PRC-1402", "invalid")
Unauthorized = _kind("Unauthorized", 401, "PRC-1410", "login")
Forbidden = _kind("Forbidden", 403, "PRC-1430", "forbidden")
NotFound = _kind("NotFound", 404, "PRC-1440", "not-found")
UnknownType = _kind("UnknownType", 404, "PRC-1441", "not-supported")
Gone = _kind("Gone", 410, "PRC-1442", "deleted")
MethodNotAllowed = _kind("MethodNotAllowed", 405, "PRC-1450", "not-supported")
NotAcceptable = _kind("NotAcceptable", 406, "PRC-1406", "not-supported")
Conflict = _kind("Conflict", 409, "PRC-1490", "conflict")
# Booking: the slot was taken by someone else first (the answer lists the next free ones).
SlotTaken = _kind("SlotTaken", 409, "PRC-1491", "conflict")
PreconditionFailed = _kind("PreconditionFailed", 412, "PRC-1412", "conflict")
MultipleMatches = _kind("MultipleMatches", 412, "PRC-1414", "multiple-matches")
TooLarge = _kind("TooLarge", 413, "PRC-1413", "too-costly")
UnsupportedMedia = _kind("UnsupportedMedia", 415, "PRC-1415", "not-supported")
Unprocessable = _kind("Unprocessable", 422, "PRC-1423", "processing")
# Booking: a rule of the practitioner forbids it (too late to cancel, slot for known patients only...).
BookingRuleViolation = _kind("BookingRuleViolation", 422, "PRC-1424", "business-rule")
# Shared record: an upload that is not what it claims, broken or hostile (not stored);
# one the malware scanner flagged; the scanner could not be reached (nothing stored: retry later).
UploadRejected = _kind("UploadRejected", 422, "PRC-1425", "invalid")
MalwareDetected = _kind("MalwareDetected", 422, "PRC-1426", "security")
ScannerUnavailable = _kind("ScannerUnavailable", 503, "PRC-1503", "transient")
NotImplementedFeature = _kind("NotImplementedFeature", 501, "PRC-1501", "not-supported")


class InvalidResource(ParcoursError):
    """A resource failed validation: 422 with one issue per problem."""

    def __init__(self, issues: list[Issue], message: str = "The resource is not valid") -> None:
        ParcoursError.__init__(self, message, issues, 422, "PRC-1422", "invalid", {})
