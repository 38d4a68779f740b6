"""What an R4 Subscription asks for, checked: criteria, channel, payload, headers.

``check_subscription`` turns a stored Subscription into a ``SubscriptionSpec`` or
raises ``InvalidSubscription`` with a message fit for ``Subscription.error``.
Criteria are a search URL (``Observation?code=http://loinc.org|1234``) parsed by
the same ``SearchParser`` and compiled by the same ``Compiler`` as any search, so
a subscription matches exactly what the search would return.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from parcours.core.errors import ParcoursError
from parcours.fhir.datatypes import parse_date_range
from parcours.fhir.registry import RESULT_PARAMS
from parcours.fhir.search import SearchParser, SearchRequest
from parcours.store.search import Compiler

REST_HOOK, WEBSOCKET = "rest-hook", "websocket"
CHANNELS = (REST_HOOK, WEBSOCKET)
JSON_PAYLOADS = ("application/fhir+json", "application/json")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class InvalidSubscription(Exception):
    """The Subscription cannot be served; the message goes to ``Subscription.error``."""


@dataclass(frozen=True)
class Criteria:
    resource_type: str
    query: tuple[tuple[str, str], ...]
    request: SearchRequest


@dataclass(frozen=True)
class SubscriptionSpec:
    id: str
    version_id: int
    status: str  # requested | active | error | off
    criteria: Criteria
    channel: str  # rest-hook | websocket
    endpoint: str | None
    payload: str | None  # None: notification without body
    headers: tuple[tuple[str, str], ...]
    end: datetime | None

    def live(self, now: datetime) -> bool:
        """Whether changes are matched against it now."""
        return self.status in ("requested", "active") and (self.end is None or now < self.end)


def parse_criteria(criteria: Any, parser: SearchParser, base_url: str) -> Criteria:
    if not isinstance(criteria, str) or not criteria.strip():
        raise InvalidSubscription("Subscription.criteria is required: a search such as Observation?code=http://loinc.org|1234")
    rtype, _, query = criteria.strip().partition("?")
    if not parser.registry.is_type(rtype):
        raise InvalidSubscription(f"Subscription.criteria must start with a resource type, not {rtype!r}")
    items = parse_qsl(query, keep_blank_values=True)
    for key, _ in items:
        base = key.split(":")[0]
        if base in RESULT_PARAMS or base in ("_type", "_since"):
            raise InvalidSubscription(f"Subscription.criteria may only filter; {key!r} is not allowed")
    try:
        request = parser.parse(rtype, items, strict=True)
        # Compile once now, so that a criterion the compiler rejects (a modifier
        # it cannot serve...) is reported here and not at the first change.
        Compiler(base_url).where(rtype, request.filters)
    except ParcoursError as e:
        raise InvalidSubscription(f"Subscription.criteria is not a valid search: {e.message}") from None
    return Criteria(rtype, tuple(items), request)


def check_subscription(rid: str, version_id: int, resource: dict, parser: SearchParser, base_url: str) -> SubscriptionSpec:
    status = resource.get("status")
    channel = resource.get("channel") or {}
    ctype = channel.get("type")
    criteria = parse_criteria(resource.get("criteria"), parser, base_url)
    if ctype not in CHANNELS:
        raise InvalidSubscription(f"Channel type {ctype!r} is not supported by this server (supported: {', '.join(CHANNELS)})")
    endpoint = channel.get("endpoint")
    if ctype == REST_HOOK:
        parts = urlsplit(endpoint or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidSubscription(f"A rest-hook channel needs an http(s) endpoint, not {endpoint!r}")
    payload = channel.get("payload") or None
    if payload is not None and payload.split(";")[0].strip() not in JSON_PAYLOADS:
        raise InvalidSubscription(f"Payload {payload!r} is not supported: this server sends {' or '.join(JSON_PAYLOADS)}, or no payload")
    headers: list[tuple[str, str]] = []
    for h in channel.get("header") or []:
        name, sep, value = str(h).partition(":")
        if not sep or not _HEADER_NAME.match(name.strip()) or "\r" in value or "\n" in value:
            raise InvalidSubscription(f"Channel header {h!r} must look like 'Name: value'")
        headers.append((name.strip(), value.strip()))
    end = None
    if resource.get("end"):
        r = parse_date_range(str(resource["end"]))
        end = r[0] if r else None
    return SubscriptionSpec(rid, version_id, str(status), criteria, ctype, endpoint, payload, tuple(headers), end)
