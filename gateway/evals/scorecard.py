"""Results: one `Outcome` per scenario, one table per suite, text and JSON."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO


@dataclass
class Outcome:
    suite: str
    scenario: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    duplicate_effects: int = 0
    lost_writes: int = 0


@dataclass
class SuiteResult:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    @property
    def failed(self) -> int:
        return len(self.outcomes) - self.passed

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0] * 1000
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[round(q * 100) - 1] * 1000

    def summary(self) -> dict[str, Any]:
        return {
            "suite": self.name,
            "scenarios": len(self.outcomes),
            "passed": self.passed,
            "failed": self.failed,
            "duplicate_effects": sum(o.duplicate_effects for o in self.outcomes),
            "lost_writes": sum(o.lost_writes for o in self.outcomes),
            "p50_ms": round(self.percentile(0.50), 1),
            "p99_ms": round(self.percentile(0.99), 1),
            "requests": len(self.latencies),
        }


@dataclass
class Scorecard:
    suites: list[SuiteResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(suite.failed == 0 for suite in self.suites) and bool(self.suites)

    def suite(self, name: str) -> SuiteResult:
        return next(s for s in self.suites if s.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "settings": self.settings,
            "suites": [{**s.summary(), "outcomes": [asdict(o) for o in s.outcomes]} for s in self.suites],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def text(self) -> str:
        columns = [
            "suite",
            "scenarios",
            "passed",
            "failed",
            "duplicate_effects",
            "lost_writes",
            "p50_ms",
            "p99_ms",
        ]
        rows = [[str(s.summary()[c]) for c in columns] for s in self.suites]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        for suite in self.suites:
            lines.append("")
            lines.append(f"[{suite.name}]")
            for o in suite.outcomes:
                mark = "PASS" if o.passed else "FAIL"
                lines.append(f"  {mark}  {o.scenario}")
                lines += [f"        - {failure}" for failure in o.failures]
        lines.append("")
        lines.append("RESULT: " + ("all suites passed" if self.ok else "FAILURES"))
        return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr when it is a terminal; plain lines otherwise."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            filled = int(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:40]:<40}")
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"eval {self.done}/{self.total} {label}\n")
        self.stream.flush()
