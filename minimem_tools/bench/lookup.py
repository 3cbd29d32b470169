"""``minimem bench lookup``: the fused memory lookup (Specification §6) against its alternatives.

Times forward and forward+backward of
  triton    the fused kernels (minimem.kernels.triton_lookup; CUDA only, never the interpreter)
  eager     the torch reference: index_select + batched matmul, index_add_ backward
  compile   torch.compile of the eager reference
  embbag    F.embedding_bag(mode="sum", per_sample_weights) where it applies (c = 1, no pre-values)
at the UltraMemV2 configs of Specification §4 ([UM2] Table 10) and over a sweep of T. The physical limit
is the bytes of table rows read: T m (D_v + D_p) b for the forward, twice that for
forward+backward (the backward reads the rows again); achieved GB/s is that count over the
time, and % peak divides by the device's peak memory bandwidth (--peak-gbps overrides the
table below). Results go to benchmarks/results/<device>.json.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minimem.guards import check_output_folder, memory_problem
from minimem.kernels.reference import memory_lookup_torch
from minimem_tools.cli import ArgumentParser

# Peak DRAM bandwidth in GB/s by device-name substring (first match wins: specific names first).
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5, HBM3 ("NVIDIA H100 80GB HBM3")
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB SXM4 / PCIe
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
]

# [UM2] Table 10 (Specification §4): N = n^2 slots, m, D_v, D_p; c = 2 scoring cores (UltraMemV2Config default).
CONFIGS = {
    "227m": dict(N=360**2, m=32, d_value=192, d_pre=192, cores=2),
    "1b": dict(N=528**2, m=128, d_value=768, d_pre=384, cores=2),
}

TARGETS = "targets at T=8192: triton forward >= 60% of peak; fwd+bwd >= 3x faster than eager, >= 1.5x than compile"


def peak_gbps(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu-{platform.machine()}"


def make_case(N, m, d_value, d_pre, cores, T, pre, dtype, device, seed=0):
    """Inputs of one lookup: tables in ``dtype``, fp32 scores and pre_input, uniform random slots."""
    gen = torch.Generator(device=device).manual_seed(seed)
    values = (torch.randn(N, d_value, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
    indices = torch.randint(0, N, (T, m), device=device, generator=gen)
    scores = torch.randn(T, m, cores, device=device, generator=gen).requires_grad_()
    pre_values = pre_input = None
    if pre:
        pre_values = (torch.randn(N, d_pre, device=device, generator=gen) * 0.02).to(dtype).requires_grad_()
        pre_input = torch.randn(T, d_pre, device=device, generator=gen).requires_grad_()
    return values, indices, scores, pre_values, pre_input


def embedding_bag_lookup(values, indices, scores, pre_values=None, pre_input=None):
    """[PKM]'s lookup as nn.EmbeddingBag: c = 1, no pre-values."""
    return F.embedding_bag(indices, values, per_sample_weights=scores[..., 0].to(values.dtype), mode="sum")


def implementations(device, use_compile: bool) -> dict:
    impls = {"eager": memory_lookup_torch}
    if device.type == "cuda":
        from minimem.kernels.triton_lookup import MemoryLookupFunction

        impls = {"triton": MemoryLookupFunction.apply, **impls}
    if use_compile:
        impls["compile"] = torch.compile(memory_lookup_torch)
    impls["embbag"] = embedding_bag_lookup
    return impls


