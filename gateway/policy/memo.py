"""A memo of embedded decisions: the same relevant input gets the same result
without evaluating Rego again.

When a policy version loads, its (non-test) modules are scanned conservatively:
comments and string literals are blanked, then every occurrence of `input` must
be a field chain `input.a.b...`; those chains are the only parts of the input the
policy can read (`input.a[x].b` reads all of `input.a`). Anything else turns the
memo off for that version: `input` used bare (`x := input`, `input[k]`,
`with input as ...`), a `$` (template strings hide expressions in a literal),
or a builtin that is not a function of its arguments
(clock, network, randomness, runtime, `trace`/`print`), or a dotted call the scan
does not know to be pure. Data (`data.json`) is part of the policy version.

The key is (policy version, canonical JSON of the value at each read path, with
an absent path distinct from `null`). Only evaluated results are kept (never an
evaluation error), and only inputs made of plain JSON types (UTF-8 strings, bounded
depth) are memoized: those convert to a Rego input without fail, so a hit can never
hide an "input rejected".
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

InputPath = tuple[str, ...]
MemoKey = tuple[str, str]

DEFAULT_SIZE = 4096
# Deeper inputs are evaluated every time (regopy's conversion recurses).
MAX_DEPTH = 64

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_INPUT = re.compile(r"(?<![\w.])input(?!\w)")
_CHAIN = re.compile(rf"(?:\.{_IDENT})+")
# Builtins whose answer depends on more than their arguments (or that may), and
# `trace`/`print`, which have side effects. Matched as prefixes of a dotted name.
_IMPURE = re.compile(
    r"(?<![\w.])(?:time|http|rand|uuid|opa|net|providers|io|crypto\s*\.\s*x509)\s*\.[\w.]*"
    r"|(?<![\w.])(?:trace|print)\s*\("
)
_DOTTED_CALL = re.compile(rf"(?<![\w.])({_IDENT})(?:\s*\.\s*{_IDENT})+\s*\(")
# Builtin namespaces whose functions depend only on their arguments.
_PURE_NAMESPACES = frozenset(
    {
        "array",
        "base64",
        "base64url",
        "bits",
        "crypto",  # hashes and HMACs; crypto.x509 is refused above
        "glob",
        "graph",
        "graphql",
        "hex",
        "json",
        "numbers",
        "object",
        "regex",
        "rego",
        "semver",
        "strings",
        "units",
        "urlquery",
        "yaml",
        "data",  # functions of the policy's own modules, which are scanned too
    }
)
_IMPORT_DATA = re.compile(rf"^\s*import\s+data((?:\.{_IDENT})*)(?:\s+as\s+({_IDENT}))?", re.MULTILINE)


@dataclass(frozen=True)
class Scan:
    """What a policy version reads of its input; `reason` says why the memo is off."""

    paths: tuple[InputPath, ...]
    reason: str | None = None

    @property
    def enabled(self) -> bool:
        return self.reason is None


def blank_comments_and_strings(text: str) -> str:
    """The module with comments removed and every string literal emptied to `""`."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif char == '"':
            i += 1
            while i < n and text[i] != '"' and text[i] != "\n":
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif char == "`":
            end = text.find("`", i + 1)
            i = n if end < 0 else end + 1
            out.append('""')
        else:
            out.append(char)
            i += 1
    return "".join(out)


def minimal_paths(paths: Iterable[InputPath]) -> tuple[InputPath, ...]:
    """Drop every path that a shorter one already covers: ("tool",) covers ("tool", "name")."""
    kept: list[InputPath] = []
    for path in sorted(set(paths), key=lambda p: (len(p), p)):
        if not any(path[: len(prefix)] == prefix for prefix in kept):
            kept.append(path)
    return tuple(sorted(kept))


