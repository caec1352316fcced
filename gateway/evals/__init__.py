"""Collision evals: adversarial scenarios run against a live gateway, scored from the outside.

Each suite (race, staleness, replay, escalation, compensation) drives real HTTP calls
and checks the outcome where it lands: the tool upstream's effect log and the
hash-chained ledger, not only the gateway's answers. `agent-gateway eval` wraps
`run_evals`.
"""

from gateway.evals.runner import EvalOptions, run_evals
from gateway.evals.scorecard import Scorecard

SUITES = ("race", "staleness", "replay", "escalation", "compensation")

__all__ = ["SUITES", "EvalOptions", "Scorecard", "run_evals"]
