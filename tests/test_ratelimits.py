"""Rate limits and quotas (`[[limits]]`): configuration, the limiter, and both call paths."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from gateway.problems import RateLimited
from gateway.ratelimits import RateLimiter, RateLimitUnavailable, build_rules, tightest
from tests.conftest import gateway_config, role_token
from tests.protocol import Agents, commit_config, new_task, propose_and_verify

PROBLEMS = "https://agent-gateway.dev/problems/"


def limiter(*limits: dict[str, Any], **rate_limits: Any) -> RateLimiter:
    return RateLimiter(parse_config({"limits": list(limits), "rate_limits": rate_limits}))


# --- configuration ------------------------------------------------------------------


def test_limits_parse_with_defaults() -> None:
    config = parse_config(
        {
            "limits": [
                {"name": "worker-email", "match": {"role": "worker", "tool": "email.*"}, "rate": "30/minute"},
                {"match": {"sub": "agent-7"}, "rate": "1000 per day", "per": ["sub", "tool"]},
            ]
        }
    )
    first, second = build_rules(config)
    assert (first.name, first.item.amount, first.window, first.per) == ("worker-email", 30, 60, ("sub",))
    assert (first.role, first.tool, first.sub) == ("worker", "email.*", None)
    assert (second.name, second.item.amount, second.window) == ("limit-2", 1000, 86_400)
    assert second.per == ("sub", "tool")
    assert config.rate_limit_storage == "memory://"
    assert config.rate_limits.strategy == "fixed-window"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"limits": [{"rate": "thirty a minute"}]}, "limits.0.rate: .*not a rate"),
        ({"limits": [{"rate": "1/second;10/minute"}]}, "limits.0.rate: .*one rate per"),
        ({"limits": [{"match": {"role": "w"}}]}, "limits.0.rate: Field required"),
        ({"limits": [{"rate": "1/second", "per": ["ip"]}]}, "limits.0.per.0"),
        ({"limits": [{"rate": "1/second", "match": {"group": "x"}}]}, "unknown key 'limits.0.match.group'"),
        ({"limits": [{"rate": "1/second", "name": 'a"b'}]}, "limits.0.name"),
        (
            {"limits": [{"name": "x", "rate": "1/second"}, {"name": "x", "rate": "2/second"}]},
            "duplicate limit name 'x'",
        ),
        ({"rate_limits": {"storage": "memcached://127.0.0.1"}}, "rate_limits.storage"),
        ({"rate_limits": {"strategy": "token-bucket"}}, "rate_limits.strategy"),
        ({"rate_limits": {"timeout": 0}}, "rate_limits.timeout"),
        ({"gateway": {"redis_url": "127.0.0.1:6379"}}, "gateway.redis_url: .*redis://"),
    ],
)
def test_bad_limit_configuration_is_one_config_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert re.search(message, str(raised.value)), str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("data", "storage"),
    [
        ({}, "memory://"),
        ({"rate_limits": {"storage": "memory"}}, "memory://"),
        ({"gateway": {"redis_url": "redis://127.0.0.1:6379/0"}}, "async+redis://127.0.0.1:6379/0"),
        (
            {"gateway": {"redis_url": "redis://a:6379"}, "rate_limits": {"storage": "memory"}},
            "memory://",
        ),
        ({"rate_limits": {"storage": "rediss://cache:6380"}}, "async+rediss://cache:6380"),
        ({"rate_limits": {"storage": "async+redis://cache"}}, "async+redis://cache"),
    ],
)
def test_storage_follows_redis_url_unless_set(data: dict[str, Any], storage: str) -> None:
    assert parse_config(data).rate_limit_storage == storage


@pytest.mark.parametrize(
    ("match", "call", "matches"),
    [
        ({}, ("a", "worker", "docs.search"), True),
        ({"role": "worker"}, ("a", "worker", "docs.search"), True),
        ({"role": "worker"}, ("a", "planner", "docs.search"), False),
        ({"tool": "email.*"}, ("a", "worker", "email.send"), True),
        ({"tool": "email.*"}, ("a", "worker", "emailx.send"), False),
        ({"tool": "mcp:docs/*"}, ("a", "worker", "mcp:docs/search"), True),
        ({"tool": "docs.search"}, ("a", "worker", "docs.searcher"), False),
        ({"sub": "agent-1", "role": "worker"}, ("agent-1", "worker", "x"), True),
        ({"sub": "agent-1", "role": "worker"}, ("agent-2", "worker", "x"), False),
        ({"sub": "agent-*"}, ("agent-2", "worker", "x"), False),  # sub and role match exactly
    ],
)
def test_rule_matching(match: dict[str, str], call: tuple[str, str, str], matches: bool) -> None:
    (rule,) = limiter({"match": match, "rate": "1/second"}).rules
    assert rule.matches(*call) is matches


# --- the in-memory limiter ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window"])
async def test_memory_limiter_allows_n_then_refuses_with_headers(strategy: str) -> None:
    limits = limiter({"name": "w", "match": {"role": "worker"}, "rate": "3/minute"}, strategy=strategy)
    remaining = [(await limits.count("a", "worker", "t"))[0].remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    with pytest.raises(RateLimited) as raised:
        await limits.count("a", "worker", "t")
    error = raised.value
    assert error.status == 429 and error.name == "rate-limited"
    assert 1 <= int(error.headers["Retry-After"]) <= 60
    assert error.headers["RateLimit-Policy"] == '"w";q=3;w=60'
    assert re.fullmatch(r'"w";r=0;t=(\d+)', error.headers["RateLimit"])
    assert error.extra["limit"] == "w"
    # Other agents have their own budget; other roles are not limited at all.
    assert (await limits.count("b", "worker", "t"))[0].remaining == 2
    assert await limits.count("a", "planner", "t") == []
    await limits.stop()


async def test_per_chooses_who_shares_a_counter() -> None:
    limits = limiter(
        {"name": "shared", "rate": "2/minute", "per": []},
        {"name": "per-tool", "rate": "10/minute", "per": ["sub", "tool"]},
        strategy="moving-window",  # which also says when capacity frees up
    )
    await limits.count("a", "worker", "t1")
    usages = await limits.count("b", "planner", "t2")
    assert [(usage.rule.name, usage.remaining) for usage in usages] == [("shared", 0), ("per-tool", 9)]
    assert tightest(usages) == {"name": "shared", "limit": 2, "remaining": 0, "window": 60, "reset": 60}
    with pytest.raises(RateLimited) as raised:
        await limits.count("c", "worker", "t3")
    assert raised.value.headers["RateLimit-Policy"] == '"shared";q=2;w=60, "per-tool";q=10;w=60'
    await limits.stop()


async def test_unmatched_calls_cost_nothing() -> None:
    limits = limiter({"match": {"tool": "email.*"}, "rate": "1/minute"})
    for _ in range(5):
        assert await limits.count("a", "worker", "docs.search") == []
    assert tightest([]) is None
    assert await limits.check() == "memory"


async def test_an_unreachable_store_fails_closed_and_fast() -> None:
    limits = limiter(
        {"match": {"tool": "email.*"}, "rate": "100/minute"}, storage="redis://127.0.0.1:1", timeout=0.3
    )
    with pytest.raises(RateLimitUnavailable) as raised:
        await limits.count("a", "worker", "email.send")
    assert raised.value.status == 503 and raised.value.headers["Retry-After"]
    assert not limits.available
    # Unlimited tools are unaffected; the store is reported unreachable.
    assert await limits.count("a", "worker", "docs.search") == []
    assert await limits.check() == "unreachable"


# --- through the app ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(config: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    from gateway.app import create_app

    app = create_app(config)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield client, app


def auth(keys_dir: Path, role: str = "worker", sub: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {role_token(keys_dir, role, sub)}"}


async def test_direct_calls_over_the_limit_get_429_and_never_reach_the_tool(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    limits = [{"name": "worker-docs", "match": {"role": "worker", "tool": "docs.*"}, "rate": "3/minute"}]
    config = gateway_config(tmp_path, db, upstream[0], keys_dir=keys_dir, limits=limits)
    async with running(config) as (client, app):
        headers = auth(keys_dir)
        answers = [await client.get("/tools/docs.search", params={"q": n}, headers=headers) for n in range(5)]
        assert [answer.status_code for answer in answers] == [200, 200, 200, 429, 429]
        assert answers[0].headers["ratelimit-policy"] == '"worker-docs";q=3;w=60'
        assert re.fullmatch(r'"worker-docs";r=2(;t=\d+)?', answers[0].headers["ratelimit"])
        refused = answers[3]
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["type"] == PROBLEMS + "rate-limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert re.fullmatch(r'"worker-docs";r=0;t=\d+', refused.headers["ratelimit"])
        assert effects.calls["docs.search"] == 3
        # Another agent of the same role has its own budget.
        other = await client.get("/tools/docs.search", headers=auth(keys_dir, sub="worker-2"))
        assert other.status_code == 200
        # Policy saw the limit: input.rate_limit in the decision log.
        app.state.gateway.decision_log.flush()
        lines = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
        seen = [line["input"]["rate_limit"] for line in lines if line["input"]["action"] == "call"]
        assert {**seen[0], "reset": 0} == {
            "name": "worker-docs",
            "limit": 3,
            "remaining": 2,
            "window": 60,
            "reset": 0,
        }
        assert [entry["remaining"] for entry in seen[:3]] == [2, 1, 0]
        assert len(seen) == 4  # the refused calls never reached policy


async def test_commits_are_limited_before_the_tool_is_called(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    from gateway.storage import upgrade_database

    await upgrade_database(db)
    limits = [{"name": "notify", "match": {"tool": "email.notify"}, "rate": "1/minute"}]
    config = commit_config(tmp_path, db, upstream[0], keys_dir, limits=limits)
    agents = Agents(keys_dir)
    async with running(config) as (client, _):
        task = new_task()
        first = await propose_and_verify(client, agents, task, "email.notify", {"n": 1})
        second = await propose_and_verify(client, agents, task, "email.notify", {"n": 2})
        ok = await client.post(
            f"/intents/{first}/commit", headers=agents.headers("committer", task, key="k1")
        )
        assert ok.status_code == 200, ok.text
        refused = await client.post(
            f"/intents/{second}/commit", headers=agents.headers("committer", task, key="k2")
        )
        assert refused.status_code == 429, refused.text
        assert refused.json()["type"] == PROBLEMS + "rate-limited"
        assert refused.headers["retry-after"] and refused.headers["ratelimit-policy"] == '"notify";q=1;w=60'
        assert effects.calls["email.notify"] == 1
        intent = (await client.get(f"/intents/{second}", headers=agents.headers("planner", task))).json()
        assert intent["status"] == "verified"  # untouched: the same commit can be retried later


async def test_limited_tools_fail_closed_when_redis_is_down_and_readyz_says_so(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    config = gateway_config(
        tmp_path,
        db,
        upstream[0],
        keys_dir=keys_dir,
        limits=[{"match": {"tool": "docs.echo"}, "rate": "100/minute"}],
        rate_limits={"storage": "redis://127.0.0.1:1", "timeout": 0.3},
    )
    async with running(config) as (client, _):
        refused = await client.get("/tools/docs.echo", headers=auth(keys_dir))
        assert refused.status_code == 503
        assert refused.json()["type"] == PROBLEMS + "rate-limit-unavailable"
        assert "Redis" in refused.json()["detail"]
        assert effects.headers == []
        unlimited = await client.get("/tools/docs.search", headers=auth(keys_dir))
        assert unlimited.status_code == 200
        ready = await client.get("/readyz")
        assert ready.json()["checks"]["rate_limits"] == "unreachable"
        metrics = (await client.get("/metrics")).text
        assert "agent_gateway_rate_limit_storage_up 0.0" in metrics


async def test_replicas_share_one_budget_through_redis(
    tmp_path: Path, upstream: tuple[str, Any], keys_dir: Path, effects: Any
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path}/gateway.db"
    prefix = f"agw-test-{uuid.uuid4().hex[:8]}"
    config = gateway_config(
        tmp_path,
        db,
        upstream[0],
        keys_dir=keys_dir,
        limits=[{"match": {"tool": "docs.search"}, "rate": "4/minute"}],
        rate_limits={"storage": "redis://127.0.0.1:6379", "key_prefix": prefix},
    )
    async with running(config) as (first, _), running(config) as (second, _):
        headers = auth(keys_dir)
        statuses = []
        for n in range(6):
            client = first if n % 2 else second
            statuses.append((await client.get("/tools/docs.search", headers=headers)).status_code)
        assert statuses == [200, 200, 200, 200, 429, 429]
        assert effects.calls["docs.search"] == 4
        assert (await first.get("/readyz")).json()["checks"]["rate_limits"] == "ok"
