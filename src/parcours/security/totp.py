"""Second factor: TOTP (RFC 6238) codes and single-use recovery codes, as pure functions."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

import pyotp

ISSUER = "Parcours"
STEP_S = 30
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I


def new_secret() -> str:
    return pyotp.random_base32(32)


def is_valid_secret(secret: str) -> bool:
    try:
        pyotp.TOTP(secret).at(0)
    except Exception:  # noqa: BLE001 - pyotp raises binascii/ValueError alike for bad base32
        return False
    return len(secret.rstrip("=")) >= 16


def provisioning_uri(secret: str, account_name: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=account_name, issuer_name=ISSUER)


def current_code(secret: str, at: datetime) -> str:
    return pyotp.TOTP(secret).at(at)


def matching_step(secret: str, code: str, at: datetime, *, drift_steps: int = 1) -> int | None:
    """The time step whose code equals ``code`` (within one step of clock drift), or None.

    The caller stores the step and refuses any code of the same or an earlier
    step, so an observed code cannot be replayed.
    """
    code = normalize_code(code)
    if len(code) != 6 or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    now_step = int(at.timestamp()) // STEP_S
    for step in range(now_step - drift_steps, now_step + drift_steps + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def normalize_code(code: str) -> str:
    return "".join(ch for ch in code if ch.isalnum()).upper()


def looks_like_totp(code: str) -> bool:
    c = normalize_code(code)
    return len(c) == 6 and c.isdigit()


def new_recovery_codes(n: int = RECOVERY_CODES) -> list[str]:
    """Codes of 12 symbols (60 bits), shown once as ``XXXX-XXXX-XXXX``."""
    out = []
    for _ in range(n):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(12))
        out.append(f"{raw[:4]}-{raw[4:8]}-{raw[8:]}")
    return out


def recovery_code_hash(account_id: str, code: str) -> str:
    """Codes carry 60 random bits, so a salted fast hash suffices: there is nothing to stretch."""
    return hashlib.sha256(f"parcours-recovery:{account_id}:{normalize_code(code)}".encode()).hexdigest()
