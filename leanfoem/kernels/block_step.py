"""Fused Triton kernel for one 128-column block of the FOEM/GPTQ/GPTAQ column loop.

Why it exists: on a GPU the torch column loop is launch-bound — per column about ten tiny kernels
(quantize, residual, rank-1 update, GPTAQ term, next-column pull), 128 columns per block, so a 28672-input
down_proj is ~37k launches of a few microseconds each. Given U (and P), every output feature (a column of
Wt) is independent, so one program owns a tile of output features, keeps the whole block of that tile in
registers and runs all its column steps without leaving the kernel. The lazy update to the right stays a
torch matmul (`addmm_`), where the GPU is efficient anyway.

What must stay true (the oracle is `leanfoem.kernels.reference.block_step`, same signature):
- bit-for-bit the same codes: every division is `div_rn` (IEEE), every update is product then difference
  (the kernel is compiled with fp fusion off), rounding is round-half-to-even as torch.round;
- group grids are fitted from `wt` at block start (the global W), read from global memory, so a
  group that starts inside the block but ends past it (or a per-row grid, group = in) is fitted in-kernel
  from the columns to its right too; a group that began in an earlier block is read back from `scales`;
- `wt` is only read; the updated block, the errors and the scaled errors go to fresh [width, out] buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import block_step as reference_block_step  # noqa: F401  (the oracle, re-exported)

TILE = 8       # output features per program; tuned on an H100 (tools/bench_kernels.py, docs/BENCHMARKS.md)
NUM_WARPS = 1
CHUNK = 32     # columns of wt read per step when fitting a group grid


@triton.jit
def _rint(x):
    """Round half to even, as torch.round (libdevice has rint, the interpreter does not)."""
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _block_step_kernel(wt_ptr, u_ptr, w0_ptr, p_ptr, codes_ptr, serr_ptr, scales_ptr, zeros_ptr, err_ptr, blk_ptr,
                       rows, columns, b0, width, group, beta,
                       s_wt, t_wt, s_u, t_u, s_w0, t_w0, s_p, t_p, s_codes, t_codes,
                       s_sc, t_sc, s_z, t_z, s_out,
                       MAXQ: tl.constexpr, SYM: tl.constexpr, HAS_BETA: tl.constexpr, HAS_P: tl.constexpr,
                       BLOCK: tl.constexpr, TILE: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    offs_r = pid * TILE + tl.arange(0, TILE)
    rmask = offs_r < rows
    offs_b = tl.arange(0, BLOCK)
    bmask = offs_b < width
    m2 = bmask[:, None] & rmask[None, :]
    blk = tl.load(wt_ptr + (b0 + offs_b)[:, None] * s_wt + offs_r[None, :] * t_wt, mask=m2, other=0.0)
    if HAS_BETA:
        w0 = tl.load(w0_ptr + (b0 + offs_b)[:, None] * s_w0 + offs_r[None, :] * t_w0, mask=m2, other=0.0)
    errs = tl.zeros([BLOCK, TILE], dtype=tl.float32)
    # the grid in force at block start (its group began in an earlier block; else replaced at i = 0)
    carry = rmask & ((offs_r * 0 + b0 % group) != 0)
    scale = tl.load(scales_ptr + (b0 // group) * s_sc + offs_r * t_sc, mask=carry, other=1.0)
    zero = tl.load(zeros_ptr + (b0 // group) * s_z + offs_r * t_z, mask=carry, other=0.0)
    for i in range(0, width):
        c = b0 + i
        if c % group == 0:
            end = tl.minimum(c + group, columns)
            lo = tl.zeros([TILE], dtype=tl.float32)  # min and max always include 0
            hi = tl.zeros([TILE], dtype=tl.float32)
            for k0 in range(c, end, CHUNK):
                offs_k = k0 + tl.arange(0, CHUNK)
                x = tl.load(wt_ptr + offs_k[:, None] * s_wt + offs_r[None, :] * t_wt,
                            mask=(offs_k < end)[:, None] & rmask[None, :], other=0.0)
                lo = tl.minimum(lo, tl.min(x, axis=0))
                hi = tl.maximum(hi, tl.max(x, axis=0))
            if SYM:
                hi = tl.maximum(-lo, hi)
                lo = -hi
            flat = hi == lo
            lo = tl.where(flat, -1.0, lo)
            hi = tl.where(flat, 1.0, hi)
            scale = tl.math.div_rn(hi - lo, tl.full([TILE], MAXQ, tl.float32))
            scale = tl.maximum(scale, 5.960464477539063e-08)  # 2**-24, the smallest fp16 value (stored scale type)
            if SYM:
                zero = tl.full([TILE], (MAXQ + 1) // 2, tl.float32)
            else:
                zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-lo, scale)), 0.0), MAXQ)
            tl.store(scales_ptr + (c // group) * s_sc + offs_r * t_sc, scale, mask=rmask)
            tl.store(zeros_ptr + (c // group) * s_z + offs_r * t_z, zero, mask=rmask)
        sel = (offs_b == i)[:, None]
        w = tl.sum(tl.where(sel, blk, 0.0), axis=0)
        code = tl.minimum(tl.maximum(_rint(tl.math.div_rn(w, scale)) + zero, 0.0), MAXQ)
        tl.store(codes_ptr + c * s_codes + offs_r * t_codes, code.to(tl.uint8), mask=rmask)
        residual = w - scale * (code - zero)
        d = tl.load(u_ptr + c * s_u + c * t_u)
        tl.store(serr_ptr + i * s_out + offs_r, tl.math.div_rn(residual, d + tl.zeros([TILE], tl.float32)),
                 mask=rmask)
        if HAS_BETA:
            w0c = tl.sum(tl.where(sel, w0, 0.0), axis=0)
            err = residual - beta * (w - w0c)
        else:
            err = residual
        err = tl.math.div_rn(err, d + tl.zeros([TILE], tl.float32))
        u_row = tl.load(u_ptr + c * s_u + (b0 + offs_b) * t_u, mask=bmask & (offs_b >= i), other=0.0)
        blk = blk - u_row[:, None] * err[None, :]
        if HAS_P:
            p_row = tl.load(p_ptr + c * s_p + (b0 + offs_b) * t_p, mask=bmask & (offs_b > i), other=0.0)
            blk = blk + p_row[:, None] * w[None, :]
        if HAS_BETA:
            nxt = (offs_b == i + 1)[:, None]
            blk = tl.where(nxt, blk - beta * (blk - w0), blk)
        errs = tl.where(sel, err[None, :], errs)
    tl.store(err_ptr + offs_b[:, None] * s_out + offs_r[None, :], errs, mask=m2)
    tl.store(blk_ptr + offs_b[:, None] * s_out + offs_r[None, :], blk, mask=m2)


def block_step(wt: torch.Tensor, upper: torch.Tensor, b0: int, b1: int, codes: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, *, bits: int, group: int, sym: bool, beta: float = 0.0,
               original: torch.Tensor | None = None, gptaq: torch.Tensor | None = None, tile: int = TILE,
               num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused version of `leanfoem.kernels.reference.block_step` (same arguments, same effects); float32 tensors.

    Blocks up to 128 columns wide in one launch (a wider block raises).
    """
    columns, rows = wt.shape
    width = b1 - b0
    if not 0 < width <= 128:
        raise ValueError(f"block_step handles 1..128 columns per call, not {width}")
    if beta and original is None:
        raise ValueError("beta > 0 needs the original weights")
    for name, t in (("wt", wt), ("upper", upper), ("original", original), ("gptaq", gptaq),
                    ("scales", scales), ("zeros", zeros)):
        if t is not None and t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 for the fused kernel, not {t.dtype}")
        if t is not None and t.device != wt.device:
            raise ValueError(f"{name} is on {t.device}, wt on {wt.device}")
    errors = torch.empty((width, rows), dtype=torch.float32, device=wt.device)
    block = torch.empty_like(errors)
    scaled_errors = torch.empty_like(errors)
    w0 = original if beta else wt          # any valid pointer when unused
    p = gptaq if gptaq is not None else upper
    _block_step_kernel[(triton.cdiv(rows, tile),)](
        wt, upper, w0, p, codes, scaled_errors, scales, zeros, errors, block,
        rows, columns, b0, width, group, float(beta),
        *wt.stride(), *upper.stride(), *w0.stride(), *p.stride(), *codes.stride(),
        *scales.stride(), *zeros.stride(), errors.stride(0),
        MAXQ=(1 << bits) - 1, SYM=bool(sym), HAS_BETA=bool(beta), HAS_P=gptaq is not None,
        BLOCK=128, TILE=tile, CHUNK=CHUNK, num_warps=num_warps, enable_fp_fusion=False)
    return errors, block, scaled_errors
