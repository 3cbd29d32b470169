"""``minimem bench <name>``: benchmark scripts that print tables and ratios (never timed tests)."""

from __future__ import annotations

import importlib
import sys

from minimem_tools.cli import usage_error

BENCHES = {
    "lookup": "minimem_tools.bench.lookup",  # fused memory lookup: Triton vs eager vs torch.compile
    "retrieval": "minimem_tools.bench.retrieval",  # product-key top-m vs brute force
    "train": "minimem_tools.bench.train",  # training / inference tokens/s, the reference run
    "accounting": "minimem_tools.bench.accounting",  # params, FLOPs, bytes per token for every config
    "step": "minimem_tools.bench.step",  # CPU training-step time of every layer against dense
    "decode": "minimem_tools.bench.decode",  # cached decoding: tokens/s and weight bytes per token
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: minimem bench {" + ",".join(BENCHES) + ",all} [options]")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        if rest:  # each benchmark has its own flags: one set of options cannot suit them all
            return usage_error(
                "minimem bench",
                f"'all' takes no options, got {' '.join(rest)}; "
                "pass options to one benchmark, e.g. minimem bench lookup --quick",
            )
        return max(int(importlib.import_module(mod).main([]) or 0) for mod in BENCHES.values())
    if name not in BENCHES:
        return usage_error("minimem bench", f"unknown benchmark {name!r}; choose one of {', '.join(BENCHES)}, all")
    return int(importlib.import_module(BENCHES[name]).main(rest) or 0)
