"""The memory lookup of Specification §6 as four Triton kernels and one ``torch.autograd.Function``.

    g[t, i]         = <P[idx[t, i]], x[t]>          (pre-values [UM2] §3.2; g = 1 without them)
    out[t, slice k] = sum_i s[t, i, k] g[t, i] V[idx[t, i], slice k]   (c cores, [UM] MCS)

Importing this module imports triton and defines the kernels. On CPU tensors they run in
Triton's interpreter, which is chosen when the kernels are *defined*: ``TRITON_INTERPRET=1``
must be in the environment before this module (and, to be safe, triton) is first imported.
``minimem.kernels`` imports this module lazily, on the first ``backend="triton"`` call.

Memory traffic (T tokens, m slots, c cores, table widths D_v, D_p, b bytes per table element)
----------------------------------------------------------------------------------------------
The lookup is bandwidth bound: a few flops per table element read, no reuse across tokens.

forward   reads  T m (D_v + D_p) b    the selected value and pre-value rows (the floor)
                 + T D_p + T m (8 + 4 + 4 c)   pre_input, indices, gate, scores (small, cached)
          writes T D_v + T m 4         out and the gate g, saved for the backward
backward  reads  T m (D_v + D_p) b     the rows again (score and pre_input gradients need them)
                 + T D_v               grad_out (one row per token, re-read from cache)
          RMW    T m (D_v + D_p) 4     fp32 atomic adds into grad_values, grad_pre_values
          writes N (D_v + D_p) 4       zero-fill of the dense table gradients (as index_add_)
                 + T m (c + 1) 4 + T D_p   grad_scores, grad of g, grad_pre_input

The eager reference (index_select + bmm, index_add_ backward) additionally writes and reads
back the gathered (T, m, D_v + D_p) rows in the forward, and materialises their (T, m, ...)
gradient in the backward: about three times the table traffic.

Layout
------
1. ``_gate_fwd_kernel``: one program per (token, block of BLOCK_M slots) reduces
   <P row, x> over D_p in BLOCK_P chunks. The gate needs a whole pre-value row before any
   value column can be weighted, so it is its own (cheap) kernel and g is stored for reuse.
2. ``_weighted_sum_fwd_kernel``: one program per (token, block of BLOCK_D value columns)
   loops over the m slots BLOCK_M at a time, so each step issues BLOCK_M independent row
   loads (memory-level parallelism) into one fp32 accumulator of BLOCK_D columns. A column's
   core is col // (D_v / c): the (BLOCK_M, BLOCK_D) weight tile is built with a static loop
   over the c cores and ``tl.where``, so D_v / c need not be a power of two. No ``tl.dot``:
   the contraction over m is a 1 x m times m x D_v product per token, too thin for tensor
   cores and irrelevant when bandwidth is the limit.
3. ``_weighted_sum_bwd_kernel``: one program per (token, block of slots) walks D_v once; each
   value tile is read once and used twice: per-core dot products with grad_out (the score
   gradient, and the gate gradient sum_k s_k dot_k) and the atomic add of
   s[t, i, k] g[t, i] grad_out[t] into grad_values.
4. ``_gate_bwd_kernel``: one program per (token, block of D_p columns) walks the m slots:
   grad_pre_input[t] = sum_i dg[t, i] P[idx] is owned by the program (no atomics) and
   dg[t, i] x[t] is atomically added into grad_pre_values.

Scatter-add: atomics, not sorted reverse indices. The table gradients are dense (N, D)
tensors like ``index_add_``'s. With top-m indices spread over N >> m slots, a row is hit
T m / N times per batch on average (about 2 at the 227M config and 4 at the 1B config of
[UM2] Table 10 for T = 8192), so contention is low and a relaxed fp32 atomic costs about one
read-modify-write in L2. A sort of the T m indices plus a permuted gather of grad_out and a
segmented reduction would add passes over T m elements to buy a deterministic summation
order, which training does not need. Consequence: the float summation order of the table
gradients (not their value) may change from run to run. Repeated indices, within a row or
across tokens, accumulate: each element's add is its own atomic.

Precision: tables in float32, bfloat16 or float16; every product and sum is accumulated in
float32; outputs and gradients are cast to their tensor's dtype at the end (bf16 table
gradients go through an fp32 buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minimem.kernels.reference import lookup_dtype

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gate_fwd_kernel(
    pre_values_ptr,
    pre_input_ptr,
    indices_ptr,
    gate_ptr,
    m,
    d_pre,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """gate[t, i] = <P[idx[t, i]], x[t]> for one token and BLOCK_M slots."""
    t = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    idx = tl.load(indices_ptr + t * m + offs_m, mask=mask_m, other=0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(0, d_pre, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < d_pre
        x = tl.load(pre_input_ptr + t * d_pre + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        rows = tl.load(
            pre_values_ptr + idx[:, None] * d_pre + offs_p[None, :],
            mask=mask_m[:, None] & mask_p[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(rows * x[None, :], axis=1)
    tl.store(gate_ptr + t * m + offs_m, acc, mask=mask_m)


@triton.jit
def _slot_weights(
    scores_ptr,
    gate_ptr,
    t,
    offs_m,
    mask_m,
    core,
    m,
    CORES: tl.constexpr,
    HAS_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_M, BLOCK_D) tile of s[t, i, core(col)] * g[t, i]."""
    w = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(CORES):
        s_k = tl.load(scores_ptr + (t * m + offs_m) * CORES + k, mask=mask_m, other=0.0).to(tl.float32)
        w = tl.where(core[None, :] == k, s_k[:, None], w)
    if HAS_PRE:
        g = tl.load(gate_ptr + t * m + offs_m, mask=mask_m, other=0.0)
        w = w * g[:, None]
    return w


