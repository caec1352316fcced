"""`agent-gateway`: serve, keys, token, policy and the operator commands.

Every failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Literal

import click

from gateway.config import Config, ConfigError, load_config


def _config(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        raise click.ClickException(f"configuration error: {error}") from None


def _keys_dir(config: Config, override: str | None) -> Path:
    return Path(override) if override else config.path(config.gateway.keys_dir)


config_option = click.option(
    "--config", "config_path", envvar="AGENT_GATEWAY_CONFIG", help="TOML file (default gateway.toml)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """agent-gateway: a policy gateway between AI agents and their tools."""


@main.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--log-level", default="info", show_default=True)
def serve(config_path: str | None, host: str, port: int, log_level: str) -> None:
    """Run the gateway (embedded defaults when there is no configuration).

    SIGTERM drains: /readyz turns 503 at once, new connections are refused after
    [gateway] drain_seconds, in-flight calls and commits finish (see gateway/serving.py).
    """
    from gateway import serving
    from gateway.app import create_app

    config = _config(config_path)
    try:
        app = create_app(config)
    except ConfigError as error:
        raise click.ClickException(f"configuration error: {error}") from None
    if not serving.serve(app, host=host, port=port, log_level=log_level):
        sys.exit(3)


@main.group()
def keys() -> None:
    """Manage dev issuer, gateway and agent keys."""


@keys.command("init")
@config_option
@click.option("--dir", "keys_dir", help="Key folder (default: the configuration's keys_dir).")
@click.option("--agent", "agents", multiple=True, help="Agent ids to create keys for (repeatable).")
def keys_init(config_path: str | None, keys_dir: str | None, agents: tuple[str, ...]) -> None:
    """Create dev keys that do not exist yet (never overwrites)."""
    from gateway.keys import DEV_AGENTS, generate_dev_keys

    folder = _keys_dir(_config(config_path), keys_dir)
    created = generate_dev_keys(folder, agents or DEV_AGENTS)
    for path in created:
        click.echo(f"created {path}")
    if not created:
        click.echo(f"all keys already exist in {folder}")


@keys.command("rotate")
@config_option
@click.option("--dir", "keys_dir", help="Key folder (default: the configuration's keys_dir).")
def keys_rotate(config_path: str | None, keys_dir: str | None) -> None:
    """New issuer key; the old public key keeps verifying its tokens until they expire."""
    from gateway.keys import rotate_issuer_key

    folder = _keys_dir(_config(config_path), keys_dir)
    if not (folder / "issuer.key.pem").exists():
        raise click.ClickException(f"no issuer key in {folder}; run `agent-gateway keys init`")
    click.echo(f"new issuer kid {rotate_issuer_key(folder)}")


@main.command()
@config_option
@click.option("--role", required=True, help="planner, worker, verifier, committer, approver, ...")
@click.option("--sub", required=True, help="The agent id.")
@click.option("--ttl", default=900, show_default=True, type=click.IntRange(1, 86_400))
@click.option("--keys-dir", help="Key folder (default: the configuration's keys_dir).")
def token(config_path: str | None, role: str, sub: str, ttl: int, keys_dir: str | None) -> None:
    """Print a role JWT signed with the dev issuer key."""
    from gateway.identity import DEV_ISSUER, mint_role_token
    from gateway.keys import load_private_key

    config = _config(config_path)
    key_file = _keys_dir(config, keys_dir) / "issuer.key.pem"
    if not key_file.exists():
        raise click.ClickException(f"no dev issuer key at {key_file}; run `agent-gateway keys init`")
    click.echo(
        mint_role_token(
            load_private_key(key_file),
            iss=DEV_ISSUER,
            sub=sub,
            role=role,
            audience=config.gateway.audience,
            ttl=ttl,
        )
    )


@main.command()
@config_option
@click.option("--iss", required=True, help="The delegating agent (signs with keys/agents/<iss>.key.pem).")
@click.option("--sub", required=True, help="The receiving agent (the caller's role-JWT sub).")
@click.option("--task", "task_id", required=True, help="The task id.")
@click.option("--deadline", default=300, show_default=True, type=click.IntRange(1, 604_800), help="Seconds.")
@click.option("--goal-revision", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--expected-artifact", default="result", show_default=True, help="Type name of the result.")
@click.option("--parent", help="Causal parent: task or intent id (default: the task).")
@click.option("--schema-version", default="1", show_default=True)
@click.option("--precondition", "preconditions", multiple=True, help="A precondition (repeatable).")
@click.option("--keys-dir", help="Key folder (default: the configuration's keys_dir).")
def envelope(
    config_path: str | None,
    iss: str,
    sub: str,
    task_id: str,
    deadline: int,
    goal_revision: int,
    expected_artifact: str,
    parent: str | None,
    schema_version: str,
    preconditions: tuple[str, ...],
    keys_dir: str | None,
) -> None:
    """Print an Agent-Handoff envelope from agent ISS to agent SUB, signed with ISS's key."""
    from gateway.envelopes import AGENT_ID, mint_envelope
    from gateway.keys import KeyLoadError, load_private_key

    config = _config(config_path)
    if not AGENT_ID.match(iss):
        raise click.ClickException(f"agent id {iss!r} is not a plain name")
    key_file = _keys_dir(config, keys_dir) / "agents" / f"{iss}.key.pem"
    if not key_file.exists():
        raise click.ClickException(
            f"no key for agent {iss!r} at {key_file}; run `agent-gateway keys init --agent {iss}`"
        )
    try:
        key = load_private_key(key_file)
    except KeyLoadError as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        mint_envelope(
            key,
            iss=iss,
            sub=sub,
            task_id=task_id,
            audience=config.gateway.audience,
            deadline_seconds=deadline,
            schema_version=schema_version,
            preconditions=preconditions,
            expected_artifact=expected_artifact,
            parent=parent,
            goal_revision=goal_revision,
        )
    )


