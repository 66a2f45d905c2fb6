"""Triton kernels reading a packed GPTQ layer: dequantize, and x @ Wᵀ with the dequantization fused in.

Why it exists: streaming evaluation runs every calibration/evaluation row through quantized blocks; in torch
that means unpacking every layer to a dense fp32 weight (int64 temporaries, 32 passes per run of values)
before a matmul. Here each program unpacks only the [BLOCK_K, BLOCK_N] weight tile it multiplies with.

What must stay true (oracle: `leanfoem.packing.unpack_gptq`, the dequantized weights bit for bit):
- code k of an output column starts at bit bits·k of its column of qweight (3-bit values straddle words);
  zero of output n starts at bit bits·n of its group's row of qzeros; "gptq" stores (z − 1) masked;
- W[n, k] = scale[g, n] · (code − z) in float32 with g = g_idx[k] (act-order needs nothing else);
- float32 inputs are multiplied in IEEE fp32 (no TF32), half inputs in their dtype with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanfoem.packing import FORMATS


@triton.jit
def _unpack(lo_word, hi_word, shift, BITS: tl.constexpr):
    """The BITS-bit value starting at bit `shift` of lo_word, continued in hi_word when it straddles (uint32)."""
    spill = shift + BITS > 32
    value = (lo_word >> shift) | tl.where(spill, hi_word << tl.where(spill, 32 - shift, 0), 0)
    return value & ((1 << BITS) - 1)


@triton.jit
def _weight_tile(qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, kmask, nmask, s_qw, s_qz, s_sc,
                 BITS: tl.constexpr, V2: tl.constexpr):
    """Dequantized W tile [BLOCK_K, BLOCK_N] (float32) for inputs offs_k and outputs offs_n."""
    m2 = kmask[:, None] & nmask[None, :]
    pos = offs_k * BITS
    word, shift = pos // 32, (pos % 32).to(tl.uint32)
    spill = (shift + BITS > 32)[:, None]
    lo = tl.load(qw_ptr + word[:, None] * s_qw + offs_n[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(qw_ptr + (word + 1)[:, None] * s_qw + offs_n[None, :], mask=m2 & spill,
                 other=0).to(tl.uint32, bitcast=True)
    code = _unpack(lo, hi, shift[:, None], BITS)
    g = tl.load(g_ptr + offs_k, mask=kmask, other=0)
    zpos = offs_n * BITS
    zword, zshift = zpos // 32, (zpos % 32).to(tl.uint32)
    zspill = (zshift + BITS > 32)[None, :]
    zlo = tl.load(qz_ptr + g[:, None] * s_qz + zword[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
    zhi = tl.load(qz_ptr + g[:, None] * s_qz + (zword + 1)[None, :], mask=m2 & zspill,
                  other=0).to(tl.uint32, bitcast=True)
    zero = _unpack(zlo, zhi, zshift[None, :], BITS)
    if not V2:
        zero = (zero + 1) & ((1 << BITS) - 1)
    scale = tl.load(sc_ptr + g[:, None] * s_sc + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
    return scale * (code.to(tl.float32) - zero.to(tl.float32))


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, sc_ptr, g_ptr, out_ptr, n_in, n_out, s_qw, s_qz, s_sc, s_out,
                    BITS: tl.constexpr, V2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask, nmask = offs_k < n_in, offs_n < n_out
    w = _weight_tile(qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, kmask, nmask, s_qw, s_qz, s_sc, BITS, V2)
    tl.store(out_ptr + offs_n[None, :] * s_out + offs_k[:, None], w, mask=kmask[:, None] & nmask[None, :])


@triton.jit
def _matmul_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, g_ptr, bias_ptr, out_ptr, tokens, n_in, n_out,
                   s_x0, s_x1, s_qw, s_qz, s_sc, s_o0, s_o1,
                   BITS: tl.constexpr, V2: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = offs_m < tokens, offs_n < n_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < n_in
        x = tl.load(x_ptr + offs_m[:, None] * s_x0 + offs_k[None, :] * s_x1, mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        w = _weight_tile(qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, kmask, nmask, s_qw, s_qz, s_sc, BITS, V2)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * s_o0 + offs_n[None, :] * s_o1, acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def _check(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> tuple[int, int]:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, not {checkpoint_format!r}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, not {bits}")
    qweight = tensors["qweight"]
    n_in, n_out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    for name in ("qweight", "qzeros", "scales"):
        if tensors[name].stride(-1) != 1:
            raise ValueError(f"{name} must have contiguous rows")
    return n_in, n_out


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq",
                    block_k: int = 32, block_n: int = 64) -> torch.Tensor:
    """Dequantized float32 weight [out, in] of a packed GPTQ layer (= `leanfoem.packing.unpack_gptq`)."""
    n_in, n_out = _check(tensors, bits, checkpoint_format)
    qw, qz, sc, g = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    out = torch.empty((n_out, n_in), dtype=torch.float32, device=qw.device)
    grid = (triton.cdiv(n_in, block_k), triton.cdiv(n_out, block_n))
    _dequant_kernel[grid](qw, qz, sc, g.to(torch.int32), out, n_in, n_out, qw.stride(0), qz.stride(0), sc.stride(0),
                          out.stride(0), BITS=bits, V2=checkpoint_format == "gptq_v2", BLOCK_K=block_k,
                          BLOCK_N=block_n)
    return out


def gptq_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq",
                bias: torch.Tensor | None = None, block_m: int = 128, block_n: int = 128, block_k: int = 64,
                num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """x [tokens, in] @ Wᵀ (+ bias) for a packed GPTQ layer, in x's dtype; W is never materialised.

    Tile defaults: best on an H100 for 2048 fp16 tokens (tools/bench_kernels.py). There, unpacking to a dense
    fp16 W and calling cuBLAS is ~3× faster on a 28672-input layer; this kernel's point is memory (no dense W).
    """
    n_in, n_out = _check(tensors, bits, checkpoint_format)
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must be [tokens, {n_in}], got {tuple(x.shape)}")
    qw, qz, sc, g = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    out = torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(x.shape[0], block_m), triton.cdiv(n_out, block_n))
    _matmul_kernel[grid](x, qw, qz, sc, g.to(torch.int32), bias if bias is not None else sc, out, x.shape[0], n_in,
                         n_out, *x.stride(), qw.stride(0), qz.stride(0), sc.stride(0), *out.stride(),
                         BITS=bits, V2=checkpoint_format == "gptq_v2", HAS_BIAS=bias is not None,
                         IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         num_warps=num_warps, num_stages=num_stages)
    return out
