"""Triton kernel packing integer codes into the GPTQ int32 layout on the device.

Why it exists: `leanfoem.packing.pack_rows` builds int64 temporaries and loops over the 32 values of a run
in Python — 32 × (shift, mask, or) launches and 2× the codes' size in int64 scratch per tensor. This kernel
reads each code once and writes each word once.

What must stay true (oracle: `leanfoem.packing.pack_gptq`, bit for bit):
- one little-endian bit stream per 32 values: value k of a run starts at bit bits·k, lowest index in the
  lowest bits; for 3 bits a run fills 3 words and values 10 and 21 straddle word boundaries;
- qweight packs along in_features, qzeros along out_features; "gptq" stores (z − 1) masked to `bits`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanfoem.packing import FORMATS


@triton.jit
def _pack_kernel(src_ptr, dst_ptr, m, s_src0, s_src1, s_dst0, s_dst1, offset,
                 BITS: tl.constexpr, TN: tl.constexpr):
    """Word `pid0` of every column in a tile: its run r = pid0 // BITS holds values 32r..32r+31."""
    word = tl.program_id(0)
    run = word // BITS
    j = word % BITS                          # which word of the run
    offs_n = tl.program_id(1) * TN + tl.arange(0, TN)
    nmask = offs_n < m
    k = tl.arange(0, 32)
    v = tl.load(src_ptr + (run * 32 + k)[:, None] * s_src0 + offs_n[None, :] * s_src1, mask=nmask[None, :], other=0)
    v = (v.to(tl.int64) - offset) & ((1 << BITS) - 1)
    start = k * BITS
    first = start // 32                      # the word a value starts in
    shift = start % 32
    low = tl.where((first == j)[:, None], v << shift[:, None], 0)
    spill = (first + 1 == j) & (shift + BITS > 32)  # the high bits of a value that straddles into word j
    high = tl.where(spill[:, None], v >> tl.where(spill, 32 - shift, 0)[:, None], 0)
    packed = tl.sum(low | high, axis=0) & 0xFFFFFFFF  # disjoint bit fields: the sum is their or
    packed = tl.where(packed >= 2147483648, packed - 4294967296, packed)
    tl.store(dst_ptr + word * s_dst0 + offs_n * s_dst1, packed.to(tl.int32), mask=nmask)


def pack_rows(values: torch.Tensor, bits: int, offset: int = 0, tn: int = 64) -> torch.Tensor:
    """Pack integer values [n, m] (0 ≤ v − offset < 2**bits after masking) along dim 0 into int32 [n·bits/32, m]."""
    n, m = values.shape
    if n % 32:
        raise ValueError(f"cannot pack {n} values along a dimension that is not a multiple of 32")
    out = torch.empty((n * bits // 32, m), dtype=torch.int32, device=values.device)
    _pack_kernel[(n * bits // 32, triton.cdiv(m, tn))](values, out, m, *values.stride(), *out.stride(), offset,
                                                       BITS=bits, TN=tn)
    return out


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
              checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """codes [in, out], zeros [groups, out] (true z), scales fp16 [groups, out] → GPTQ tensors, on their device."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, not {checkpoint_format!r}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, not {bits}")
    zeros = zeros.to(torch.int32)
    qzeros_t = pack_rows(zeros.T, bits, offset=1 if checkpoint_format == "gptq" else 0)  # [out·bits/32, groups]
    return {
        "qweight": pack_rows(codes, bits),
        "qzeros": qzeros_t.T.contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
