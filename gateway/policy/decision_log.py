"""The decision log: one JSON line per decision, in OPA's decision-log shape.

    {"decision_id", "path", "input", "result", "timestamp", "labels",
     "metrics": {"timer_rego_query_eval_ns"}, "bundles", "masked"}

Secrets are masked before a line exists: credential headers and any key whose
name looks like a secret become "***", and their JSON pointers are listed in
`masked`, as OPA does for values replaced by its mask policy.

Lines are written by a background thread, so a slow disk delays the log, not
the request. The queue is bounded and blocks when full: an audit log that
silently drops decisions is worse than back-pressure. The file stays open
between batches and is reopened as soon as its path names another file (or
none), so log rotation needs no signal; a batch that cannot be written is
reported on the gateway's own log.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from gateway.policy.decision import DECISION_PATH, Decision

log = logging.getLogger("gateway.policy")

MASK = "***"
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "agent-handoff",
        "idempotency-key",
        "x-api-key",
        "x-auth-token",
    }
)
# How long the writer waits after a first line before writing the batch.
LINGER_SECONDS = 0.02
SECRET_KEY = re.compile(r"password|secret|token|api[_-]?key|authorization|credential", re.IGNORECASE)


def _pointer_part(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


@functools.lru_cache(maxsize=4096)
def _is_secret(key: str) -> bool:
    # Cached: the same few dozen key names come back in every decision.
    return key.lower() in SECRET_HEADERS or SECRET_KEY.search(key) is not None


def mask_secrets(value: Any, path: str, masked: list[str]) -> Any:
    """A copy of `value` with secret-named entries replaced; their pointers go to `masked`."""
    if isinstance(value, dict):
        copy: dict[str, Any] = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else str(key)
            if _is_secret(name):
                copy[key] = MASK
                masked.append(f"{path}/{_pointer_part(name)}")
            elif isinstance(item, dict | list):
                copy[key] = mask_secrets(item, f"{path}/{_pointer_part(name)}", masked)
            else:
                copy[key] = item
        return copy
    if isinstance(value, list):
        return [mask_secrets(item, f"{path}/{index}", masked) for index, item in enumerate(value)]
    return value


def rfc3339_nanos(epoch_ns: int) -> str:
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def _gateway_version() -> str:
    try:
        return metadata.version("agent-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


class _LogFile:
    """The log file, kept open between batches (one `stat` per batch instead of
    mkdir + open + fstat + ioctl + lseek + close: syscalls are what a busy gateway
    pays for). A rotated or deleted file is still picked up at the next batch:
    when the path no longer names the open file, it is reopened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def write(self, text: str) -> None:
        if self._fd is not None and self._moved():
            self.close()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            stat = os.fstat(self._fd)
            self._identity = (stat.st_dev, stat.st_ino)
        # One O_APPEND write per batch: replicas sharing the file never interleave lines.
        data = text.encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to the decision log ({written} of {len(data)} bytes)")

    def _moved(self) -> bool:
        try:
            stat = os.stat(self.path)
        except OSError:
            return True
        return (stat.st_dev, stat.st_ino) != self._identity

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._identity = None, None


class DecisionLog:
    def __init__(
        self,
        path: Path | None,
        *,
        instance_id: str | None = None,
        max_queue: int = 10_000,
        linger: float = LINGER_SECONDS,
    ) -> None:
        self.path = path
        self.linger = linger
        self.labels = {"id": instance_id or uuid.uuid4().hex[:12], "version": _gateway_version()}
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def entry(
        self,
        decision: Decision,
        input: dict[str, Any],
        *,
        labels: dict[str, Any] | None = None,
        eval_ns: int = 0,
    ) -> dict[str, Any]:
        masked: list[str] = []
        entry: dict[str, Any] = {
            "decision_id": decision.decision_id,
            "path": DECISION_PATH,
            "input": mask_secrets(input, "/input", masked),
            "timestamp": rfc3339_nanos(time.time_ns()),
            "labels": {**self.labels, **(labels or {})},
            "metrics": {"timer_rego_query_eval_ns": eval_ns},
            "bundles": {"policies": {"revision": decision.policy_version}},
        }
        if "result" in decision.raw:
            entry["result"] = decision.raw["result"]
        if "error" in decision.raw:
            entry["error"] = {"message": str(decision.raw["error"])}
        if masked:
            entry["masked"] = masked
        return entry

    def record(
        self,
        decision: Decision,
        input: dict[str, Any],
        *,
        labels: dict[str, Any] | None = None,
        eval_ns: int = 0,
    ) -> dict[str, Any]:
        """Queue one line for the writer thread; returns the entry as written."""
        entry = self.entry(decision, input, labels=labels, eval_ns=eval_ns)
        if self.path is not None:
            self._ensure_writer()
            self._queue.put(json.dumps(entry, separators=(",", ":"), default=str))
        return entry

    def _ensure_writer(self) -> None:
        with self._start_lock:
            if self._thread is None and self.path is not None:
                self._thread = threading.Thread(
                    target=self._write, args=(self.path,), name="decision-log", daemon=True
                )
                self._thread.start()

    def _write(self, path: Path) -> None:
        log_file = _LogFile(path)
        try:
            while True:
                line = self._queue.get()
                if line is not None and self.linger > 0:
                    # Let a batch gather: one wake-up and one write for many decisions,
                    # instead of a thread switch (and a GIL hand-off) per request.
                    time.sleep(self.linger)
                batch = [line]
                while line is not None and not self._queue.empty():
                    line = self._queue.get_nowait()
                    batch.append(line)
                try:
                    log_file.write("".join(item + "\n" for item in batch if item is not None))
                except OSError:
                    log.exception("decision log %s: %d lines lost", path, len(batch))
                    log_file.close()
                for _ in batch:
                    self._queue.task_done()
                if line is None:
                    return
        finally:
            log_file.close()

    def flush(self) -> None:
        """Wait until every queued line is on disk (for tests and shutdown)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10)
