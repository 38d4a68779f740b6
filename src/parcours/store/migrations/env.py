"""Alembic environment: runs on the connection handed in by parcours.store.migrate."""

from alembic import context

from parcours.store.schema import metadata

config = context.config
connection = config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
