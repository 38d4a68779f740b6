"""Identifiers for resources."""

from __future__ import annotations

import re
import uuid

# FHIR R4 id datatype: [A-Za-z0-9\-\.]{1,64}
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def new_id() -> str:
    return str(uuid.uuid4())


def is_valid_id(value: str) -> bool:
    return bool(ID_RE.match(value))
