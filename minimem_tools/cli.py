"""``minimem <command> ...``: each command lives in its own module and parses its own arguments.

Every bad input ends the same way, whatever the command: exit status 2 and ONE line on stderr,
``<prog>: error: <what is wrong, naming the flag or config field, and the fix>``, never a
traceback. :class:`ArgumentParser` gives argparse's own errors that shape
(argparse prints a usage line first), and :func:`usage_error` prints the checks a
command does itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "doctor": ("minimem_tools.doctor", "check python, torch, triton, numpy and the Triton interpreter"),
    "train": ("minimem_tools.train", "train a model from a YAML config"),
    "generate": ("minimem_tools.generate", "sample text from a run folder's latest checkpoint"),
    "bench": ("minimem_tools.bench", "benchmarks: lookup, retrieval, training, accounting, step, decode"),
    "experiment": ("minimem_tools.experiments", "run a named experiment and write its results"),
    "grade": ("minimem_tools.grading", "grade the exercises"),
    "exercises": ("minimem_tools.exercises_cmd", "exercises init DIR: copy the exercise stubs and graders into DIR"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message``, exit status 2 (no usage line first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def usage_error(prog: str, message: str) -> int:
    """Print ``prog: error: message`` as one line on stderr; return the usage-error status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def usage() -> str:
    lines = ["usage: minimem <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return usage_error(
            "minimem",
            f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (`minimem --help` describes them)",
        )
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
