"""Schema upgrades when several gateway processes start at once on one database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

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
