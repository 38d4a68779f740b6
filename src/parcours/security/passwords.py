"""Password hashing (Argon2id) and the password rules, as pure functions.

Hashing costs tens of milliseconds of CPU on purpose: callers on an event loop
run these in a worker thread.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# argon2-cffi's defaults are the RFC 9106 "low memory" profile of Argon2id
# (t=3, m=64 MiB, p=4); keeping them here makes a change of cost a one-line edit
# that ``needs_rehash`` then rolls out at each account's next sign-in.
_HASHER = PasswordHasher()
MAX_LENGTH = 1024  # bounds the work one sign-in attempt can cause

# Verified when an e-mail matches no account, so that both answers take the same time.
_DUMMY_HASH = _HASHER.hash("parcours: no such account")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _HASHER.check_needs_rehash(stored_hash)


def password_problems(password: str, *, min_length: int, email: str = "") -> list[str]:
    """Message keys of the rules a new password breaks (empty when it is acceptable).

    Length over composition, as the ANSSI and NIST guidance recommend; the e-mail
    itself is refused because it is the first thing an attacker tries.
    """
    problems: list[str] = []
    if len(password) < min_length:
        problems.append("password.too_short")
    if len(password) > MAX_LENGTH:
        problems.append("password.too_long")
    if email and password.strip().lower() in {email.lower(), email.split("@")[0].lower()}:
        problems.append("password.is_email")
    if password and len(set(password)) < 4:
        problems.append("password.too_simple")
    return problems
