"""``minimem bench retrieval``: product-key top-m [PKM] §3.2 against scoring all N slots.

Both sides start from the queries and the sub-key tables and return the same (scores,
indices) (checked in the run): the brute force forms all N = n^2 scores s1[i] + s2[j] per token
and takes their top-m, O(T N); the product-key path takes the top-m of each side and of the
pruned m x m candidate grid, O(T (n D_k + m log m)). Prints the time ratio at the headline
point (N = 2^20, m = 32, T = 1024, D_k = 256, [PKM]'s defaults but n = 1024) and a sweep over N.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from minimem.config import MAX_THREADS
from minimem.guards import memory_problem
from minimem.product_keys import brute_force_topk, product_key_topk
from minimem_tools.cli import ArgumentParser


def _time(fn, reps: int):
    """(fastest of ``reps`` runs in seconds, last result): the least disturbed by other processes."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def measure(n: int, m: int, T: int, d_key: int, brute_reps: int, fast_reps: int, seed: int = 0) -> dict:
    """Seconds of both paths at N = n^2 (best of reps, after one untimed warm-up of the fast path)."""
    g = torch.Generator().manual_seed(seed)
    half = d_key // 2
    q1, q2 = torch.randn(T, half, generator=g), torch.randn(T, half, generator=g)
    k1, k2 = torch.randn(n, half, generator=g), torch.randn(n, half, generator=g)
    with torch.no_grad():
        product_key_topk(q1, q2, k1, k2, m)
        fast, (fs, fi) = _time(lambda: product_key_topk(q1, q2, k1, k2, m), fast_reps)
        brute, (bs, bi) = _time(lambda: brute_force_topk(q1, q2, k1, k2, m), brute_reps)
    if not torch.equal(fi, bi):
        raise RuntimeError(f"product-key and brute-force indices differ at N={n * n}")
    return {"N": n * n, "m": m, "T": T, "fast_s": fast, "brute_s": brute, "ratio": brute / fast}


def measure_bytes(n: int, T: int, d_key: int) -> int:
    """A floor on what :func:`measure` holds at once: queries and keys, both sides' T x n scores with
    their ranks, and one brute-force chunk of about 2^25 (at least n^2) scores with its top-m work."""
    return 4 * d_key * (T + n) + 24 * T * n + 12 * max(2**25, n * n)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="minimem bench retrieval", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="sub-keys per side at the headline point (N = n^2)")
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=1024, help="T, queries per call")
    parser.add_argument("--d-key", type=int, default=256, help="D_k (each half D_k / 2)")
    parser.add_argument("--sweep", type=int, nargs="*", default=[64, 128, 256, 512], help="n values of the sweep")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args(argv)
    for flag, value in (("--n", args.n), ("--m", args.m), ("--tokens", args.tokens)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.d_key < 2 or args.d_key % 2:
        parser.error(f"--d-key must be even and >= 2 (two halves of D_k / 2), got {args.d_key}")
    if not 0 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be in [0, {MAX_THREADS}] (0: torch's default), got {args.threads}")
    too_small = [n for n in [args.n] + args.sweep if n < args.m]
    if too_small:
        parser.error(f"every n (--n, --sweep) must be >= m={args.m}, got {too_small}")
    need = max(measure_bytes(n, args.tokens, args.d_key) for n in [args.n] + args.sweep)
    problem = memory_problem(need, torch.device("cpu"), "--n / --sweep / --tokens / --d-key")
    if problem:
        parser.error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"product-key top-m vs brute force, CPU, {torch.get_num_threads()} threads, D_k={args.d_key}, T={args.tokens}"
    )
    print("times: best of 5 runs (product keys), of 3 (brute force in the sweep), 1 (brute force at the headline)")
    head = measure(args.n, args.m, args.tokens, args.d_key, brute_reps=1, fast_reps=5)
    print(
        f"\nheadline  N={head['N']:,} (n={args.n}) m={args.m} T={args.tokens}: brute {head['brute_s'] * 1e3:.0f} ms, "
        f"product keys {head['fast_s'] * 1e3:.1f} ms, ratio {head['ratio']:.0f}x (same indices)"
    )
    rows = [
        measure(n, args.m, args.tokens, args.d_key, brute_reps=3, fast_reps=5)
        for n in tqdm(args.sweep, desc="sweep over N", leave=False)
    ]
    print(f"\n{'N':>10} {'m':>4} {'brute ms':>10} {'pk ms':>8} {'ratio':>7}")
    for r in rows + [head]:
        print(f"{r['N']:>10,} {r['m']:>4} {r['brute_s'] * 1e3:>10.1f} {r['fast_s'] * 1e3:>8.2f} {r['ratio']:>7.1f}")
    print("\nratio grows about linearly in N: brute force is O(N) per token, product keys O(sqrt(N)).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
