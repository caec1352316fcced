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

What it costs per decision is kept small (bench/bench_decision_log.py): the masking
walk copies only the dicts and lists that have a secret below them, and checks key
names only in dicts with a name it has not seen yet; the line is serialized once, on
the recording thread, by pydantic-core's `to_json` when that gives exactly the bytes
`json.dumps(entry, separators=(",", ":"), default=str)` gives (plain JSON types,
ASCII output, no float that the two spell differently), and by `json` otherwise;
the writer wakes once per batch, not once per decision.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
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


# Key names already seen not to be secret. A dict whose keys are all in here needs no
# per-key check: one C-level `issuperset` instead (the common case; bounded like the cache).
_PLAIN: set[str] = set()
_PLAIN_MAX = 4096
# Leaf types that `to_json` writes exactly as `json.dumps` does (floats: see `_exact_float`).
_SCALARS = frozenset({str, int, bool, type(None)})
_LARGEST = 1.7976931348623157e308


def _exact_float(value: float) -> bool:
    # pydantic-core writes 1e-5..1e-9 as 0.00001 / 1e-6 where repr has 1e-05 / 1e-06;
    # NaN and infinities are left to the standard library.
    return value == 0.0 or 1e-4 <= abs(value) <= _LARGEST


class _Walk:
    """State of one masking walk: the pointers masked so far, and whether every value met
    is of a type that the fast serializer writes byte for byte as `json.dumps` would."""

    __slots__ = ("masked", "exact")

    def __init__(self, masked: list[str]) -> None:
        self.masked = masked
        self.exact = True


# A JSON pointer under construction: the root string, or (parent, key or index). Pointers
# are only spelled out for masked values, so an unmasked subtree costs no string work.
_Path = str | tuple[Any, Any]


def _pointer(path: _Path) -> str:
    parts = []
    while type(path) is tuple:
        path, part = path
        parts.append(_pointer_part(part if type(part) is str else str(part)))
    parts.append(path)
    return "/".join(reversed(parts))


def _mask_dict(value: dict[Any, Any], path: _Path, walk: _Walk) -> dict[Any, Any]:
    if type(value) is dict and _PLAIN.issuperset(value):
        # No key can be secret here: only the nested containers need a look, and the
        # dict is copied only if something below it is masked.
        copy = None
        for key, item in value.items():
            kind = type(item)
            if kind in _SCALARS:
                continue
            if kind is dict:
                new = _mask_dict(item, (path, key), walk)
            elif kind is list:
                new = _mask_list(item, (path, key), walk)
            elif kind is float:
                if not (item == 0.0 or 1e-4 <= abs(item) <= _LARGEST):
                    walk.exact = False
                continue
            else:
                new = _mask_other(item, (path, key), walk)
            if new is not item:
                if copy is None:
                    copy = dict(value)
                copy[key] = new
        return value if copy is None else copy
    # Some key is new (or secret): check each one, and learn the names that are not secret.
    result: dict[Any, Any] = {}
    changed = type(value) is not dict  # a subclass is always copied into a plain dict
    for key, item in value.items():
        if type(key) is str:
            name = key
        else:
            name = str(key)
            walk.exact = False
        if _is_secret(name):
            result[key] = MASK
            walk.masked.append(_pointer((path, name)))
            changed = True
            continue
        if name is key:
            if len(_PLAIN) >= _PLAIN_MAX:
                _PLAIN.clear()
            _PLAIN.add(key)
        kind = type(item)
        if kind in _SCALARS:
            new = item
        elif kind is dict:
            new = _mask_dict(item, (path, name), walk)
        elif kind is list:
            new = _mask_list(item, (path, name), walk)
        else:
            new = _mask_other(item, (path, name), walk)
        result[key] = new
        if new is not item:
            changed = True
    return result if changed else value


def _mask_list(value: list[Any], path: _Path, walk: _Walk) -> list[Any]:
    copy = None
    for index, item in enumerate(value):
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is dict:
            new = _mask_dict(item, (path, index), walk)
        elif kind is list:
            new = _mask_list(item, (path, index), walk)
        elif kind is float:
            if not (item == 0.0 or 1e-4 <= abs(item) <= _LARGEST):
                walk.exact = False
            continue
        else:
            new = _mask_other(item, (path, index), walk)
        if new is not item:
            if copy is None:
                copy = list(value)
            copy[index] = new
    return value if copy is None else copy


