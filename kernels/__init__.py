"""Fused Triton kernels for the GPU hot paths, each with a pure-torch reference in leanfoem
(re-exported by `kernels.reference`).

Why it exists: on a GPU the column loop is launch-bound and packing/dequantizing in torch materialises
int64 temporaries; these kernels do the same work in one launch each. Triton is optional (the `kernels`
extra): importing this package never imports triton; `fused_available()` says whether the kernels can
run, and `block_step_for(wt)` picks the fused block step for float32 CUDA tensors and the reference
otherwise, so callers need no branch of their own.

- `kernels.block_step.block_step` — one 128-column block of the FOEM/GPTQ/GPTAQ loop (oracle:
  `kernels.reference.block_step`, the body of the block loop of `leanfoem.solver.solve_columns`);
- `kernels.pack.pack_gptq` — codes/zeros → GPTQ int32 words (oracle: `leanfoem.packing.pack_gptq`);
- `kernels.dequant.gptq_matmul` / `dequantize_gptq` — x @ Wᵀ straight from a packed layer (oracle:
  `leanfoem.packing.unpack_gptq`).
"""

from __future__ import annotations

import functools

import torch



@functools.cache
def fused_available() -> bool:
    """True when triton imports (on a GPU it compiles; on a CPU only TRITON_INTERPRET=1 runs it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_step_for(wt: torch.Tensor, block_size: int = 128):
    """The block step to use for `wt`: fused on float32 CUDA tensors when triton is there (and blocks are at
    most 128 columns wide), else the reference."""
    from leanfoem.solver import _block_step_for
    return _block_step_for(wt, block_size)


__all__ = ["fused_available", "block_step_for"]
