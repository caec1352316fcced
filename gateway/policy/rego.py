"""Reading, compiling and evaluating Rego with rego-cpp (regopy).

Three rules from experience with rego-cpp 1.5:

- Compile new files in a throwaway subprocess first (`_compile_check.py`):
  some valid-looking Rego kills the process that compiles it.
- Build the bundle once per policy version; it is immutable and shared.
- Query it from one runtime `Interpreter` per thread: an interpreter shared
  between threads mixes up inputs and answers wrongly.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regopy import Bundle, Input, Interpreter, LogLevel

from gateway.policy.decision import PolicyError

COMPILE_CHECK = Path(__file__).with_name("_compile_check.py")
DATA_FILE = "data.json"
_PACKAGE = re.compile(r"^package\s+([A-Za-z_][\w.]*)", re.MULTILINE)
_ERROR_LIMIT = 2000


@dataclass(frozen=True)
class PolicySources:
    modules: dict[str, str]
    data: dict[str, Any]
    version: str

    def packages(self) -> dict[str, str]:
        """File name → the package it declares."""
        found = {name: _PACKAGE.search(text) for name, text in self.modules.items()}
        return {name: match.group(1) for name, match in found.items() if match}


@dataclass(frozen=True)
class CompiledPolicy:
    sources: PolicySources
    bundle: Bundle
    entrypoints: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.sources.version


def policy_files(directory: Path, *, include_tests: bool = False) -> list[Path]:
    rego = [p for p in directory.glob("*.rego") if include_tests or not p.name.endswith("_test.rego")]
    data = directory / DATA_FILE
    return sorted(rego) + ([data] if data.is_file() else [])


def fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detection for the reload watcher: names, mtimes and sizes."""
    try:
        stats = [(path.name, path.stat()) for path in policy_files(directory)]
    except OSError:
        return ()
    return tuple((name, stat.st_mtime_ns, stat.st_size) for name, stat in stats)


def read_sources(directory: Path, *, include_tests: bool = False) -> PolicySources:
    if not directory.is_dir():
        raise PolicyError(f"{directory}: no such policy folder")
    digest = hashlib.sha256()
    modules: dict[str, str] = {}
    data: Any = {}
    for path in policy_files(directory, include_tests=include_tests):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(f"{path}: {error}") from None
        digest.update(f"{path.name}\0{len(text)}\0".encode() + text.encode())
        if path.name == DATA_FILE:
            try:
                data = json.loads(text)
            except ValueError as error:
                raise PolicyError(f"{path}: not valid JSON: {error}") from None
            if not isinstance(data, dict):
                raise PolicyError(f"{path}: must hold a JSON object")
        else:
            modules[path.name] = text
    if not modules:
        raise PolicyError(f"{directory}: no .rego files")
    return PolicySources(modules, data, digest.hexdigest()[:12])


def _describe_failure(returncode: int, stdout: str, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        detail = stderr.strip()[-_ERROR_LIMIT:]
        return f"the Rego compiler crashed ({name})" + (f": {detail}" if detail else "")
    text = (stdout.strip() or stderr.strip() or f"exit status {returncode}")[:_ERROR_LIMIT]
    return f"the policy does not compile: {text}"


def check_in_subprocess(
    sources: PolicySources,
    entrypoints: Sequence[str],
    *,
    timeout: float,
    command: Sequence[str] | None = None,
) -> None:
    """Compile in a throwaway process; raise PolicyError on an error, a crash or a timeout."""
    job = json.dumps({"modules": sources.modules, "data": sources.data, "entrypoints": list(entrypoints)})
    argv = list(command or [sys.executable, "-P", str(COMPILE_CHECK)])
    try:
        done = subprocess.run(argv, input=job, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PolicyError(f"compiling the policy took longer than {timeout:g} s") from None
    except OSError as error:
        raise PolicyError(f"cannot run the compile check: {error}") from None
    if done.returncode != 0:
        raise PolicyError(_describe_failure(done.returncode, done.stdout, done.stderr))


def build(sources: PolicySources, entrypoints: Sequence[str]) -> CompiledPolicy:
    """Build in this process; only call after `check_in_subprocess` passed."""
    interpreter = Interpreter()
    interpreter.log_level = LogLevel.NONE
    try:
        interpreter.add_data(sources.data)
        for name, text in sources.modules.items():
            interpreter.add_module(name, text)
        bundle = interpreter.build(None, list(entrypoints))
    except Exception as error:  # noqa: BLE001 - regopy raises RegoError and ctypes errors
        raise PolicyError(f"the policy does not compile: {error}") from None
    if not bundle.ok():
        raise PolicyError("the policy does not compile")
    return CompiledPolicy(sources, bundle, tuple(entrypoints))


def compile_policy(sources: PolicySources, entrypoints: Sequence[str], *, timeout: float) -> CompiledPolicy:
    check_in_subprocess(sources, entrypoints, timeout=timeout)
    return build(sources, entrypoints)


_local = threading.local()


def runtime_interpreter() -> Interpreter:
    interpreter = Interpreter()
    interpreter.log_level = LogLevel.NONE
    return interpreter


def parse_output(text: str) -> dict[str, Any]:
    """rego-cpp's output text → `{"result": v}`, `{}` (undefined) or `{"error": ...}`."""
    if text.strip() == "undefined":
        return {}
    try:
        output = json.loads(text)
        return {"result": output["expressions"][0]}
    except (ValueError, KeyError, IndexError, TypeError):
        return {"error": " ".join(text.split())[:500]}


def query(interpreter: Interpreter, policy: CompiledPolicy, entrypoint: str) -> dict[str, Any]:
    try:
        # regopy's Output parses the text itself and raises on text it cannot parse.
        return parse_output(str(interpreter.query_bundle_entrypoint(policy.bundle, entrypoint)))
    except Exception as error:  # noqa: BLE001 - any failure is a deny, never an allow
        return {"error": f"{type(error).__name__}: {error}"[:500]}


def evaluate(
    policy: CompiledPolicy, input_value: str | dict[str, Any], entrypoint: str
) -> tuple[dict[str, Any], int]:
    """Query one entrypoint with this thread's interpreter; returns (raw result, eval ns).

    A dict input is handed over as a regopy `Input` (measured ~0.6 ms cheaper per call
    than parsing a JSON term); text is parsed as a Rego term."""
    interpreter: Interpreter | None = getattr(_local, "interpreter", None)
    if interpreter is None:
        interpreter = _local.interpreter = runtime_interpreter()
    started = time.perf_counter_ns()
    try:
        if not isinstance(input_value, str) and _holds_wide_integer(input_value):
            # regopy's Input wraps integers to 64 bits (2**64 + 5 would reach Rego as 5);
            # rego-cpp parses a JSON term's numbers exactly. Not ASCII-escaped: rego-cpp
            # keeps `\u00e9` as those six characters, not as "é".
            input_value = json.dumps(input_value, ensure_ascii=False)
        if isinstance(input_value, str):
            interpreter.set_input_term(input_value)
        else:
            interpreter.set_input(Input(input_value))
    except Exception as error:  # noqa: BLE001 - any failure is a deny, never an allow
        return {"error": f"input rejected: {error}"[:500]}, time.perf_counter_ns() - started
    raw = query(interpreter, policy, entrypoint)
    return raw, time.perf_counter_ns() - started


_INT64 = (-(2**63), 2**63 - 1)


def _holds_wide_integer(value: Any) -> bool:
    """Whether an integer outside the signed 64-bit range is anywhere in `value`."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, int) and not _INT64[0] <= item <= _INT64[1]:
            return True
    return False
