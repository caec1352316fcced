"""Alembic environment: runs on the connection `gateway.storage.db` hands over."""

from alembic import context

from gateway.storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `agent-gateway db upgrade`")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
