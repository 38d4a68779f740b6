"""SQLAlchemy Core statements compiled for psycopg, with a cache keyed by statement shape."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.sql import ClauseElement

DIALECT = pg_psycopg.dialect()

# Searches are built afresh per request but have few shapes: SQLAlchemy's cache key
# separates a statement's structure from its bound values, so the SQL text of a shape
# is compiled once and its values are filled in per call (the compile step costs far
# more than the key). Statements whose text depends on their values (expanding IN)
# are compiled each time.
_CACHE: OrderedDict[Any, Any] = OrderedDict()
_CACHE_SIZE = 2000


def compile_stmt(stmt: ClauseElement) -> tuple[str, dict[str, Any]]:
    """Compile a statement to SQL text and bound parameters (pyformat)."""
    key = stmt._generate_cache_key()  # noqa: SLF001 - SQLAlchemy's public-in-practice cache key
    if key is not None:
        hit = _CACHE.get(key.key)
        if hit is None:
            compiled = DIALECT.statement_compiler(DIALECT, stmt, cache_key=key)
            if "POSTCOMPILE" in compiled.string:
                return _full(stmt)
            _CACHE[key.key] = hit = compiled
            if len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        # _check=False as Compiled.params: fixed statements bind their values at execution.
        params = hit.construct_params(extracted_parameters=key.bindparams, escape_names=False, _check=False)
        return hit.string, dict(params)
    return _full(stmt)


def _full(stmt: ClauseElement) -> tuple[str, dict[str, Any]]:
    compiled = stmt.compile(dialect=DIALECT, compile_kwargs={"render_postcompile": True})
    return str(compiled), dict(compiled.params)
