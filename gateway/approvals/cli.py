"""`agent-gateway approvals list|show|approve|deny`: the approvals API from a terminal.

Talks HTTP to a running gateway (`--url`, default http://127.0.0.1:8080) as an
approver: `--token` / AGENT_GATEWAY_TOKEN, or `--as SUB` to mint a dev approver
token from the dev issuer key. Every failure is one line on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx

from gateway.config import ConfigError, load_config

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_URL = "http://127.0.0.1:8080"


def connection_options(command: F) -> F:
    options = [
        click.option(
            "--url", envvar="AGENT_GATEWAY_URL", default=DEFAULT_URL, show_default=True, help="The gateway."
        ),
        click.option("--token", envvar="AGENT_GATEWAY_TOKEN", help="An approver role JWT."),
        click.option("--as", "as_sub", metavar="SUB", help="Mint a dev approver token for SUB (dev keys)."),
        click.option(
            "--config", "config_path", envvar="AGENT_GATEWAY_CONFIG", help="For --as: keys and audience."
        ),
        click.option("--keys-dir", help="For --as: the dev key folder (default: the configuration's)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _token(token: str | None, as_sub: str | None, config_path: str | None, keys_dir: str | None) -> Any:
    if token and as_sub:
        raise click.UsageError("give --token or --as, not both")
    if token:
        return token.strip()
    if not as_sub:
        raise click.ClickException(
            "no approver token: pass --token (or set AGENT_GATEWAY_TOKEN), or --as SUB with dev keys"
        )
    try:
        config = load_config(config_path)
    except ConfigError as error:
        raise click.ClickException(f"configuration error: {error}") from None
    folder = Path(keys_dir) if keys_dir else config.path(config.gateway.keys_dir)
    if not (folder / "issuer.key.pem").exists():
        raise click.ClickException(f"no dev issuer key in {folder}; pass --keys-dir or --token")
    from gateway.client import Credentials
    from gateway.keys import KeyLoadError

    try:
        return Credentials.from_dev_keys(
            folder, sub=as_sub, role="approver", audience=config.gateway.audience
        )
    except KeyLoadError as error:
        raise click.ClickException(str(error)) from None


@contextmanager
def _client(
    url: str, token: str | None, as_sub: str | None, config_path: str | None, keys_dir: str | None
) -> Iterator[Any]:
    from gateway.client import GatewayClient, GatewayProblem

    credentials = _token(token, as_sub, config_path, keys_dir)
    try:
        with GatewayClient(url, token=credentials, timeout=httpx.Timeout(60.0, connect=5.0)) as client:
            yield client
    except GatewayProblem as problem:
        raise click.ClickException(str(problem)) from None
    except httpx.HTTPError as error:
        raise click.ClickException(
            f"cannot reach the gateway at {url}: {type(error).__name__}: {error}"
        ) from None


def _who(actor: Any) -> str:
    return (
        f"{actor.get('sub')} ({actor.get('role')})" if isinstance(actor, dict) and actor.get("sub") else "-"
    )


def _line(approval: dict[str, Any]) -> str:
    return (
        f"{approval['approval_id']}  {approval['status']:<8}  {approval['tool']:<22}  "
        f"{approval['approvals_given']}/{approval['approvals_required']} approvals  "
        f"expires {approval['expires_at']}  committer {_who(approval['requested_by'])}"
    )


def _describe(approval: dict[str, Any]) -> str:
    rows = [
        ("approval", approval["approval_id"]),
        ("status", approval["status"]),
        ("tool", approval["tool"]),
        ("intent", f"{approval['intent_id']} ({approval['intent_status']})"),
        ("task", approval["task_id"]),
        ("reasons", "; ".join(approval["reasons"]) or "-"),
        ("approvals", f"{approval['approvals_given']} of {approval['approvals_required']}"),
        ("proposer", _who(approval["proposer"])),
        ("verifier", _who(approval["verifier"])),
        ("committer", _who(approval["requested_by"])),
        ("expires", approval["expires_at"]),
    ]
    lines = [f"{name:>10}  {value}" for name, value in rows]
    lines += [
        f"{'decision':>10}  {d['approver']}: {d['decision']} {json.dumps(d['reason'])}"
        for d in approval["decisions"]
    ]
    lines.append(
        f"{'arguments':>10}  " + json.dumps(approval["arguments"], indent=2).replace("\n", "\n" + " " * 12)
    )
    if approval.get("result") is not None:
        lines.append(
            f"{'result':>10}  " + json.dumps(approval["result"], indent=2).replace("\n", "\n" + " " * 12)
        )
    return "\n".join(lines)


@click.group("approvals")
def approvals() -> None:
    """List, inspect, approve and deny commits waiting for a human (over HTTP)."""


@approvals.command("list")
@connection_options
@click.option(
    "--status",
    type=click.Choice(["pending", "approved", "denied", "expired", "all"]),
    default="pending",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def list_command(status: str, as_json: bool, **connection: Any) -> None:
    """List approvals, newest first."""
    with _client(**connection) as client:
        found = client.approvals(status)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for approval in found:
        click.echo(_line(approval))
    if not found:
        click.echo(f"no {status if status != 'all' else ''} approvals".replace("  ", " "))


@approvals.command("show")
@click.argument("approval_id")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def show_command(approval_id: str, as_json: bool, **connection: Any) -> None:
    """Show one approval: intent, arguments, reasons, decisions."""
    with _client(**connection) as client:
        approval = client.approval(approval_id)
    click.echo(json.dumps(approval, indent=2) if as_json else _describe(approval))


def _decide(decision: str, approval_id: str, reason: str, connection: dict[str, Any]) -> None:
    with _client(**connection) as client:
        approval = client.decide_approval(approval_id, decision, reason)
    outcome = approval["status"]
    if outcome == "pending":
        waiting = approval["approvals_required"] - approval["approvals_given"]
        click.echo(f"{approval_id}: recorded; waiting for {waiting} more approver(s)")
    elif outcome == "approved":
        click.echo(f"{approval_id}: approved; intent {approval['intent_id']} is {approval['intent_status']}")
    else:
        click.echo(f"{approval_id}: {outcome}")


@approvals.command("approve")
@click.argument("approval_id")
@click.option("--reason", "-r", default="", help="Why (recorded in the ledger).")
@connection_options
def approve_command(approval_id: str, reason: str, **connection: Any) -> None:
    """Approve; the final approval runs the commit once."""
    _decide("approve", approval_id, reason, connection)


@approvals.command("deny")
@click.argument("approval_id")
@click.option("--reason", "-r", required=True, help="Why (required; recorded in the ledger).")
@connection_options
def deny_command(approval_id: str, reason: str, **connection: Any) -> None:
    """Deny; a denial is final and the commit never runs."""
    _decide("deny", approval_id, reason, connection)
