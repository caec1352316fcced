"""Schema upgrades: the migrations build what the models describe, also when several
gateway processes start at once on one database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from gateway.storage import Database
from gateway.storage.models import INTENTS_IN_FLIGHT, TASK_KEYS_PENDING, Base
from tests.processes import environment

_CHILD = """
import asyncio, sys, time
from gateway.storage.db import upgrade_database
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
asyncio.run(upgrade_database(sys.argv[1]))
"""


def test_processes_starting_together_on_one_sqlite_file_all_migrate_it(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    start = time.time() + 4  # every child has imported the gateway by then, and they go together
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, str(start)],
            env=environment(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [child.communicate(timeout=60)[1] for child in children]
    assert [child.returncode for child in children] == [0, 0, 0, 0], "\n".join(errors)
    import sqlite3

    with sqlite3.connect(tmp_path / "gateway.db") as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert {"intents", "ledger", "idempotency_keys"} <= tables
    assert len(versions) == 1


async def test_the_migrated_schema_is_the_models(database: Database) -> None:
    """`scripts/regen-migration` output against the models, on SQLite and PostgreSQL.

    Alembic's comparison ignores partial-index predicates, so those are read back too."""
    async with database.engine.connect() as connection:
        differences = await connection.run_sync(
            lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
        )
        if database.dialect == "postgresql":
            query = "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'ix_%'"
        else:
            query = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND name LIKE 'ix_%'"
        indexes = dict((await connection.execute(text(query))).all())
    assert differences == []
    in_flight, pending = indexes["ix_intents_in_flight"], indexes["ix_idempotency_keys_task_pending"]
    if database.dialect == "postgresql":  # PostgreSQL prints the predicate its own way
        assert "'executing'" in in_flight and "'running'" in in_flight and " OR " in in_flight
        assert "'pending'" in pending and "intent_id IS NULL" in pending
    else:
        assert in_flight.endswith(f"WHERE {INTENTS_IN_FLIGHT}")
        assert pending.endswith(f"WHERE {TASK_KEYS_PENDING}")
