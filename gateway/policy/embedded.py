"""The embedded engine: the policy folder evaluated in-process with rego-cpp.

Loading is all-or-nothing. New files are read, compiled in a throwaway
subprocess, then built here; only a bundle that got through both replaces the
one serving. A refused policy leaves the last good one in place and its error
in `last_reload`. Until some policy has loaded, `decide` raises
PolicyUnavailable (503): without a policy there is nothing to allow with.

Each loaded version gets a fresh decision memo (`memo.py`): a decision whose
relevant input was seen before reuses that result instead of evaluating Rego.
Every decision still gets its own id and decision-log line; a memo hit is logged
with the label `"memo": "hit"` and `timer_rego_query_eval_ns` 0 (nothing was evaluated).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.policy import rego
from gateway.policy.decision import DECISION_PATH, Decision, PolicyError, decision_from_result
from gateway.policy.decision_log import DecisionLog
from gateway.policy.memo import DEFAULT_SIZE, DecisionMemo, Scan, scan_modules
from gateway.problems import PolicyUnavailable

log = logging.getLogger("gateway.policy")


class EmbeddedEngine:
    def __init__(
        self,
        directory: Path,
        *,
        decision_log: DecisionLog | None = None,
        reload: bool = True,
        reload_interval: float = 1.0,
        compile_timeout: float = 30.0,
        memo_size: int = DEFAULT_SIZE,
    ) -> None:
        self.directory = directory
        self.decision_log = decision_log
        self.reload_enabled = reload
        self.reload_interval = reload_interval
        self.compile_timeout = compile_timeout
        self._stopped = False
        self.memo_size = memo_size
        self._policy: rego.CompiledPolicy | None = None
        self._memo = DecisionMemo("", Scan((), "no policy loaded"), 0)
        self._last_reload: dict[str, Any] = {"ok": False, "error": "not loaded yet", "at": None}
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._refused_version: str | None = None
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def version(self) -> str:
        return self._policy.version if self._policy else ""

    @property
    def memo(self) -> DecisionMemo:
        """The decision memo of the version serving (replaced, empty, on every load)."""
        return self._memo

    @property
    def last_reload(self) -> dict[str, Any]:
        return dict(self._last_reload)

    async def start(self) -> None:
        await self.reload()
        if self.reload_enabled and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="policy-reload")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        self._stopped = True

    async def reload(self) -> bool:
        """Load the folder if its content changed; True when a new policy now serves."""
        async with self._lock:
            self._seen = await asyncio.to_thread(rego.fingerprint, self.directory)
            sources: rego.PolicySources | None = None
            try:
                sources = await asyncio.to_thread(rego.read_sources, self.directory)
                if self._policy and sources.version == self._policy.version:
                    if not self._last_reload["ok"]:  # the folder is back to what serves
                        self._record(ok=True, error=None)
                    self._refused_version = None
                    return False
                if sources.version == self._refused_version:
                    return False  # already refused; the error stays in last_reload
                if "gateway" not in sources.packages().values():
                    raise PolicyError(f"{self.directory}: no module declares `package gateway`")
                compiled = await asyncio.to_thread(
                    rego.compile_policy, sources, [DECISION_PATH], timeout=self.compile_timeout
                )
            except PolicyError as error:
                self._refused_version = sources.version if sources else None
                self._record(ok=False, error=str(error))
                log.error("policy refused, %s: %s", self._serving(), error)
                return False
            memo = DecisionMemo(compiled.version, scan_modules(sources.modules), self.memo_size)
            self._policy, self._memo, self._refused_version = compiled, memo, None
            self._record(ok=True, error=None)
            log.info(
                "policy %s loaded from %s; decision memo %s",
                compiled.version,
                self.directory,
                self._last_reload["memo"],
            )
            return True

    def _serving(self) -> str:
        return f"still serving {self.version}" if self._policy else "no policy is serving"

    def _record(self, *, ok: bool, error: str | None) -> None:
        at = datetime.now(UTC).isoformat()
        memo = "on" if self._memo.enabled else f"off: {self._memo.reason}"
        self._last_reload = {"ok": ok, "error": error, "at": at, "version": self.version, "memo": memo}

    async def _watch(self) -> None:
        # A change is loaded once the files have stayed the same for one more
        # interval, so a file caught half-written is never compiled and served.
        changed: tuple[tuple[str, int, int], ...] | None = None
        while True:
            await asyncio.sleep(self.reload_interval)
            try:
                current = await asyncio.to_thread(rego.fingerprint, self.directory)
                if current == self._seen:
                    changed = None
                elif current == changed:
                    await self.reload()
                else:
                    changed = current
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("policy reload failed")

    async def decide(self, input: dict[str, Any], *, labels: dict[str, Any] | None = None) -> Decision:
        policy = self._policy
        if policy is None:
            raise PolicyUnavailable(f"no policy loaded: {self._last_reload['error']}")
        if self._stopped:
            raise PolicyUnavailable("policy engine stopped")
        # Evaluated on the event loop's own thread (~0.7 ms): handing each query to a
        # thread pool cost more than it saved, because regopy's many small ctypes calls
        # each release and retake the GIL, so pool threads and the loop thrash on it.
        # The key carries the version evaluated, so a memo and a policy swapped by a
        # reload in between can never pair a result with the wrong version.
        memo = self._memo
        key = memo.key(policy.version, input)
        raw = memo.get(key) if key is not None else None
        if raw is not None:
            eval_ns, labels = 0, {**(labels or {}), "memo": "hit"}
        else:
            raw, eval_ns = rego.evaluate(policy, input, DECISION_PATH)
            if key is not None:
                memo.put(key, raw)
        decision = decision_from_result(raw, policy_version=policy.version)
        if self.decision_log is not None:
            self.decision_log.record(decision, input, labels=labels, eval_ns=eval_ns)
        return decision
