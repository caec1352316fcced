"""`agent-gateway check-config`: load everything serving would load, without serving.

Issuer and agent keys, tool input schemas, upstream credentials, the gateway signing
key (when a tool sends assertions), rate limits and the policies (compiled, in a
throwaway subprocess first, exactly as a reload would). Nothing is written and no
database or network connection is opened. The first problem is raised as a
ConfigError naming what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from gateway.config import Config, ConfigError


def check(config: Config) -> list[str]:
    """What was checked, one line each; ConfigError at the first problem."""
    from gateway.credentials import AssertionSigner, Credentials
    from gateway.envelopes import EnvelopeVerifier
    from gateway.identity import Revocations, TokenVerifier
    from gateway.ratelimits import build_rules
    from gateway.schemas import ToolSchemas

    keys_dir = config.path(config.gateway.keys_dir)
    TokenVerifier(
        config.issuers, config.gateway.audience, keys_dir, Revocations(None), base_dir=Path(config.base_dir)
    )
    EnvelopeVerifier(config, keys_dir)
    ToolSchemas(config)
    Credentials(config)
    signer = AssertionSigner(config)
    if signer.required:
        signer.load()
    rules = build_rules(config)
    lines = [
        f"{len(config.issuers) or 'dev'} issuer(s), {len(config.agents)} agent(s): keys load",
        f"{len(config.tools)} tool(s), {len(config.mcp_servers)} MCP server(s): schemas compile",
        f"{sum(tool.credential is not None for tool in config.tools)} upstream credential(s) readable"
        + (", gateway signing key loads" if signer.required else ""),
        f"{len(rules)} rate limit(s), counters in {config.rate_limit_storage.split('://')[0]}",
        check_policies(config),
    ]
    return lines


def check_policies(config: Config) -> str:
    if config.policy.engine == "opa":
        return f"engine opa: policies are served by {config.policy.opa_url} (not compiled here)"
    from gateway.policy import PolicyError, rego
    from gateway.policy.decision import DECISION_PATH

    folder = config.path(config.policy.dir)
    try:
        sources = rego.read_sources(folder)
        if "gateway" not in sources.packages().values():
            raise PolicyError(f"{folder}: no module declares `package gateway`")
        compiled = rego.compile_policy(sources, [DECISION_PATH], timeout=60.0)
    except (PolicyError, OSError) as error:
        # rego-cpp reports over many lines; the CLI prints one.
        raise ConfigError(f"policy: {' '.join(str(error).split())[:500]}") from None
    return f"policy {compiled.version} compiles ({len(sources.modules)} module(s) in {folder})"
