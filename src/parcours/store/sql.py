"""SQLAlchemy Core statements compiled for psycopg, with a cache for fixed ones."""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.sql import ClauseElement

DIALECT = pg_psycopg.dialect()


def compile_stmt(stmt: ClauseElement) -> tuple[str, dict[str, Any]]:
    """Compile a statement to SQL text and bound parameters (pyformat)."""
    compiled = stmt.compile(dialect=DIALECT, compile_kwargs={"render_postcompile": True})
    return str(compiled), dict(compiled.params)


class Prepared:
    """A fixed statement compiled once; parameters are given at execution."""

    __slots__ = ("sql", "defaults")

    def __init__(self, stmt: ClauseElement) -> None:
        self.sql, self.defaults = compile_stmt(stmt)
