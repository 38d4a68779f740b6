"""Access decisions: pure functions of the caller and what it asks for.

The Repository asks ``decide`` before every interaction; nothing else decides.
Scopes follow SMART App Launch v1 (``read``/``write``/``*``) and v2 (``cruds``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from parcours.security.caller import Caller

# interaction -> SMART v2 letter
ACTION_LETTER = {
    "create": "c",
    "read": "r",
    "vread": "r",
    "history": "r",
    "search": "s",
    "update": "u",
    "patch": "u",
    "delete": "d",
    "everything": "r",
    "export": "r",
}

_SCOPE_RE = re.compile(r"^(patient|user|system)/([A-Za-z*]+)\.(read|write|\*|[cruds]+)(\?.*)?$")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


def _scope_grants(scope: str, rtype: str, letter: str) -> str | None:
    """The context (patient/user/system) a scope grants the access in, or None."""
    m = _SCOPE_RE.match(scope)
    if not m:
        return None
    context, stype, perm, _query = m.groups()
    if stype != "*" and stype != rtype:
        return None
    if perm == "*":
        return context
    if perm == "read":
        return context if letter in "rs" else None
    if perm == "write":
        return context if letter in "cud" else None
    return context if letter in perm else None


def decide(caller: Caller, action: str, rtype: str) -> Decision:
    letter = ACTION_LETTER.get(action, "r")
    for scope in caller.scopes:
        if _scope_grants(scope, rtype, letter):
            return Decision(True, scope)
    return Decision(False, f"No granted scope allows {action} on {rtype}")
