"""``minimem bench accounting``: parameters, FLOPs and bytes read per token for every config.

For each ``configs/*.yaml`` (or the files given): total and activated parameters, forward
FLOPs per token, memory's share of compute (MCP, memory kinds) and the bytes of weights read
per token at B = 1, 64 and 4096 tokens per forward step (uniform-access expectation, see
``minimem.accounting``). ``--plot PATH`` saves the bytes-per-token curves as a PNG.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from minimem import accounting
from minimem.config import load_config
from minimem.guards import check_output_folder
from minimem_tools.cli import ArgumentParser, usage_error


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def parse_args(argv):
    p = ArgumentParser(prog="minimem bench accounting", description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", help="YAML configs (default: configs/*.yaml)")
    p.add_argument("--configs-dir", default="configs", help="directory searched when no config is named")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 4096], help="tokens per forward step")
    p.add_argument("--dtype-bytes", type=int, default=4, help="bytes per weight (4 fp32, 2 bf16)")
    p.add_argument("--plot", default=None, help="save the bytes-per-token plot to this PNG")
    args = p.parse_args(argv)
    args.paths = [Path(c) for c in args.configs] or sorted(Path(args.configs_dir).glob("*.yaml"))
    if any(b < 1 for b in args.batch_sizes):
        p.error(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    if args.dtype_bytes not in (1, 2, 4, 8):
        p.error(f"--dtype-bytes must be 1, 2, 4 or 8 (bytes per weight), got {args.dtype_bytes}")
    try:  # every config loads, and the plot has a folder to go to, before any work starts
        args.models = {path: load_config(path).model for path in args.paths}
        if args.plot is not None:
            if Path(args.plot).is_dir():
                raise ValueError(f"--plot {args.plot} is a folder; give the path of a .png file")
            check_output_folder(Path(args.plot).parent, "--plot's folder")
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.paths:
        return usage_error(
            "minimem bench accounting",
            f"no configs found in {args.configs_dir}/; name some YAML files or a --configs-dir that holds them",
        )
    configs, rows = {}, []
    for path, config in tqdm(args.models.items(), desc="accounting", unit="config"):
        model = accounting.build_meta(config)
        params = accounting.count_parameters(model)
        flops = accounting.flops_per_token(config)
        mcp = accounting.mcp_percent(config) if config.memory.kind != "none" else None
        reads = [accounting.bytes_read(model, b, args.dtype_bytes)["expected_per_token"] for b in args.batch_sizes]
        configs[path.stem] = config
        rows.append(
            [
                path.stem,
                _human(params["total"]),
                _human(params["activated"]),
                _human(flops["forward"]),
                "-" if mcp is None else f"{mcp:.1f}%",
            ]
            + [_human(r) for r in reads]
        )
    header = ["config", "params", "activated", "FLOPs/tok", "MCP"] + [f"B/tok@{b}" for b in args.batch_sizes]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print(
        f"\nFLOPs: forward, 2 x multiply-adds, attention over the mean causal context. Bytes: {args.dtype_bytes}-byte "
        "weights read per token, expectation under uniform routing/access (minimem.accounting)."
    )
    if args.plot:
        fig = accounting.plot_bytes_per_token(
            configs, sorted(set(args.batch_sizes) | {2**i for i in range(13)}), args.dtype_bytes
        )
        fig.savefig(args.plot, dpi=120)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