@triton.jit
def _weighted_sum_fwd_kernel(
    values_ptr,
    indices_ptr,
    scores_ptr,
    gate_ptr,
    out_ptr,
    m,
    d_value,
    d_slice,
    CORES: tl.constexpr,
    HAS_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, cols] = sum_i s[t, i, core(col)] g[t, i] V[idx[t, i], cols] for BLOCK_D columns."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d_value
    core = offs_d // d_slice
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m
        idx = tl.load(indices_ptr + t * m + offs_m, mask=mask_m, other=0)
        w = _slot_weights(scores_ptr, gate_ptr, t, offs_m, mask_m, core, m, CORES, HAS_PRE, BLOCK_M, BLOCK_D)
        rows = tl.load(
            values_ptr + idx[:, None] * d_value + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * rows, axis=0)
    tl.store(out_ptr + t * d_value + offs_d, acc, mask=mask_d)


@triton.jit
def _weighted_sum_bwd_kernel(
    values_ptr,
    indices_ptr,
    scores_ptr,
    gate_ptr,
    grad_out_ptr,
    grad_values_ptr,
    grad_scores_ptr,
    grad_gate_ptr,
    m,
    d_value,
    d_slice,
    CORES: tl.constexpr,
    HAS_PRE: tl.constexpr,
    GRAD_VALUES: tl.constexpr,
    GRAD_DOTS: tl.constexpr,
    GRAD_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """For one token and BLOCK_M slots: dot[i, k] = <grad_out[t, slice k], V[idx, slice k]>,
    grad_scores = g dot, grad_gate = sum_k s_k dot_k, and grad_values[idx] += s g grad_out."""
    t = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    offs_c = tl.arange(0, BLOCK_C)
    idx = tl.load(indices_ptr + t * m + offs_m, mask=mask_m, other=0)
    dots = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, d_value, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_value
        mask = mask_m[:, None] & mask_d[None, :]
        core = offs_d // d_slice
        dout = tl.load(grad_out_ptr + t * d_value + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if GRAD_DOTS:
            rows = tl.load(values_ptr + idx[:, None] * d_value + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            prod = rows * dout[None, :]
            for k in tl.static_range(CORES):
                part = tl.sum(tl.where(core[None, :] == k, prod, 0.0), axis=1)
                dots += tl.where(offs_c[None, :] == k, part[:, None], 0.0)
        if GRAD_VALUES:
            w = _slot_weights(scores_ptr, gate_ptr, t, offs_m, mask_m, core, m, CORES, HAS_PRE, BLOCK_M, BLOCK_D)
            tl.atomic_add(
                grad_values_ptr + idx[:, None] * d_value + offs_d[None, :], w * dout[None, :], mask=mask, sem="relaxed"
            )
    if GRAD_DOTS:
        mask_mc = mask_m[:, None] & (offs_c[None, :] < CORES)
        if GRAD_GATE:
            s = tl.load(scores_ptr + (t * m + offs_m[:, None]) * CORES + offs_c[None, :], mask=mask_mc, other=0.0)
            tl.store(grad_gate_ptr + t * m + offs_m, tl.sum(s.to(tl.float32) * dots, axis=1), mask=mask_m)
        if HAS_PRE:
            dots = dots * tl.load(gate_ptr + t * m + offs_m, mask=mask_m, other=0.0)[:, None]
        tl.store(grad_scores_ptr + (t * m + offs_m[:, None]) * CORES + offs_c[None, :], dots, mask=mask_mc)


@triton.jit
def _gate_bwd_kernel(
    pre_values_ptr,
    pre_input_ptr,
    indices_ptr,
    grad_gate_ptr,
    grad_pre_values_ptr,
    grad_pre_input_ptr,
    m,
    d_pre,
    GRAD_PRE_VALUES: tl.constexpr,
    GRAD_PRE_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """For one token and BLOCK_P pre-value columns: grad_pre_input[t] = sum_i dg[t, i] P[idx],
    grad_pre_values[idx] += dg[t, i] x[t]."""
    t = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < d_pre
    x = tl.load(pre_input_ptr + t * d_pre + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m
        mask = mask_m[:, None] & mask_p[None, :]
        idx = tl.load(indices_ptr + t * m + offs_m, mask=mask_m, other=0)
        dg = tl.load(grad_gate_ptr + t * m + offs_m, mask=mask_m, other=0.0)
        if GRAD_PRE_INPUT:
            rows = tl.load(pre_values_ptr + idx[:, None] * d_pre + offs_p[None, :], mask=mask, other=0.0)
            acc += tl.sum(dg[:, None] * rows.to(tl.float32), axis=0)
        if GRAD_PRE_VALUES:
            tl.atomic_add(
                grad_pre_values_ptr + idx[:, None] * d_pre + offs_p[None, :],
                dg[:, None] * x[None, :],
                mask=mask,
                sem="relaxed",
            )
    if GRAD_PRE_INPUT:
        tl.store(grad_pre_input_ptr + t * d_pre + offs_p, acc, mask=mask_p)


def _block(n: int, cap: int) -> int:
    """Power-of-two block covering n, at least 16 and at most cap."""
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _column_block(width: int, cap: int = 128) -> int:
    """Column tile: the largest power of two <= cap dividing width (no masked lanes, e.g. 64 for
    D = 192) when that is >= 32, else the power of two covering width up to cap (masked tail)."""
    block = cap
    while block >= 32:
        if width % block == 0:
            return block
        block //= 2
    return _block(width, cap)


def block_sizes(m: int, d_value: int, d_pre: int) -> dict:
    """Tile sizes: BLOCK_M slots per step, BLOCK_D value columns, BLOCK_P pre-value columns."""
    return {"BLOCK_M": _block(m, 16), "BLOCK_D": _column_block(d_value), "BLOCK_P": _column_block(d_pre)}


def interpreter_enabled() -> bool:
    """True if this module's kernels were defined under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gate_fwd_kernel, InterpretedFunction)


def _check_backend_inputs(*tensors) -> None:
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"backend='triton' supports float32, bfloat16 and float16 tensors, got {t.dtype} "
                "(use backend='torch' for float64)"
            )
    device = tensors[0].device
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
            "before triton and minimem.kernels.triton_lookup are first imported (or use backend='torch')"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on cuda (or cpu with TRITON_INTERPRET=1) tensors, got {device}")


class MemoryLookupFunction(torch.autograd.Function):
    """Autograd wrapper: forward = kernels 1-2, backward = kernels 3-4 (module docstring)."""

    @staticmethod
    def forward(ctx, values, indices, scores, pre_values, pre_input):
        values, indices, scores = values.contiguous(), indices.contiguous(), scores.contiguous()
        has_pre = pre_values is not None
        if has_pre:
            pre_values, pre_input = pre_values.contiguous(), pre_input.contiguous()
        T, m = indices.shape
        d_value, cores = values.shape[1], scores.shape[2]
        d_pre = pre_values.shape[1] if has_pre else 1
        blocks = block_sizes(m, d_value, d_pre)
        out = torch.empty(T, d_value, device=values.device, dtype=lookup_dtype(values, scores, pre_values, pre_input))
        gate = torch.empty(T, m, device=values.device, dtype=torch.float32) if has_pre else None
        if T > 0 and m > 0:
            if has_pre:
                _gate_fwd_kernel[(T, triton.cdiv(m, blocks["BLOCK_M"]))](
                    pre_values,
                    pre_input,
                    indices,
                    gate,
                    m,
                    d_pre,
                    BLOCK_M=blocks["BLOCK_M"],
                    BLOCK_P=blocks["BLOCK_P"],
                )
            _weighted_sum_fwd_kernel[(T, triton.cdiv(d_value, blocks["BLOCK_D"]))](
                values,
                indices,
                scores,
                gate if has_pre else scores,
                out,
                m,
                d_value,
                d_value // cores,
                CORES=cores,
                HAS_PRE=has_pre,
                BLOCK_M=blocks["BLOCK_M"],
                BLOCK_D=blocks["BLOCK_D"],
            )
        else:
            out.zero_()
        ctx.save_for_backward(values, indices, scores, pre_values, pre_input, gate)
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, scores, pre_values, pre_input, gate = ctx.saved_tensors
        need_values, _, need_scores, need_pre_values, need_pre_input = ctx.needs_input_grad
        has_pre = pre_values is not None
        need_gate = has_pre and (need_pre_values or need_pre_input)
        grad_out = grad_out.contiguous()
        T, m = indices.shape
        d_value, cores = values.shape[1], scores.shape[2]
        blocks, device = ctx.blocks, values.device
        f32 = dict(device=device, dtype=torch.float32)
        grad_values = torch.zeros(values.shape, **f32) if need_values else None
        grad_scores = torch.empty(scores.shape, **f32) if (need_scores or need_gate) else None
        grad_gate = torch.empty(T, m, **f32) if need_gate else None
        grad_pre_values = grad_pre_input = None
        if T > 0 and m > 0 and (need_values or grad_scores is not None):
            dummy = grad_out
            _weighted_sum_bwd_kernel[(T, triton.cdiv(m, blocks["BLOCK_M"]))](
                values,
                indices,
                scores,
                gate if has_pre else dummy,
                grad_out,
                grad_values if need_values else dummy,
                grad_scores if grad_scores is not None else dummy,
                grad_gate if need_gate else dummy,
                m,
                d_value,
                d_value // cores,
                CORES=cores,
                HAS_PRE=has_pre,
                GRAD_VALUES=need_values,
                GRAD_DOTS=grad_scores is not None,
                GRAD_GATE=need_gate,
                BLOCK_M=blocks["BLOCK_M"],
                BLOCK_C=triton.next_power_of_2(cores),
                BLOCK_D=blocks["BLOCK_D"],
            )
        if need_gate:
            d_pre = pre_values.shape[1]
            grad_pre_values = torch.zeros(pre_values.shape, **f32) if need_pre_values else None
            grad_pre_input = torch.empty(pre_input.shape, **f32) if need_pre_input else None
            if T > 0 and m > 0:
                _gate_bwd_kernel[(T, triton.cdiv(d_pre, blocks["BLOCK_P"]))](
                    pre_values,
                    pre_input,
                    indices,
                    grad_gate,
                    grad_pre_values if need_pre_values else grad_gate,
                    grad_pre_input if need_pre_input else grad_gate,
                    m,
                    d_pre,
                    GRAD_PRE_VALUES=need_pre_values,
                    GRAD_PRE_INPUT=need_pre_input,
                    BLOCK_M=blocks["BLOCK_M"],
                    BLOCK_P=blocks["BLOCK_P"],
                )
            elif need_pre_input:
                grad_pre_input.zero_()  # m == 0: nothing was read

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        return (
            cast(grad_values, values),
            None,
            cast(grad_scores, scores) if need_scores else None,
            cast(grad_pre_values, pre_values),
            cast(grad_pre_input, pre_input),
        )


def memory_lookup_triton(values, indices, scores, pre_values=None, pre_input=None):
    """Specification §6 lookup with the Triton kernels (inputs already checked by ``memory_lookup``)."""
    _check_backend_inputs(values, scores, pre_values, pre_input)
    return MemoryLookupFunction.apply(values, indices, scores, pre_values, pre_input)
