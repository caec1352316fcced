"""The demo's scripted story, told through `gateway.client` against a running gateway.

An orchestrator hands a task to the planner. The planner proposes an email, a verifier
accepts it, a committer commits it: the tool runs exactly once, and a replay returns
the stored result. A worker forges the planner's signature on a handoff, then tries
to push a verified transfer through itself: both refused. The committer commits the
transfer, and policy sends it to a human. Each step is checked against what the demo
tool upstream actually did (`/_effects`), so the story doubles as a smoke test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx

from gateway.client import Credentials, GatewayClient, GatewayProblem
from gateway.envelopes import mint_envelope
from gateway.keys import load_private_key

EMAIL = {"to": "ops@example.com", "subject": "Weekly report", "body": "All green this week."}
TRANSFER = {
    "from_account": "acme-operating",
    "to_account": "supplier-4711",
    "amount": 2500,
    "currency": "EUR",
    "memo": "invoice 2024-117",
}
ROLES = {"planner": "planner", "verifier": "verifier", "committer": "committer", "worker": "worker"}
ORCHESTRATOR = "orchestrator"  # the agent that hands the task to the planner (a dev agent key)
DEADLINE = 3600  # seconds: long enough for a human to get to the approvals page


@dataclass
class Outcome:
    ok: bool = True
    task_id: str = ""
    approval_id: str | None = None
    steps: list[tuple[str, bool]] = field(default_factory=list)


class StepFailed(Exception):
    pass


class Story:
    def __init__(
        self,
        gateway_url: str,
        upstream_url: str,
        keys_dir: Path,
        *,
        audience: str,
        echo: Callable[[str], None],
    ) -> None:
        self.url, self.upstream_url, self.keys_dir = gateway_url, upstream_url, keys_dir
        self.audience, self.echo = audience, echo
        self.task = f"demo-{uuid.uuid4().hex[:8]}"
        self.outcome = Outcome(task_id=self.task)
        self._clients: list[GatewayClient] = []
        self.credentials = {
            sub: Credentials.from_dev_keys(keys_dir, sub=sub, role=role, audience=audience, ttl=900)
            for sub, role in ROLES.items()
        }
        self.orchestrator = Credentials.from_dev_keys(
            keys_dir, sub=ORCHESTRATOR, role="planner", audience=audience
        )

    # --- telling ------------------------------------------------------------------

    def _step(self, actor: str, action: str, check: Callable[[], str]) -> None:
        number = len(self.outcome.steps) + 1
        label = click.style(f"{number:>2}", fg="bright_black")
        self.echo(f"{label}  {click.style(f'{actor:<10}', bold=True)} {action}")
        try:
            said = check()
            ok = True
        except (StepFailed, GatewayProblem, httpx.HTTPError) as error:
            said, ok = f"unexpected: {error}", False
        mark = click.style("✓", fg="green") if ok else click.style("✗", fg="red", bold=True)
        self.echo(f"    {mark} {said}")
        self.outcome.steps.append((action, ok))
        self.outcome.ok = self.outcome.ok and ok

    def effects(self) -> dict[str, Any]:
        return httpx.get(f"{self.upstream_url}/_effects", timeout=5.0).json()

    def _calls(self, tool: str) -> int:
        return int(self.effects()["calls"].get(tool, 0))

    def _expect_calls(self, tool: str, count: int) -> str:
        seen = self._calls(tool)
        if seen != count:
            raise StepFailed(f"the tool upstream saw {seen} {tool} call(s), expected {count}")
        return f"upstream /_effects: {seen} {tool} call(s)"

    def client(self, sub: str, *, envelope: str | None = None) -> GatewayClient:
        client = GatewayClient(self.url, token=self.credentials[sub], envelope=envelope)
        self._clients.append(client)
        return client

    def handoff(self, from_sub: str, to_sub: str, parent: str | None = None) -> str:
        source = self.orchestrator if from_sub == ORCHESTRATOR else self.credentials[from_sub]
        return source.handoff(to_sub, self.task, deadline_seconds=DEADLINE, parent=parent)

    # --- the story ------------------------------------------------------------------

    def run(self) -> Outcome:
        self.echo(click.style(f"Task {self.task}: the orchestrator hands it to the planner.", bold=True))
        try:
            email = self._low_risk_email()
            self._forged_handoff()
            if email is not None:
                self._high_risk_transfer()
        finally:
            for client in self._clients:
                client.close()
        return self.outcome

    def _low_risk_email(self) -> str | None:
        planner = self.client("planner", envelope=self.handoff(ORCHESTRATOR, "planner"))
        found: dict[str, Any] = {}

        def propose() -> str:
            intent = planner.propose(self.task, "email.send", EMAIL)
            found["intent_id"] = intent["intent_id"]
            return f"{intent['status']}: intent {intent['intent_id'][:16]}…"

        self._step("planner", f"proposes email.send to {EMAIL['to']}", propose)
        if "intent_id" not in found:
            return None
        intent_id = found["intent_id"]

        def verify() -> str:
            verifier = self.client("verifier", envelope=self.handoff("planner", "verifier", intent_id))
            return verifier.verify(intent_id, "accept", "recipient and wording look right")["status"]

        self._step("verifier", "checks the proposal and accepts it", verify)
        committer = self.client("committer", envelope=self.handoff("planner", "committer", intent_id))
        key = f"{self.task}-email"

        def commit() -> str:
            result = committer.commit(intent_id, idempotency_key=key)
            found["first"] = result.body
            if result.status_code != 200 or result.body.get("status") != "committed":
                raise StepFailed(f"answered {result.status_code} {result.body}")
            return f"200 committed; {self._expect_calls('email.send', 1)}"

        self._step("committer", f'commits it with Idempotency-Key "{key}"', commit)

        def replay() -> str:
            result = committer.commit(intent_id, idempotency_key=key)
            if result.body != found.get("first"):
                raise StepFailed("the replay differs from the stored result")
            return (
                f"the stored result, replayed ({result.body['result']['body']['id']}); "
                + self._expect_calls("email.send", 1)
            )

        self._step("committer", "retries the same commit (a network blip)", replay)
        return intent_id

    def _forged_handoff(self) -> None:
        def forge() -> str:
            # The worker signs with its own key but claims the planner sent the handoff.
            forged = mint_envelope(
                load_private_key(self.keys_dir / "agents" / "worker.key.pem"),
                iss="planner",
                sub="worker",
                task_id=self.task,
                audience=self.audience,
                deadline_seconds=DEADLINE,
            )
            try:
                self.client("worker", envelope=forged).propose(self.task, "payments.transfer", TRANSFER)
            except GatewayProblem as problem:
                return f"refused: {problem.status} {problem.problem}; " + self._expect_calls(
                    "payments.transfer", 0
                )
            raise StepFailed("the forged handoff was accepted")

        self._step("worker", "forges the planner's signature on a handoff", forge)

    def _high_risk_transfer(self) -> None:
        found: dict[str, Any] = {}

        def propose_and_verify() -> str:
            planner = self.client("planner", envelope=self.handoff(ORCHESTRATOR, "planner"))
            intent = planner.propose(self.task, "payments.transfer", TRANSFER)
            found["intent_id"] = intent_id = intent["intent_id"]
            verifier = self.client("verifier", envelope=self.handoff("planner", "verifier", intent_id))
            verdict = verifier.verify(intent_id, "accept", "payee and amount match invoice 2024-117")
            return f"{verdict['status']}: intent {intent_id[:16]}…"

        amount = f"{TRANSFER['amount']} {TRANSFER['currency']}"
        self._step(
            "planner", f"proposes payments.transfer of {amount}; the verifier accepts", propose_and_verify
        )
        if "intent_id" not in found:
            return
        intent_id = found["intent_id"]

        def escalate() -> str:
            worker = self.client("worker", envelope=self.handoff("planner", "worker", intent_id))
            try:
                worker.commit(intent_id, idempotency_key=f"{self.task}-worker")
            except GatewayProblem as problem:
                return f"refused: {problem.status} {problem.problem}; " + self._expect_calls(
                    "payments.transfer", 0
                )
            raise StepFailed("the worker's commit was accepted")

        self._step("worker", "tries to commit the transfer itself (escalation)", escalate)

        def commit() -> str:
            committer = self.client("committer", envelope=self.handoff("planner", "committer", intent_id))
            result = committer.commit(intent_id, idempotency_key=f"{self.task}-transfer")
            if not result.pending or result.approval_id is None:
                raise StepFailed(f"answered {result.status_code}, expected 202 pending_approval")
            self.outcome.approval_id = result.approval_id
            return f"202 pending_approval ({result.approval_id}); " + self._expect_calls(
                "payments.transfer", 0
            )

        self._step("committer", "commits the transfer: high risk, so policy asks a human", commit)
