"""The commit side of the protocol (contract §4): commit, compensate, crash recovery.

execute.py     POST /intents/{id}/commit: reserve exactly once, call, store, replay;
               `execute_commit` for the approvals module to run an approved intent
compensate.py  POST /tasks/{task_id}/compensate: the saga's undo, in reverse order
onestatement.py the commit's database steps as one statement each (a read; on PostgreSQL
               the reservation and the record too), with execute.py's path as the fallback
upstream.py    the tool call itself and what its answer means
recovery.py    heartbeats; intents of a dead executor become `unknown`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Route

from gateway.commits.compensate import compensate
from gateway.commits.execute import commit, execute_commit, settled_response
from gateway.commits.recovery import Recovery

if TYPE_CHECKING:
    from gateway.state import Gateway

__all__ = ["Recovery", "execute_commit", "routes", "settled_response"]


def routes(gateway: Gateway) -> list[BaseRoute]:
    from gateway.app import bind

    return [
        Route("/intents/{intent_id}/commit", bind(gateway, commit), methods=["POST"]),
        Route("/tasks/{task_id}/compensate", bind(gateway, compensate), methods=["POST"]),
    ]
