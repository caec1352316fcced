"""Rate limits and quotas per agent, role and tool (`[[limits]]`), counted with `limits`.

    [[limits]]
    name = "worker-email"                            # in headers and policy input
    match = {role = "worker", tool = "email.*"}      # sub and role exact, tool a glob
    rate = "30/minute"                               # the `limits` notation; "1000/day" is a quota
    per = ["sub"]                                    # who gets their own counter (default: each agent)

Every limit a call matches is counted when the call has passed authentication and its
input checks, before policy runs: policy sees the tightest one as `input.rate_limit`
({name, limit, remaining, window, reset}). A call over any limit is refused with 429
`rate-limited`, `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` fields
(draft-ietf-httpapi-ratelimit-headers), and never reaches the tool. Attempts count
even when policy then denies them: the limit bounds what agents try, not only what runs.

Counters live in this process (`memory`) or in Redis, shared by every replica. When
Redis does not answer within `[rate_limits] timeout`, a call that some limit matches
fails closed with 503 `rate-limit-unavailable`; calls no limit matches are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from gateway.config import Config, limit_name
from gateway.problems import GatewayError, RateLimited

if TYPE_CHECKING:
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.ratelimits")

# After the store refused or dropped a connection, limited calls are refused at once for
# this long (no pile-up of callers on a dead store), then it is tried again. A store that
# is only slow fails just the calls that waited out the timeout.
RETRY_STORE_AFTER = 1.0


class RateLimitUnavailable(GatewayError):
    status, name, title = 503, "rate-limit-unavailable", "Rate-limit store unavailable; failing closed"


@dataclass(frozen=True)
class Rule:
    name: str
    item: RateLimitItem
    sub: str | None
    role: str | None
    tool: str | None
    per: tuple[str, ...]

    @property
    def window(self) -> int:
        return int(self.item.get_expiry())

    def matches(self, sub: str, role: str, tool: str) -> bool:
        return (
            (self.sub is None or self.sub == sub)
            and (self.role is None or self.role == role)
            and (self.tool is None or fnmatchcase(tool, self.tool))
        )

    def identifiers(self, sub: str, role: str, tool: str) -> tuple[str, ...]:
        values = {"sub": sub, "role": role, "tool": tool}
        # Quoted: the library joins identifiers with "/", which a sub could contain.
        return (self.name, *(f"{what}={quote(values[what], safe='')}" for what in self.per))


@dataclass(frozen=True)
class Usage:
    """One limit after this call was counted."""

    rule: Rule
    allowed: bool
    remaining: int
    reset_at: float | None  # epoch seconds when capacity frees up; None when not asked

    def reset_in(self, now: float) -> int:
        if self.reset_at is None:
            return self.rule.window
        return max(1, math.ceil(self.reset_at - now))

    def policy_input(self, now: float) -> dict[str, Any]:
        return {
            "name": self.rule.name,
            "limit": self.rule.item.amount,
            "remaining": self.remaining,
            "window": self.rule.window,
            "reset": self.reset_in(now) if self.reset_at is not None else None,
        }


def tightest(usages: Sequence[Usage]) -> dict[str, Any] | None:
    """What policy sees as `input.rate_limit`: the matched limit with the least left."""
    if not usages:
        return None
    return min(usages, key=lambda usage: usage.remaining).policy_input(time.time())


def policy_header(usages: Sequence[Usage]) -> str:
    return ", ".join(f'"{u.rule.name}";q={u.rule.item.amount};w={u.rule.window}' for u in usages)


def state_header(usages: Sequence[Usage], now: float) -> str:
    parts = []
    for usage in usages:
        part = f'"{usage.rule.name}";r={usage.remaining}'
        if usage.reset_at is not None:
            part += f";t={usage.reset_in(now)}"
        parts.append(part)
    return ", ".join(parts)


def response_headers(usages: Sequence[Usage]) -> dict[str, str]:
    """`RateLimit-Policy` and `RateLimit` for a response to a limited call."""
    if not usages:
        return {}
    return {"RateLimit-Policy": policy_header(usages), "RateLimit": state_header(usages, time.time())}


def build_rules(config: Config) -> list[Rule]:
    return [
        Rule(
            name=limit_name(index, limit),
            item=parse(limit.rate),
            sub=limit.match.sub,
            role=limit.match.role,
            tool=limit.match.tool,
            per=tuple(dict.fromkeys(limit.per)),
        )
        for index, limit in enumerate(config.limits)
    ]


def build_storage(config: Config) -> Storage:
    uri = config.rate_limit_storage
    if uri == "memory://":
        return MemoryStorage()
    timeout = config.rate_limits.timeout
    # The strategy is part of the prefix: the two keep different data under a key.
    prefix = f"{config.rate_limits.key_prefix}:{config.rate_limits.strategy}"
    return RedisStorage(
        uri, wrap_exceptions=True, key_prefix=prefix, connect_timeout=timeout, stream_timeout=timeout
    )


class RateLimiter:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.rules = build_rules(config)
        self.shared = config.rate_limit_storage != "memory://"
        self.strategy = config.rate_limits.strategy
        self.timeout = config.rate_limits.timeout
        self.metrics = metrics
        self.storage = build_storage(config)
        self._moving = MovingWindowRateLimiter(self.storage)
        self._down_until = 0.0
        self.available = True

    def matching(self, sub: str, role: str, tool: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.matches(sub, role, tool)]

    async def count(self, sub: str, role: str, tool: str) -> list[Usage]:
        """Count one call against every limit it matches; 429 when any is used up."""
        rules = self.matching(sub, role, tool) if self.rules else []
        if not rules:
            return []
        if time.monotonic() < self._down_until:
            raise self._unavailable()
        usages = []
        try:
            async with asyncio.timeout(self.timeout):
                for rule in rules:
                    usages.append(await self._hit(rule, rule.identifiers(sub, role, tool)))
        except TimeoutError:
            self._mark(up=False, pause=False)
            log.warning("rate-limit store did not answer within %.2f s; the call is refused", self.timeout)
            raise self._unavailable() from None
        except Exception as error:  # noqa: BLE001 - whatever failed, limited calls fail closed
            self._mark(up=False)
            log.warning("rate-limit store failed (%s); limited calls are refused", type(error).__name__)
            raise self._unavailable() from None
        self._mark(up=True)
        refused = [usage for usage in usages if not usage.allowed]
        if refused:
            if self.metrics is not None:
                self.metrics.rate_limited.labels(tool).inc()
            raise self._refused(usages, refused)
        return usages

    async def _hit(self, rule: Rule, identifiers: tuple[str, ...]) -> Usage:
        item = rule.item
        if self.strategy == "fixed-window":
            # One round trip: the counter after this call says whether it fits.
            key = item.key_for(*identifiers)
            used = await self.storage.incr(key, item.get_expiry(), amount=1)
            allowed = used <= item.amount
            reset_at = None if allowed else await self.storage.get_expiry(key)
            return Usage(rule, allowed, max(0, item.amount - used), reset_at)
        allowed = await self._moving.hit(item, *identifiers)
        stats = await self._moving.get_window_stats(item, *identifiers)
        return Usage(rule, allowed, max(0, stats.remaining), stats.reset_time)

    def _refused(self, usages: list[Usage], refused: list[Usage]) -> RateLimited:
        now = time.time()
        wait = max(usage.reset_in(now) for usage in refused)
        first = refused[0].rule
        return RateLimited(
            f"rate limit {first.name!r} ({first.item.amount} per {first.window} s) is used up; "
            f"retry in {wait} s",
            headers={
                "Retry-After": str(wait),
                "RateLimit-Policy": policy_header(usages),
                "RateLimit": state_header(usages, now),
            },
            limit=first.name,
            retry_after=wait,
        )

    def _unavailable(self) -> RateLimitUnavailable:
        return RateLimitUnavailable(
            "the shared rate-limit store (Redis) does not answer; calls to rate-limited tools "
            "are refused until it is back",
            headers={"Retry-After": "5"},
        )

    def _mark(self, *, up: bool, pause: bool = True) -> None:
        if up != self.available and self.metrics is not None:
            self.metrics.rate_limit_storage_up.set(1 if up else 0)
        self.available = up
        self._down_until = time.monotonic() + RETRY_STORE_AFTER if not up and pause else 0.0

    async def start(self) -> None:
        """Connect to a shared store before the first call needs it (a cold pool is slow)."""
        if self.shared and self.rules:
            state = await self.check()
            if state != "ok":
                log.warning("rate-limit store unreachable at start; limited calls fail until it answers")

    async def check(self) -> str:
        """For /readyz: `memory`, `ok` or `unreachable`."""
        if not self.shared:
            return "memory"
        try:
            async with asyncio.timeout(self.timeout):
                up = await self.storage.check()
        except Exception:  # noqa: BLE001 - any failure means unreachable
            up = False
        self._mark(up=up)
        return "ok" if up else "unreachable"

    async def stop(self) -> None:
        timer = getattr(self.storage, "timer", None)  # MemoryStorage's expiry task
        if isinstance(timer, asyncio.Task):
            timer.cancel()
