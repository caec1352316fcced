"""Reading memory over HTTP, with read-after-write.

    GET /memory/{namespace}/{key}?min_revision=N&wait=S   the current value, ETag "<revision>"
    GET /memory/{namespace}/{key}/history?after=R&limit=N revisions in order, with provenance
    GET /memory/scratch/{task_id}/{key}                   a scratch value (never canonical)

`min_revision` is read-after-write across replicas: a writer that learnt revision N
(from its commit's ledger entry, or an `if_revision` it set) asks any replica for at
least N. Without `wait` (or `wait=0`) a replica that cannot show N yet answers 409
`revision-not-reached`; with `wait=S` (at most MAX_WAIT seconds) it polls the shared
database until N is visible or the time is up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.memory import scratch, store
from gateway.memory.names import SCRATCH, address, valid_key, valid_namespace
from gateway.problems import BadRequest, Conflict, NotFound

if TYPE_CHECKING:
    from gateway.state import Gateway

MAX_WAIT = 30.0
MAX_HISTORY = 1000
_FIRST_POLL, _LONGEST_POLL = 0.02, 0.25


class RevisionNotReached(Conflict):
    name, title = "revision-not-reached", "The requested revision is not visible yet"


def _int(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _wait(request: Request) -> float:
    raw = request.query_params.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not math.isfinite(wait) or not 0 <= wait <= MAX_WAIT:
        raise BadRequest(f"wait must be a number of seconds from 0 to {MAX_WAIT:g}")
    return wait


def _canonical_address(request: Request) -> tuple[str, str]:
    namespace, key = request.path_params["namespace"], request.path_params["key"]
    if namespace == SCRATCH:
        raise NotFound("scratch keys are /memory/scratch/{task_id}/{key}, and have no history")
    if not valid_namespace(namespace) or not valid_key(key):
        raise NotFound(f"no memory key {namespace!r}/{key!r}")
    return namespace, key


async def _until(
    request: Request, label: str, fetch: Callable[[], Awaitable[tuple[int, dict[str, Any] | None]]]
) -> dict[str, Any]:
    """Fetch until the `min_revision` of the request is visible, or answer 409 / 404."""
    wanted = _int(request, "min_revision", None, 0, 2**31)
    deadline = time.monotonic() + _wait(request)
    pause = _FIRST_POLL
    while True:
        revision, view = await fetch()
        if wanted is None and view is None:
            raise NotFound(f"no memory key {label}")
        if wanted is None or revision >= wanted:
            if view is None:  # min_revision=0 on a key that does not exist yet
                raise NotFound(f"no memory key {label}")
            return view
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RevisionNotReached(
                f"{label} is at revision {revision}, not yet {wanted}",
                headers={"Retry-After": "1"},
                revision=revision,
                min_revision=wanted,
            )
        await asyncio.sleep(min(pause, remaining))
        pause = min(pause * 2, _LONGEST_POLL)


def _answer(view: dict[str, Any]) -> Response:
    headers = {"ETag": scratch.etag(view["revision"]), "Cache-Control": "no-cache"}
    return JSONResponse(view, headers=headers)


async def get_value(gateway: Gateway, request: Request) -> Response:
    await gateway.tokens.verify(request.headers.get("authorization"))
    namespace, key = _canonical_address(request)

    async def fetch() -> tuple[int, dict[str, Any] | None]:
        async with gateway.db.reading() as session:
            row = await store.current(session, namespace, key)
        return (row.revision, store.render(row)) if row is not None else (0, None)

    return _answer(await _until(request, address(namespace, key), fetch))


async def get_history(gateway: Gateway, request: Request) -> Response:
    await gateway.tokens.verify(request.headers.get("authorization"))
    namespace, key = _canonical_address(request)
    after = _int(request, "after", 0, 0, 2**31) or 0
    limit = _int(request, "limit", 100, 1, MAX_HISTORY) or 100
    async with gateway.db.reading() as session:
        rows = await store.history(session, namespace, key, after=after, limit=limit)
        if not rows and after == 0:
            raise NotFound(f"no memory key {address(namespace, key)}")
    revisions = [store.render(row) for row in rows]
    following = revisions[-1]["revision"] if len(revisions) == limit else None
    return JSONResponse(
        {"namespace": namespace, "key": key, "revisions": revisions, "next_after": following},
        headers={"Cache-Control": "no-cache"},
    )


async def get_scratch(gateway: Gateway, request: Request) -> Response:
    await gateway.tokens.verify(request.headers.get("authorization"))
    task_id, key = scratch.address_of(request)

    async def fetch() -> tuple[int, dict[str, Any] | None]:
        async with gateway.db.reading() as session:
            row = await scratch.read(session, task_id, key)
        if row is None or row.deleted:
            return (row.revision if row is not None else 0), None
        return row.revision, scratch.render(row)

    return _answer(await _until(request, address(scratch.namespace_of(task_id), key), fetch))