@main.group()
def policy() -> None:
    """Test and evaluate the Rego policies."""


@policy.command("test")
@config_option
@click.option("--dir", "policy_dir", help="Policy folder (default: the configuration's policy.dir).")
def policy_test(config_path: str | None, policy_dir: str | None) -> None:
    """Run the test_ rules of *_test.rego, like `opa test`."""
    from gateway.policy.testing import run_policy_tests

    config = _config(config_path)
    folder = Path(policy_dir) if policy_dir else config.path(config.policy.dir)
    results = run_policy_tests(folder)
    for result in results:
        line = f"{result.outcome}: {result.name}"
        click.echo(line + (f" ({result.message})" if result.message else ""))
    failed = [result for result in results if result.outcome != "PASS"]
    click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed or not results:
        sys.exit(1)


@policy.command("eval")
@config_option
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False))
@click.option("--dir", "policy_dir", help="Policy folder (default: the configuration's policy.dir).")
def policy_eval(config_path: str | None, input_path: str, policy_dir: str | None) -> None:
    """Evaluate data.gateway.decision for the input in FILE and print it."""
    from gateway.policy import PolicyError
    from gateway.policy.testing import evaluate_file

    config = _config(config_path)
    folder = Path(policy_dir) if policy_dir else config.path(config.policy.dir)
    try:
        result: Any = evaluate_file(folder, Path(input_path))
    except (OSError, ValueError, PolicyError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(result, indent=2, sort_keys=True))


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config(file: str) -> None:
    """Validate a configuration file and load what it names (keys, schemas, credentials,
    policies) without serving."""
    from gateway.preflight import check

    config = _config(file)
    try:
        lines = check(config)
    except ConfigError as error:
        raise click.ClickException(f"configuration error: {error}") from None
    click.echo(
        f"ok: {len(config.tools)} tools, {len(config.mcp_servers)} MCP servers, engine {config.policy.engine}"
    )
    for line in lines:
        click.echo(f"  {line}")


@main.command()
@config_option
@click.option("--jti", help="Revoke one token by its id.")
@click.option("--sub", help="Revoke every token of an agent.")
@click.option("--reason", default="", help="Why (stored with the revocation).")
def revoke(config_path: str | None, jti: str | None, sub: str | None, reason: str) -> None:
    """Revoke a role token (--jti) or an agent (--sub) in the shared database.

    Every replica reloads the revocation list twice a second, so all of them refuse
    the token within a second.
    """
    from gateway.identity import Revocations
    from gateway.storage import Database

    if (jti is None) == (sub is None):
        raise click.UsageError("give exactly one of --jti and --sub")
    kind: Literal["jti", "sub"] = "jti" if jti is not None else "sub"
    value = jti if jti is not None else sub
    if value is None or not value.strip():
        raise click.UsageError(f"--{kind} must not be empty")
    config = _config(config_path)

    async def run() -> None:
        db = Database(config.database_url)
        try:
            await Revocations(db).revoke(kind, value, reason)
        finally:
            await db.close()

    try:
        asyncio.run(run())
    except Exception as error:  # noqa: BLE001 - one line, never a traceback
        raise click.ClickException(f"revocation not stored: {type(error).__name__}: {error}") from None
    click.echo(f"revoked {kind} {value}")


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
def db_upgrade(config_path: str | None) -> None:
    """Apply Alembic migrations up to the newest schema."""
    from gateway.storage import upgrade_database

    config = _config(config_path)
    asyncio.run(upgrade_database(config.database_url))
    click.echo("database schema is up to date")


