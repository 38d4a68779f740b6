"""Where SMART apps find the authorization server: ``.well-known/smart-configuration`` and
OpenID Connect discovery (the same URLs are in the CapabilityStatement)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parcours.services.platform import Platform

AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
ASSERTION_ALGORITHMS = ["RS384", "ES384"]  # what SMART Backend Services require servers to support


@dataclass(frozen=True)
class Endpoints:
    base: str
    issuer: str  # OpenID Connect issuer = FHIR base
    authorize: str
    token: str
    revoke: str
    introspect: str
    jwks: str

    @classmethod
    def of(cls, platform: Platform) -> "Endpoints":
        base = platform.settings.base_url.rstrip("/")
        return cls(base, platform.settings.fhir_base, f"{base}/oauth/authorize", f"{base}/oauth/token",
                   f"{base}/oauth/revoke", f"{base}/oauth/introspect", f"{base}/oauth/jwks")


SCOPES_SUPPORTED = [
    "openid", "fhirUser", "profile", "launch/patient", "offline_access",
    "patient/*.cruds", "patient/*.rs", "user/*.cruds", "user/*.rs", "system/*.cruds", "system/*.rs",
    "patient/*.read", "patient/*.write", "patient/*.*", "user/*.read", "user/*.write", "user/*.*",
    "system/*.read", "system/*.write", "system/*.*",
]


def smart_configuration(platform: Platform) -> dict[str, Any]:
    """``.well-known/smart-configuration`` (SMART App Launch 2.x)."""
    e = Endpoints.of(platform)
    return {
        "issuer": e.issuer,
        "jwks_uri": e.jwks,
        "authorization_endpoint": e.authorize,
        "token_endpoint": e.token,
        "revocation_endpoint": e.revoke,
        "introspection_endpoint": e.introspect,
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": [
            "launch-standalone", "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
            "context-standalone-patient", "permission-offline", "permission-patient", "permission-user",
            "permission-v1", "permission-v2", "sso-openid-connect", "authorize-post",
        ],
    }


def openid_configuration(platform: Platform) -> dict[str, Any]:
    """OpenID Connect discovery for the id_tokens SMART apps receive."""
    e = Endpoints.of(platform)
    return {
        "issuer": e.issuer,
        "authorization_endpoint": e.authorize,
        "token_endpoint": e.token,
        "jwks_uri": e.jwks,
        "revocation_endpoint": e.revoke,
        "introspection_endpoint": e.introspect,
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "scopes_supported": ["openid", "fhirUser", "profile", "offline_access"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser", "name"],
        "code_challenge_methods_supported": ["S256"],
    }


