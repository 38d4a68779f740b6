"""The resource schema, generated from the search-parameter registry.

Each resource type gets three tables, so that no index grows to national volume
across all types at once:

* ``"<Type>"``: the current version, raw JSON text as written, and the index
  arrays (``tokens``, ``refs``, ``compartments``: GIN) plus full-text vectors;
* ``"<Type>_idx"``: one row per string/uri/date/number/quantity value, typed
  columns with btree indexes (prefix, range and order queries);
* ``"<Type>_history"``: every version.

``resource_log`` orders all changes (system history, ``_since``, subscriptions,
exports) and is the outbox that events are sent from after commit.
"""

from __future__ import annotations

from functools import cache

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, TSVECTOR

from parcours.fhir.registry import registry

metadata = MetaData()

TS_CONFIG = "parcours_fr"


class ResourceTables:
    __slots__ = ("main", "idx", "history")

    def __init__(self, main: Table, idx: Table, history: Table) -> None:
        self.main, self.idx, self.history = main, idx, history


def _make(rtype: str) -> ResourceTables:
    main = Table(
        rtype,
        metadata,
        Column("id", Text, primary_key=True),
        Column("version_id", Integer, nullable=False),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        Column("deleted", Boolean, nullable=False, server_default=text("false")),
        Column("content", Text),
        Column("tokens", ARRAY(Text), nullable=False, server_default=text("'{}'")),
        Column("refs", ARRAY(Text), nullable=False, server_default=text("'{}'")),
        Column("compartments", ARRAY(Text), nullable=False, server_default=text("'{}'")),
        Column("fts_text", TSVECTOR),
        Column("fts_content", TSVECTOR),
        Column("author", Text),  # added by revision 0006
    )
    Index(f"{rtype}_tokens_gin", main.c.tokens, postgresql_using="gin")
    Index(f"{rtype}_refs_gin", main.c.refs, postgresql_using="gin")
    Index(f"{rtype}_comp_gin", main.c.compartments, postgresql_using="gin")
    Index(f"{rtype}_lu", main.c.last_updated)
    Index(f"{rtype}_fts_text", main.c.fts_text, postgresql_using="gin")
    Index(f"{rtype}_fts_content", main.c.fts_content, postgresql_using="gin")
    idx = Table(
        f"{rtype}_idx",
        metadata,
        Column("resource_id", Text, nullable=False),
        Column("code", Text, nullable=False),
        Column("s", Text),
        Column("raw", Text),
        Column("lo", DateTime(timezone=True)),
        Column("hi", DateTime(timezone=True)),
        Column("nlo", Numeric),
        Column("nhi", Numeric),
        Column("sys", Text),
        Column("unit", Text),
    )
    Index(f"{rtype}_idx_rid", idx.c.resource_id)
    Index(f"{rtype}_idx_s", idx.c.code, idx.c.s,
          postgresql_ops={"s": "text_pattern_ops"}, postgresql_where=idx.c.s.isnot(None))
    Index(f"{rtype}_idx_raw", idx.c.code, idx.c.raw, postgresql_where=idx.c.raw.isnot(None))
    Index(f"{rtype}_idx_lo", idx.c.code, idx.c.lo, postgresql_where=idx.c.lo.isnot(None))
    Index(f"{rtype}_idx_hi", idx.c.code, idx.c.hi, postgresql_where=idx.c.hi.isnot(None))
    Index(f"{rtype}_idx_n", idx.c.code, idx.c.nlo, postgresql_where=idx.c.nlo.isnot(None))
    history = Table(
        f"{rtype}_history",
        metadata,
        Column("id", Text, primary_key=True),
        Column("version_id", Integer, primary_key=True),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        Column("deleted", Boolean, nullable=False, server_default=text("false")),
        Column("method", Text, nullable=False),
        Column("content", Text),
    )
    Index(f"{rtype}_history_lu", history.c.last_updated)
    return ResourceTables(main, idx, history)


resource_log = Table(
    "resource_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=True),
    Column("resource_type", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("method", Text, nullable=False),
)
Index("resource_log_lu", resource_log.c.last_updated)

# Platform secrets shared by every process and node (token signing key...).
platform_secret = Table(
    "platform_secret",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

_TABLES: dict[str, ResourceTables] = {t: _make(t) for t in registry().resource_types}


def tables(rtype: str) -> ResourceTables:
    return _TABLES[rtype]


@cache
def all_types() -> tuple[str, ...]:
    return tuple(_TABLES)


# Run before create_all: extensions and the French, accent-insensitive text
# search configuration used by _text/_content.
PRELUDE = [
    "CREATE EXTENSION IF NOT EXISTS unaccent",
    f"""DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_ts_config WHERE cfgname = '{TS_CONFIG}') THEN
            CREATE TEXT SEARCH CONFIGURATION {TS_CONFIG} (COPY = french);
            ALTER TEXT SEARCH CONFIGURATION {TS_CONFIG}
                ALTER MAPPING FOR hword, hword_part, word WITH unaccent, french_stem;
        END IF;
    END $$""",
]