def _mask_other(value: Any, path: _Path, walk: _Walk) -> Any:
    if type(value) is float:
        if not _exact_float(value):
            walk.exact = False
        return value
    walk.exact = False
    if isinstance(value, dict):
        return _mask_dict(value, path, walk)  # a subclass: always copied into a plain dict
    if isinstance(value, list):
        new = _mask_list(value, path, walk)
        return new if type(new) is list else list(new)
    return value


def _masked(value: Any, path: str, walk: _Walk) -> Any:
    kind = type(value)
    if kind is dict:
        return _mask_dict(value, path, walk)
    if kind is list:
        return _mask_list(value, path, walk)
    if kind in _SCALARS:
        return value
    return _mask_other(value, path, walk)


def mask_secrets(value: Any, path: str, masked: list[str]) -> Any:
    """`value` with secret-named entries replaced; their pointers go to `masked`.

    `value` itself is never modified: a dict or list with something masked below it is
    copied, and the parts without secrets are shared with `value` rather than copied."""
    return _masked(value, path, _Walk(masked))


def _exact(value: Any) -> bool:
    """Whether the fast serializer writes `value` exactly as `json.dumps` does."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _SCALARS and not _exact(item)):
                return False
        return True
    if kind is list:
        for item in value:
            if type(item) not in _SCALARS and not _exact(item):
                return False
        return True
    return kind is float and _exact_float(value)


# The standard serialization, and what every line must be byte for byte.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def _standard_json(value: Any) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def _fast_serializer() -> Callable[[Any], bytes] | None:
    """pydantic-core's `to_json` (Rust, about 4x faster here) if it writes what `json.dumps`
    writes, for the values `_exact` admits, once non-ASCII output and DEL are ruled out."""
    try:
        from pydantic_core import to_json
    except ImportError:  # pragma: no cover - pydantic (a dependency) brings it
        return None
    probe = {
        "ascii": "".join(chr(code) for code in range(127)),
        "int": [0, -1, 7, 2**53 + 1, 2**63, -(2**63) - 1, 2**70],
        "float": [0.0, -0.0, 1e-4, -2.5e-3, 0.1, 1.5, 100.0, 123456789.123, 1e15, 1e16, 1.5e17, 1e22, 1e300],
        "other": [True, False, None, [], {}, [{"": {'a"b\\c/d': [1, "x"]}}]],
    }
    try:
        same = to_json(probe) == _standard_json(probe)
    except Exception:  # any failure: keep the standard library
        return None
    return to_json if same else None


_TO_JSON = _fast_serializer()


def _serialize(entry: dict[str, Any], exact: bool) -> bytes:
    if exact and _TO_JSON is not None:
        try:
            data = _TO_JSON(entry)
        except Exception:  # e.g. a lone surrogate; the standard library says what it says
            data = b"\x7f"
        if data.isascii() and b"\x7f" not in data:
            return data
    return _standard_json(entry)


# The formatted second of the latest timestamp: one formatting per second, not per decision.
_second: tuple[int, str] = (-1, "")


def rfc3339_nanos(epoch_ns: int) -> str:
    global _second
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    second = _second
    if second[0] != seconds:
        second = _second = (seconds, datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{second[1]}.{nanos:09d}Z"


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

    def write(self, data: bytes) -> None:
        if self._fd is not None and self._moved():
            self.close()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            stat = os.fstat(self._fd)
            self._identity = (stat.st_dev, stat.st_ino)
        # One O_APPEND write per batch: replicas sharing the file never interleave lines.
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
        # The queue: serialized lines not yet taken by the writer, at most `max_queue` of
        # them (<= 0: no bound). A plain list under one lock rather than a `queue.Queue`:
        # the recording thread pays one lock and an append, and wakes the writer only
        # when it waits for a first line, not once per decision.
        self._max_queue = max_queue
        self._lock = threading.Lock()
        self._has_lines = threading.Condition(self._lock)
        self._has_room = threading.Condition(self._lock)
        self._has_written = threading.Condition(self._lock)
        self._pending: list[bytes] = []
        self._queued = 0  # lines queued so far
        self._done = 0  # lines written (or reported lost) so far
        self._writer_waits = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()

    def entry(
        self,
        decision: Decision,
        input: dict[str, Any],
        *,
        labels: dict[str, Any] | None = None,
        eval_ns: int = 0,
    ) -> dict[str, Any]:
        """The log entry of one decision. Parts of `input` without secrets are shared, not copied."""
        return self._entry(decision, input, labels, eval_ns)[0]

    def _entry(
        self, decision: Decision, input: dict[str, Any], labels: dict[str, Any] | None, eval_ns: int
    ) -> tuple[dict[str, Any], bool]:
        masked: list[str] = []
        walk = _Walk(masked)
        entry: dict[str, Any] = {
            "decision_id": decision.decision_id,
            "path": DECISION_PATH,
            "input": _masked(input, "/input", walk),
            "timestamp": rfc3339_nanos(time.time_ns()),
            "labels": {**self.labels, **labels} if labels else dict(self.labels),
            "metrics": {"timer_rego_query_eval_ns": eval_ns},
            "bundles": {"policies": {"revision": decision.policy_version}},
        }
        raw = decision.raw
        if "result" in raw:
            entry["result"] = raw["result"]
        if "error" in raw:
            entry["error"] = {"message": str(raw["error"])}
        if masked:
            entry["masked"] = masked
        exact = (
            walk.exact
            and type(decision.decision_id) is str
            and type(decision.policy_version) is str
            and type(eval_ns) is int
            and _exact(entry["labels"])
            and _exact(raw.get("result"))
        )
        return entry, exact

    def record(
        self,
        decision: Decision,
        input: dict[str, Any],
        *,
        labels: dict[str, Any] | None = None,
        eval_ns: int = 0,
    ) -> dict[str, Any]:
        """Queue one line for the writer thread; returns the entry as written.

        The line is serialized here, before `record` returns: the entry shares the parts
        of `input` without secrets, so what is logged is the input as it was decided on."""
        entry, exact = self._entry(decision, input, labels, eval_ns)
        if self.path is not None:
            line = _serialize(entry, exact)
            if self._thread is None:
                self._ensure_writer()
            with self._lock:
                while 0 < self._max_queue <= len(self._pending):
                    self._has_room.wait()  # back-pressure: never drop a decision
                self._pending.append(line)
                self._queued += 1
                if self._writer_waits:
                    self._writer_waits = False
                    self._has_lines.notify()
        return entry

    def _ensure_writer(self) -> None:
        with self._start_lock:
            if self._thread is None and self.path is not None:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._write, args=(self.path, self._stop), name="decision-log", daemon=True
                )
                self._thread.start()

    def _write(self, path: Path, stop: threading.Event) -> None:
        log_file = _LogFile(path)
        idle = True
        try:
            while True:
                if idle:
                    with self._lock:
                        while not self._pending and not stop.is_set():
                            self._writer_waits = True
                            self._has_lines.wait()
                        self._writer_waits = False
                stopping = stop.is_set()
                if not stopping and self.linger > 0:
                    # Let a batch gather: one wake-up and one write for many decisions,
                    # instead of a thread switch (and a GIL hand-off) per request.
                    time.sleep(self.linger)
                with self._lock:
                    batch, self._pending = self._pending, []
                    if batch:
                        self._has_room.notify_all()
                if batch:
                    try:
                        log_file.write(b"\n".join(batch) + b"\n")
                    except OSError:
                        log.exception("decision log %s: %d lines lost", path, len(batch))
                        log_file.close()
                    with self._lock:
                        self._done += len(batch)
                        self._has_written.notify_all()
                elif stopping:
                    return
                # Under steady load the next batch is gathered right away, without waiting
                # to be woken: one wake-up per batch. A linger with no line makes it idle.
                idle = not batch
        finally:
            log_file.close()

    def flush(self) -> None:
        """Wait until every line queued so far is on disk (for tests and shutdown)."""
        thread = self._thread
        if thread is not None:
            with self._lock:
                target = self._queued
                while self._done < target and thread.is_alive():
                    self._has_written.wait(timeout=1.0)

    def close(self) -> None:
        with self._start_lock:
            thread, self._thread = self._thread, None
            stop = self._stop
        if thread is not None:
            stop.set()
            with self._lock:
                self._has_lines.notify_all()
            thread.join(timeout=10)
