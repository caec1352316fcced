"""`agent-gateway demo --exit-after-story` as a user runs it: a process, free loopback ports, a fresh folder.

The story checks every step against the demo upstream's own record (`/_effects`) and
prints what it found; this test holds it to each of those outcomes.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import environment
from tests.servers import free_port

pytestmark = pytest.mark.slow
STEPS = 8


def gateway_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_story(output: str) -> str:
    """The approval id the story left pending, after checking every step succeeded."""
    assert output.count("✓") == STEPS and "✗" not in output, output
    assert "Every step went as expected." in output
    for expected in (
        "200 committed; upstream /_effects: 1 email.send call(s)",
        "the stored result, replayed",
        "refused: 401 envelope-signature-invalid",
        "refused: 403 forbidden",
        "202 pending_approval",
        "/ui/approvals",
    ):
        assert expected in output, output
    line = next(line for line in output.splitlines() if "agent-gateway approvals approve" in line)
    return line.split("approve ", 1)[1].split()[0]


def test_demo_exit_after_story(tmp_path: Path) -> None:
    port, upstream_port = free_port(), free_port()
    done = gateway_cli(
        "demo", "--port", str(port), "--upstream-port", str(upstream_port), "--exit-after-story", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    approval_id = check_story(done.stdout)
    assert approval_id.startswith("ap_")
    assert (tmp_path / "keys" / "issuer.key.pem").exists()
    # What the story left behind: the email committed once, the transfer waiting for a human.
    with contextlib.closing(sqlite3.connect(tmp_path / "var" / "gateway.db")) as db:
        intents = dict(db.execute("SELECT tool, status FROM intents").fetchall())
        approvals = db.execute("SELECT approval_id, status FROM approvals").fetchall()
        events = [row[0] for row in db.execute("SELECT event FROM ledger ORDER BY seq")]
    assert intents == {"email.send": "committed", "payments.transfer": "pending_approval"}
    assert approvals == [(approval_id, "pending")]
    assert events.count("committed") == 1 and events.count("approval_requested") == 1
    assert "Traceback" not in done.stderr