def time_ms(fn, device, repeats: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def bench_case(impl, inputs, device, repeats, warmup):
    """(forward ms, forward+backward ms) of one implementation on one set of inputs."""
    trainable = [x for x in (inputs[0], inputs[2], inputs[3], inputs[4]) if x is not None]

    def forward():
        with torch.no_grad():
            return impl(*inputs)

    def forward_backward():
        out = impl(*inputs)
        return torch.autograd.grad(out, trainable, torch.ones_like(out))

    return time_ms(forward, device, repeats, warmup), time_ms(forward_backward, device, repeats, warmup)


def case_bytes(N, m, d_value, d_pre, T, bytes_per) -> int:
    """A floor on the bytes one fwd+bwd case holds at once: the tables and their gradients, and the
    eager path's gathered rows in fp32 with one product of the same size (T m (D_v + D_p) each)."""
    width = d_value + d_pre
    return 2 * N * width * bytes_per + 2 * T * m * width * 4


def parse_args(argv):
    p = ArgumentParser(prog="minimem bench lookup", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="table dtype (default bfloat16 on a GPU, float32 on CPU)",
    )
    p.add_argument("--configs", default=None, help=f"comma list of {','.join(CONFIGS)}")
    p.add_argument("--tokens", type=int, default=None, help="T of the main table (default 8192 on a GPU, 1024 on CPU)")
    p.add_argument("--sweep", default=None, help="comma list of T for the sweep (UltraMemV2 lookup, last config)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth of the device in GB/s")
    p.add_argument("--quick", action="store_true", help="smallest useful run (CPU: under a minute)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<device>.json)")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error(f"--device {args.device} but CUDA is not available here; use --device cpu")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.configs = (args.configs or ("227m,1b" if gpu else "227m")).split(",")  # CPU: 1b's tables are 1.3 GB
    for name in args.configs:
        if name not in CONFIGS:
            p.error(f"--configs entries must be in {list(CONFIGS)}, got {name!r}")
    for flag, value in (("--tokens", args.tokens), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.peak_gbps is not None and not (math.isfinite(args.peak_gbps) and args.peak_gbps > 0):
        p.error(f"--peak-gbps must be a positive number of GB/s, got {args.peak_gbps}")
    args.tokens = args.tokens or (8192 if gpu else (256 if args.quick else 1024))
    default_sweep = (
        ("2048,8192" if args.quick else "1024,2048,4096,8192,16384,32768")
        if gpu
        else ("" if args.quick else "256,4096")
    )
    sweep = default_sweep if args.sweep is None else args.sweep
    try:
        args.sweep = [int(t) for t in sweep.split(",") if t.strip()]
    except ValueError:
        p.error(f"--sweep must be a comma list of token counts, e.g. 256,4096; got {sweep!r}")
    if any(t < 1 for t in args.sweep):
        p.error(f"--sweep token counts must be >= 1, got {args.sweep}")
    args.repeats = args.repeats or (3 if args.quick else 10 if gpu else 5)
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            p.error(f"--out {out} is a folder; give the path of a .json file")
        try:
            check_output_folder(out.parent, "--out's folder")
        except ValueError as err:
            p.error(str(err))
    # Refuse sizes that cannot fit before allocating anything: the largest case decides (main()
    # runs every config at --tokens and the sweep on the last config).
    bytes_per = torch.finfo(getattr(torch, args.dtype)).bits // 8
    cases = [(c, args.tokens) for c in args.configs] + [(args.configs[-1], T) for T in args.sweep]
    need = max(
        case_bytes(CONFIGS[c]["N"], CONFIGS[c]["m"], CONFIGS[c]["d_value"], CONFIGS[c]["d_pre"], T, bytes_per)
        for c, T in cases
    )
    problem = memory_problem(need, device, "--tokens / --sweep / --configs")
    if problem:
        p.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    bytes_per = torch.finfo(dtype).bits // 8
    peak = peak_gbps(device, args.peak_gbps)
    name = device_name(device)
    use_compile = not args.no_compile
    impls = implementations(device, use_compile)
    print(
        f"minimem bench lookup on {name} ({args.dtype} tables, fp32 scores); peak bandwidth: "
        f"{f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}"
    )
    if device.type != "cuda":
        print(
            "no CUDA device: the Triton kernels are not timed (the CPU interpreter says nothing about speed); "
            "torch variants only"
        )

    # (config, pre, T): the UltraMemV2 lookup (c cores + pre-values) of each config at --tokens, the
    # c = 1 values-only lookup where nn.EmbeddingBag applies, and the T sweep on the last config.
    cases = []
    for cfg in args.configs:
        cases.append((cfg, "um2", args.tokens))
        cases.append((cfg, "values-only c=1", args.tokens))
    for T in args.sweep:
        if T != args.tokens:
            cases.append((args.configs[-1], "um2", T))

    rows = []
    bar = tqdm(total=sum(len(impls) - (kind == "um2") for _, kind, _ in cases), desc="lookup bench", unit="run")
    for cfg, kind, T in cases:
        shape = dict(CONFIGS[cfg])
        pre = kind == "um2"
        if not pre:
            shape["cores"] = 1
        inputs = make_case(**shape, T=T, pre=pre, dtype=dtype, device=device)
        table_bytes = T * shape["m"] * (shape["d_value"] + (shape["d_pre"] if pre else 0)) * bytes_per
        for impl_name, impl in impls.items():
            if impl_name == "embbag" and pre:
                continue
            bar.set_postfix_str(f"{cfg} {kind} T={T} {impl_name}")
            try:
                fwd, fwd_bwd = bench_case(impl, inputs, device, args.repeats, warmup=1 if args.quick else 3)
            except Exception as err:  # noqa: BLE001 - e.g. compile failing: report, keep going
                tqdm.write(f"  {impl_name} failed on {cfg} {kind} T={T}: {type(err).__name__}: {err}")
                fwd = fwd_bwd = float("nan")
            gbps_f = table_bytes / fwd / 1e6
            gbps_fb = 2 * table_bytes / fwd_bwd / 1e6
            rows.append(
                dict(
                    config=cfg,
                    lookup=kind,
                    T=T,
                    impl=impl_name,
                    **shape,
                    pre=pre,
                    dtype=args.dtype,
                    fwd_ms=fwd,
                    fwd_bwd_ms=fwd_bwd,
                    fwd_gbps=gbps_f,
                    fwd_bwd_gbps=gbps_fb,
                    fwd_pct_peak=100 * gbps_f / peak if peak else None,
                    fwd_bwd_pct_peak=100 * gbps_fb / peak if peak else None,
                )
            )
            bar.update()
        del inputs
    bar.close()

    print_table(rows, peak)
    print_ratios(rows, args.tokens)
    out = (
        Path(args.out) if args.out else Path("benchmarks/results") / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(device=name, peak_gbps=peak, dtype=args.dtype, torch=torch.__version__, targets=TARGETS, rows=rows),
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


def print_table(rows, peak):
    head = (
        f"{'config':<6} {'lookup':<16} {'T':>6} {'impl':<8} {'fwd ms':>9} {'GB/s':>7} {'%peak':>6} "
        f"{'fwd+bwd ms':>11} {'GB/s':>7} {'%peak':>6}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        pct = lambda v: f"{v:6.1f}" if v is not None else f"{'-':>6}"  # noqa: E731
        print(
            f"{r['config']:<6} {r['lookup']:<16} {r['T']:>6} {r['impl']:<8} {r['fwd_ms']:9.3f} {r['fwd_gbps']:7.1f} "
            f"{pct(r['fwd_pct_peak'])} {r['fwd_bwd_ms']:11.3f} {r['fwd_bwd_gbps']:7.1f} {pct(r['fwd_bwd_pct_peak'])}"
        )
    print("GB/s counts table rows read: T m (D_v + D_p) bytes forward, twice that forward+backward")


def print_ratios(rows, tokens):
    print(f"\nfwd+bwd speed-ups at T={tokens}: the alternative's time over triton's (compile's without a GPU)")
    key = lambda r: (r["config"], r["lookup"], r["T"])  # noqa: E731
    groups = {}
    for r in rows:
        if r["T"] == tokens:
            groups.setdefault(key(r), {})[r["impl"]] = r
    for (cfg, kind, _), by_impl in groups.items():
        base_name = "triton" if "triton" in by_impl else "compile" if "compile" in by_impl else None
        if base_name is None:
            continue
        base = by_impl[base_name]
        parts = [
            f"vs {other} {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x"
            for other, r in by_impl.items()
            if other != base_name
        ]
        line = f"  {cfg} {kind}: {base_name} " + ", ".join(parts)
        if base_name == "triton" and base["fwd_pct_peak"] is not None:
            line += f"; triton forward {base['fwd_pct_peak']:.0f}% of peak"
        print(line)
    print("  " + TARGETS)
