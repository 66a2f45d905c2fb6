"""The affine integer grid of DESIGN §3.4: per-row scale and zero for one group of columns.

Why it exists: the solver, the RTN baseline and the packer must agree on one grid, bit for bit.

What must stay true:
- min and max always include 0, so 0.0 is exactly representable;
- codes are chosen on the scale as computed (fp32 in the solver); the checkpoint stores it rounded to fp16. This is
  what the reference implementations do (GPTQ, GPTQModel's FOEM). Choosing codes on the fp16-rounded scale instead,
  so that the error feedback saw exactly the stored weights, cost SmolLM2-135M 4-bit FOEM ~2.5% perplexity over
  seven calibration draws (docs/BENCHMARKS.md, "Solver or pipeline?"): each rounding flips some codes, and the
  error feedback carries every flip into later columns, then later layers;
- `dequantize(codes, scale, zero)` is the only way a weight is reconstructed (solver and tests share it).
"""

from __future__ import annotations

import torch


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def fit_grid(columns: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row for the columns of one group.

    `columns` is [group_columns, rows] (the solver keeps W transposed); returns (scale, zero), each [rows],
    in the dtype of `columns`; zero holds integer values.
    """
    maxq = max_code(bits)
    zero_t = torch.zeros((), dtype=columns.dtype, device=columns.device)
    lo = torch.minimum(columns.amin(dim=0), zero_t)
    hi = torch.maximum(columns.amax(dim=0), zero_t)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = hi == lo  # an all-zero group: any grid works, keep it finite
    lo = torch.where(flat, -torch.ones_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    # fp16, the checkpoint's scale type, has no value below 2**-24: a tiny group would be stored with scale 0
    scale = torch.clamp_min((hi - lo) / maxq, 2.0**-24)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (in x's float dtype) of x on the grid."""
    return torch.clamp(torch.round(x / scale) + zero, 0, max_code(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)
