"""What a memory address is, and what a proposal may ask of memory.

    canonical   /memory/{namespace}/{key}          namespace: one path segment
    goals       /memory/goals/{task_id}            a canonical namespace; key = the task
    scratch     /memory/scratch/{task_id}/{key}    never canonical, written directly

A namespace is one path segment (`[A-Za-z0-9][A-Za-z0-9_.-]*`); `scratch` is reserved
and is followed by the task id. A key is one path segment too: any text without `/`
or control characters. So every URL names exactly one key and `…/history` is never
mistaken for a key of another namespace.
"""

from __future__ import annotations

import re
from typing import Any

GOALS = "goals"
SCRATCH = "scratch"
MAX_WRITES = 64
MAX_DEPENDENCIES = 64
NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
WRITE_FIELDS = frozenset({"namespace", "key", "value", "if_revision"})
DEPENDENCY_FIELDS = frozenset({"namespace", "key", "revision"})


def valid_namespace(namespace: Any) -> bool:
    """A canonical namespace: one segment, not `scratch`."""
    return isinstance(namespace, str) and bool(NAMESPACE.match(namespace)) and namespace != SCRATCH


def valid_key(key: Any) -> bool:
    return (
        isinstance(key, str)
        and 0 < len(key) <= 255
        and "/" not in key
        and not _CONTROL.search(key)
        and key not in (".", "..")
    )


def address(namespace: str, key: str) -> str:
    """`<namespace>/<key>`: how policy input and problems name a key."""
    return f"{namespace}/{key}"


def _revision(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _where(namespace: Any, key: Any, task_id: str) -> str | None:
    if isinstance(namespace, str) and (namespace == SCRATCH or namespace.startswith(SCRATCH + "/")):
        return "scratch namespaces are never canonical: write them with PUT /memory/scratch/…"
    if not valid_namespace(namespace):
        return f"namespace {namespace!r} is not one path segment of [A-Za-z0-9_.-]"
    if not valid_key(key):
        return f"key {key!r} must be 1 to 255 characters without '/' or control characters"
    if namespace == GOALS and key != task_id:
        return f"an intent of task {task_id!r} may only write goals/{task_id}"
    return None


def write_errors(writes: Any, task_id: str) -> list[str]:
    """Everything wrong with a proposal's `memory_writes`; empty when it is usable."""
    if writes is None:
        return []
    if not isinstance(writes, list) or not 0 < len(writes) <= MAX_WRITES:
        return [f"memory_writes must be a list of 1 to {MAX_WRITES} {{namespace, key, value, if_revision?}}"]
    errors, seen = [], set()
    for index, write in enumerate(writes):
        if not isinstance(write, dict) or not {"namespace", "key", "value"} <= write.keys() <= WRITE_FIELDS:
            errors.append(f"memory_writes[{index}] must be {{namespace, key, value, if_revision?}}")
            continue
        problem = _where(write["namespace"], write["key"], task_id)
        if problem is None and "if_revision" in write and not _revision(write["if_revision"]):
            problem = "if_revision must be a non-negative integer (0: the key must not exist yet)"
        if problem is None and (write["namespace"], write["key"]) in seen:
            problem = "the same key is written twice"
        seen.add((write["namespace"], write["key"]))
        if problem:
            errors.append(f"memory_writes[{index}]: {problem}")
    return errors


def dependency_errors(depends_on: Any) -> list[str]:
    if depends_on is None:
        return []
    if not isinstance(depends_on, list) or len(depends_on) > MAX_DEPENDENCIES:
        return [f"depends_on must be a list of at most {MAX_DEPENDENCIES} {{namespace, key, revision}}"]
    errors = []
    for index, dependency in enumerate(depends_on):
        if not isinstance(dependency, dict) or dependency.keys() != DEPENDENCY_FIELDS:
            errors.append(f"depends_on[{index}] must be {{namespace, key, revision}}")
            continue
        # Any task's goal may be depended on: only writes are limited to the intent's own task.
        problem = _where(dependency["namespace"], dependency["key"], dependency["key"])
        if problem is None and not _revision(dependency["revision"]):
            problem = "revision must be a non-negative integer (0: the key does not exist)"
        if problem:
            errors.append(f"depends_on[{index}]: {problem}")
    return errors