def scan_module(text: str) -> tuple[set[InputPath], str | None]:
    """The input paths one module reads, or the reason it cannot be memoized."""
    code = blank_comments_and_strings(text)
    if "$" in code:  # a template string, $"...{expr}...", would hide expressions in a literal
        return set(), "uses `$` (a template string?), which the scan does not read"
    impure = _IMPURE.search(code)
    if impure:
        return set(), f"uses {' '.join(impure.group(0).split())!r}, which is not a function of its input"
    aliases = {match.group(2) or match.group(1).rsplit(".", 1)[-1] for match in _IMPORT_DATA.finditer(code)}
    for call in _DOTTED_CALL.finditer(code):
        if call.group(1) not in _PURE_NAMESPACES and call.group(1) not in aliases:
            return set(), f"calls {' '.join(call.group(0).split())!r}, not known to be pure"
    paths: set[InputPath] = set()
    for found in _INPUT.finditer(code):
        chain = _CHAIN.match(code, found.end())
        if chain is None:
            line = code.count("\n", 0, found.start()) + 1
            return set(), f"line {line} uses `input` other than as `input.field...`"
        paths.add(tuple(chain.group(0)[1:].split(".")))
    return paths, None


def scan_modules(modules: Mapping[str, str]) -> Scan:
    paths: set[InputPath] = set()
    for name, text in sorted(modules.items()):
        found, reason = scan_module(text)
        if reason is not None:
            return Scan((), f"{name}: {reason}")
        paths |= found
    return Scan(minimal_paths(paths))


_SCALARS = frozenset({str, int, bool, type(None)})
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def is_plain_json(value: Any) -> bool:
    """True when `value` holds only dict (str keys), list, str, int, finite float, bool, None:
    exact types, so nothing converts to Rego otherwise than its JSON text says; strings
    that are UTF-8 (no lone surrogate) and at most MAX_DEPTH levels, which regopy takes.
    Anything else is evaluated every time: a memo hit must never hide an "input rejected"."""
    stack: list[tuple[Any, int]] = [([value], 0)]
    while stack:
        container, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if type(container) is dict:
            if not all(type(key) is str and _utf8(key) for key in container):
                return False
            items: Iterable[Any] = container.values()
        else:
            items = container
        for item in items:
            kind = type(item)
            if kind is str:
                if not _utf8(item):
                    return False
            elif kind in _SCALARS:
                continue
            elif kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind is not float or not math.isfinite(item):
                return False
    return True


def _utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_MISSING = object()


def _at(value: Any, path: InputPath) -> Any:
    for name in path:
        # A field of anything but an object is undefined in Rego, like a missing key.
        if type(value) is not dict or name not in value:
            return _MISSING
        value = value[name]
    return value


def canonical_values(input: Any, paths: Iterable[InputPath]) -> str:
    """One JSON text of the values at `paths`: `[v]` for a value (`[null]` for null), `[]` if absent.

    Only for plain JSON (`is_plain_json`): then equal texts mean equal values."""
    return _ENCODER.encode([[] if (value := _at(input, path)) is _MISSING else [value] for path in paths])


class DecisionMemo:
    """A bounded LRU of raw results for one policy version (a new one per load)."""

    def __init__(self, version: str, scan: Scan, size: int = DEFAULT_SIZE) -> None:
        self.version = version
        self.scan = scan
        self.size = size
        self.hits = 0
        self.misses = 0
        self.bypassed = 0  # inputs not made of plain JSON: always evaluated
        self._entries: OrderedDict[MemoKey, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.scan.enabled and self.size > 0

    @property
    def reason(self) -> str | None:
        return self.scan.reason or (None if self.size > 0 else "the memo size is 0")

    def key(self, version: str, input: Any) -> MemoKey | None:
        """The memo key of an input, or None when this input must be evaluated."""
        if not self.enabled:
            return None
        if not is_plain_json(input):
            self.bypassed += 1
            return None
        return version, canonical_values(input, self.scan.paths)

    def get(self, key: MemoKey) -> dict[str, Any] | None:
        with self._lock:
            text = self._entries.get(key)
            if text is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        return json.loads(text)  # a fresh copy: a caller can never alter what is kept

    def put(self, key: MemoKey, raw: dict[str, Any]) -> None:
        if "error" in raw:  # errors are never kept: the next request evaluates again
            return
        text = json.dumps(raw, separators=(",", ":"))
        with self._lock:
            self._entries[key] = text
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "reason": self.reason,
            "paths": [".".join(("input", *path)) for path in self.scan.paths],
            "entries": len(self._entries),
            "hits": self.hits,
            "misses": self.misses,
            "bypassed": self.bypassed,
        }
