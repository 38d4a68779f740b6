"""Secrets every process and node of one platform must share, kept in the database."""

from __future__ import annotations

import secrets

import psycopg

from parcours.store.schema import platform_secret
from parcours.store.sql import compile_stmt
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert


def get_or_create(uri: str, name: str, nbytes: int = 32) -> str:
    """The secret ``name``, created at random the first time (race-free)."""
    ins = insert(platform_secret).values(name=name, value=secrets.token_urlsafe(nbytes)).on_conflict_do_nothing()
    sel = select(platform_secret.c.value).where(platform_secret.c.name == name)
    with psycopg.connect(uri) as conn:
        sql, params = compile_stmt(ins)
        conn.execute(sql, params)
        sql, params = compile_stmt(sel)
        row = conn.execute(sql, params).fetchone()
        conn.commit()
    assert row is not None
    return str(row[0])
