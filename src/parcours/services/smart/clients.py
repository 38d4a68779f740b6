"""Client applications: registration rules and records (by administrators, page or CLI)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from psycopg import AsyncConnection

from parcours.core.errors import BadRequest, NotFound
from parcours.security import scopes
from parcours.services.platform import Platform
from parcours.store import oauth as store


@dataclass(frozen=True)
class NewClient:
    name: str
    client_type: str  # public | confidential | backend
    redirect_uris: list[str]
    scope: str
    jwks: dict | None = None
    jwks_url: str | None = None


def _secure_url(url: str, *, custom_schemes: bool) -> bool:
    parts = urlsplit(url)
    if parts.fragment:
        return False
    if parts.scheme == "https" and parts.netloc:
        return True
    if parts.scheme == "http":
        return parts.hostname in ("localhost", "127.0.0.1", "::1")
    # Native apps (RFC 8252): a private-use scheme such as "fr.example.app:/callback".
    return custom_schemes and "." in parts.scheme and parts.scheme not in ("javascript", "data", "file")


def check_new_client(new: NewClient) -> None:
    if not new.name.strip():
        raise BadRequest("A client needs a name")
    if new.client_type not in store.CLIENT_TYPES:
        raise BadRequest(f"Unknown client type {new.client_type!r}: one of {', '.join(store.CLIENT_TYPES)}")
    names = scopes.split(new.scope)
    if not names:
        raise BadRequest("A client needs at least one scope")
    bad = [s for s in names if not scopes.valid_registration_scope(s)]
    if bad:
        raise BadRequest(f"Not a supported scope: {', '.join(bad)}")
    system = [s for s in names if s.startswith("system/")]
    if new.client_type == "backend":
        if len(system) != len(names):
            raise BadRequest("A backend service is given system/ scopes only")
        if new.redirect_uris:
            raise BadRequest("A backend service has no redirect URI")
        if not (new.jwks or new.jwks_url):
            raise BadRequest("A backend service authenticates with its keys: give a JWKS (--jwks-file) or a JWKS URL")
    else:
        if system:
            raise BadRequest("system/ scopes are for backend services")
        if not new.redirect_uris:
            raise BadRequest("An app needs at least one redirect URI")
        for uri in new.redirect_uris:
            if not _secure_url(uri, custom_schemes=new.client_type == "public"):
                raise BadRequest(f"Redirect URI {uri!r} must be https (http only on this machine, no fragment)")
    if new.jwks_url and not _secure_url(new.jwks_url, custom_schemes=False):
        raise BadRequest("The JWKS URL must be https")
    if new.jwks is not None:
        try:
            keyset = KeySet.import_key_set(new.jwks)
        except (JoseError, ValueError, TypeError, KeyError) as e:
            raise BadRequest(f"The JWKS is not valid: {e}") from None
        if not keyset.keys:
            raise BadRequest("The JWKS holds no key")
        if any(k.is_private for k in keyset.keys):
            raise BadRequest("The JWKS must hold public keys only: never send a private key")


async def register_client(platform: Platform, conn: AsyncConnection, new: NewClient, *,
                          created_by: str | None) -> tuple[store.Client, str | None]:
    """A new client and its secret (confidential clients only; shown once, only its hash is kept)."""
    check_new_client(new)
    secret = secrets.token_urlsafe(32) if new.client_type == "confidential" else None
    jwks = None
    if new.jwks is not None:
        jwks = {"keys": [k.as_dict(private=False) for k in KeySet.import_key_set(new.jwks).keys]}
    client = await store.insert_client(
        conn, client_id=secrets.token_urlsafe(18), name=new.name.strip(), client_type=new.client_type, secret=secret,
        redirect_uris=list(dict.fromkeys(new.redirect_uris)), scope=" ".join(scopes.split(new.scope)), jwks=jwks,
        jwks_url=new.jwks_url, created_by=created_by, now=platform.clock.now())
    return client, secret


async def list_clients(conn: AsyncConnection) -> list[store.Client]:
    return await store.list_clients(conn)


async def set_client_active(platform: Platform, conn: AsyncConnection, client_id: str, active: bool) -> None:
    if not await store.set_client_status(conn, client_id, "active" if active else "disabled", platform.clock.now()):
        raise NotFound(f"No client {client_id}")

