"""Compile a policy in a throwaway process: `python -P _compile_check.py < job.json`.

Some valid-looking Rego makes rego-cpp abort or segfault the whole process
(`with input as {...}` aborts rego-cpp 1.5; a 20,000-deep array literal
overflows its parser's stack). The gateway therefore compiles new policy files
here first and only builds them in its own process when this one exits 0.

Exit status: 0 compiled, 1 compile error (rego-cpp has printed the errors to
stdout), anything else (usually death by a signal) a crash. Only regopy and
the standard library are imported, so this starts fast.
"""

import json
import sys

from regopy import Interpreter


def main() -> int:
    job = json.load(sys.stdin)
    interpreter = Interpreter()
    try:
        interpreter.add_data(job["data"])
        for name, text in job["modules"].items():
            interpreter.add_module(name, text)
        bundle = interpreter.build(None, job["entrypoints"])
    except Exception as error:  # noqa: BLE001 - every failure is reported the same way
        print(f"\n{type(error).__name__}", file=sys.stderr)
        return 1
    return 0 if bundle.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
