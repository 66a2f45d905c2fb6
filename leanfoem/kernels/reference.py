"""Pure-torch references of the fused kernels: the oracles the Triton kernels are tested against.

Why it exists: a kernel is only as trustworthy as the thing it is compared with. The references live in
leanfoem, where they are the CPU path: `block_step` is `leanfoem.solver.block_step`, the body of the
solver's block loop, with the same signature as `leanfoem.kernels.block_step.block_step`; the
references of the packing and dequantize kernels are `leanfoem.packing.pack_gptq` / `unpack_gptq`.

What must stay true:
- every in-block update is rounded twice, product then difference (`block -= outer(u, err)`), never as a
  fused multiply-add: `addr_` rounds once in the CPU's vector lanes and twice in its tails, so it has no
  rounding that another device can reproduce. With two roundings everywhere, the kernel (fp fusion off)
  reproduces this function bit for bit, on the CPU interpreter and on a GPU;
- `wt` is only read: the group grids come from it (the global W at block start), the block
  is a copy that the caller gets back for the lazy update;
- divisions are true IEEE divisions (torch's on the CPU; `div_rn` in the kernel).
"""

from __future__ import annotations

import torch

from leanfoem.packing import unpack_gptq
from leanfoem.solver import block_step  # noqa: F401  (the oracle of the fused block step)


def gptq_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq",
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [tokens, in] @ Wᵀ for a packed GPTQ layer, W dequantized by `leanfoem.packing.unpack_gptq`."""
    weight = unpack_gptq(tensors, bits, checkpoint_format).to(device=x.device)
    out = x.float() @ weight.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