@main.group()
def ledger() -> None:
    """Verify and checkpoint the hash-chained ledger."""


def _signing_key_path(config: Config) -> Path:
    """The gateway key; the default name follows `keys_dir` when only that was configured."""
    from gateway.config import GatewaySection

    if config.gateway.signing_key == GatewaySection().signing_key:
        return config.path(config.gateway.keys_dir) / "gateway.key.pem"
    return config.path(config.gateway.signing_key)


def _gateway_public_keys(config: Config) -> list[Any]:
    from gateway.keys import KeyLoadError, load_public_key

    signing = _signing_key_path(config)
    candidates = {
        signing.with_name(signing.name.replace(".key.", ".pub.")),
        *signing.parent.glob("gateway*.pub.pem"),
    }
    found = []
    for path in sorted(candidates):
        try:
            found.append(load_public_key(path))
        except KeyLoadError:
            continue
    return found


@ledger.command("verify")
@config_option
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A checkpoint file written by `ledger checkpoint --out` (repeatable).",
)
def ledger_verify(config_path: str | None, checkpoint_files: tuple[str, ...]) -> None:
    """Recompute the chain and check checkpoints; exit 1 naming the first bad entry."""
    from gateway.ledger import load_checkpoint_file, verify
    from gateway.storage import Database

    config = _config(config_path)
    try:
        external = [load_checkpoint_file(Path(file)) for file in checkpoint_files]
    except (OSError, ValueError) as error:
        raise click.ClickException(str(error)) from None

    async def run() -> Any:
        db = Database(config.database_url)
        try:
            return await verify(db, _gateway_public_keys(config), external)
        finally:
            await db.close()

    report = asyncio.run(run())
    if not report.ok:
        click.echo(f"ledger BROKEN at seq {report.bad_seq}: {report.problem}", err=True)
        sys.exit(1)
    click.echo(f"ledger ok: {report.entries} entries, {report.checkpoints} checkpoints verified")


@ledger.command("checkpoint")
@config_option
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the checkpoint to this file.")
def ledger_checkpoint(config_path: str | None, out: str | None) -> None:
    """Sign the ledger head with the gateway key (Ed25519) and store the checkpoint."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from gateway.keys import KeyLoadError, load_private_key
    from gateway.ledger import LedgerError, write_checkpoint
    from gateway.storage import Database

    config = _config(config_path)
    try:
        key = load_private_key(_signing_key_path(config))
    except KeyLoadError as error:
        raise click.ClickException(str(error)) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise click.ClickException("the gateway signing key must be Ed25519")

    async def run() -> dict[str, Any]:
        db = Database(config.database_url)
        try:
            return await write_checkpoint(db, key)
        finally:
            await db.close()

    try:
        checkpoint = asyncio.run(run())
    except LedgerError as error:
        raise click.ClickException(str(error)) from None
    text = json.dumps(checkpoint, indent=2)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    click.echo(text)


@main.command()
@config_option
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(1, 65_535), help="The gateway's."
)
@click.option("--upstream-port", default=9001, show_default=True, type=click.IntRange(1, 65_535))
@click.option("--exit-after-story", is_flag=True, help="Stop after the story (non-interactive).")
def demo(config_path: str | None, port: int, upstream_port: int, exit_after_story: bool) -> None:
    """Run the demo tool upstream and the gateway, tell a scripted story, keep one commit pending.

    Then decide it on the approvals page (the sign-in token is printed) or with
    `agent-gateway approvals`.
    """
    from gateway.demo.run import run_demo

    if port == upstream_port:
        raise click.UsageError("--port and --upstream-port must differ")
    try:
        ok = run_demo(config_path, port, upstream_port, exit_after_story)
    except ConfigError as error:
        raise click.ClickException(f"configuration error: {error}") from None
    if not ok:
        sys.exit(1)


def _register() -> None:
    from gateway.approvals.cli import approvals
    from gateway.evals.cli import eval_command

    main.add_command(approvals)
    main.add_command(eval_command)


_register()

if __name__ == "__main__":
    main()
