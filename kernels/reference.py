"""Pure-torch references of the fused kernels: the oracles the Triton kernels are tested against.

Why it exists: a kernel is only as trustworthy as the thing it is compared with. `block_step` is the body
of the block loop of `leanfoem.solver.solve_columns` factored out unchanged in meaning (DESIGN §3), with
the same signature as `kernels.block_step.block_step`, so the solver can call either one; the references
of the packing and dequantize kernels are `leanfoem.packing.pack_gptq` / `unpack_gptq`.

What must stay true:
- every in-block update is rounded twice, product then difference (`block -= outer(u, err)`), never as a
  fused multiply-add: `addr_` rounds once in the CPU's vector lanes and twice in its tails, so it has no
  rounding that another device can reproduce. With two roundings everywhere, the kernel (fp fusion off)
  reproduces this function bit for bit, on the CPU interpreter and on a GPU;
- `wt` is only read: the group grids come from it (the global W at block start, DESIGN §3.1), the block
  is a copy that the caller gets back for the lazy update;
- divisions are true IEEE divisions (torch's on the CPU; `div_rn` in the kernel).
"""

from __future__ import annotations

import torch

from leanfoem.packing import unpack_gptq
from leanfoem.quantizer import dequantize, fit_grid, quantize_codes


def block_step(wt: torch.Tensor, upper: torch.Tensor, b0: int, b1: int, codes: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, *, bits: int, group: int, sym: bool, beta: float = 0.0,
               original: torch.Tensor | None = None,
               gptaq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns b0:b1 of the FOEM/GPTQ/GPTAQ column loop on Wt [in, out].

    Reads `wt` (the global weights holding the lazy updates of earlier blocks; not modified), `upper` (U),
    `original` (W₀, needed when beta > 0) and `gptaq` (P, or None). `group` is the effective group size
    (`in` for per-row grids). Writes codes[b0:b1] (uint8 [in, out]) and scales[g], zeros[g] ([groups, out],
    wt's dtype) for every group g that starts in the block; a group that started earlier is read from
    scales/zeros. Returns (errors, block, scaled_errors), each [b1 − b0, out]: the Err of the lazy update,
    the block after its in-block updates (the W_block of the GPTAQ lazy term) and (w − q)/U_cc, whose
    squares sum to the layer loss.
    """
    if beta and original is None:
        raise ValueError("beta > 0 needs the original weights")
    columns = wt.shape[0]
    block = wt[b0:b1].clone()
    block_original = original[b0:b1] if beta else None
    errors = torch.empty_like(block)
    scaled_errors = torch.empty_like(block)
    diag_u = upper[b0:b1, b0:b1]
    scale, zero = scales[b0 // group], zeros[b0 // group]  # the grid in force, if its group began earlier
    for i in range(b1 - b0):
        c = b0 + i
        if c % group == 0:
            scale, zero = fit_grid(wt[c:min(c + group, columns)], bits, sym)
            scales[c // group] = scale
            zeros[c // group] = zero
        w = block[i]
        code = quantize_codes(w, scale, zero, bits)
        codes[c] = code.to(torch.uint8)
        residual = w - dequantize(code, scale, zero)
        d = diag_u[i, i]
        scaled_errors[i] = residual / d
        err = residual if block_original is None else residual - beta * (w - block_original[i])
        err = err / d
        w_before = w.clone() if gptaq is not None else None
        block[i:] -= torch.outer(diag_u[i, i:], err)
        if gptaq is not None:
            block[i + 1:] += torch.outer(gptaq[c, c + 1:b1], w_before)
        if block_original is not None and i + 1 < b1 - b0:
            block[i + 1] -= beta * (block[i + 1] - block_original[i + 1])
        errors[i] = err
    return errors, block, scaled_errors


def gptq_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq",
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens, in] @ Wᵀ for a packed GPTQ layer, W dequantized by `leanfoem.packing.unpack_gptq`."""
    weight = unpack_gptq(tensors, bits, checkpoint_format).to(device=x.device)
    out = x.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
