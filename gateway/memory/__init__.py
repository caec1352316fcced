"""Versioned memory (contract §6): canonical state written only by commits.

names.py    what a namespace and a key are; checking a proposal's memory_writes and depends_on
store.py    reading canonical memory; freshness checks (409 stale-dependency)
commits.py  claiming keys when a commit reserves, writing them when it is recorded;
            the built-in `memory.set` tool, whose commit only writes memory
scratch.py  scratch/<task_id>: direct conditional writes, never canonical
http.py     GET routes, with `min_revision` read-after-write

`install` plugs memory into a gateway: the commit protocol's reserve and commit hooks,
and the goal store behind handoff envelopes' `goal_revision`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from gateway.state import Gateway


def install(gateway: Gateway) -> None:
    from gateway.memory.commits import apply_writes, claim_writes
    from gateway.memory.store import goal_revision

    gateway.reserve_hooks.append(claim_writes)
    gateway.commit_hooks.append(apply_writes)
    gateway.envelopes.goal_revision_of = partial(goal_revision, gateway.db)


def routes(gateway: Gateway) -> list[BaseRoute]:
    from gateway.app import bind
    from gateway.memory import http, scratch

    # Scratch first: `scratch` is a reserved namespace followed by the task id.
    return [
        Route("/memory/scratch/{task_id}/{key}", bind(gateway, http.get_scratch), methods=["GET"]),
        Route("/memory/scratch/{task_id}/{key}", bind(gateway, scratch.put), methods=["PUT"]),
        Route("/memory/scratch/{task_id}/{key}", bind(gateway, scratch.remove), methods=["DELETE"]),
        Route("/memory/{namespace}/{key}", bind(gateway, http.get_value), methods=["GET"]),
        Route("/memory/{namespace}/{key}/history", bind(gateway, http.get_history), methods=["GET"]),
    ]
