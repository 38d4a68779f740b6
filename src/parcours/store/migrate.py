"""Apply the Alembic migrations (at start-up and by ``parcours migrate``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from parcours.store.db import sqlalchemy_url

_HERE = Path(__file__).parent
# Serialises concurrent start-ups (several workers, several nodes) on one database.
_LOCK_KEY = 0x70617263


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    return cfg


def upgrade(uri: str) -> None:
    engine = create_engine(sqlalchemy_url(uri))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            try:
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                # "heads": features developed side by side add revisions on separate
                # branches (each touching its own tables); all of them apply.
                command.upgrade(cfg, "heads")
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


def current(uri: str) -> str | None:
    engine = create_engine(sqlalchemy_url(uri))
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).fetchone()
            return row[0] if row else None
    finally:
        engine.dispose()
