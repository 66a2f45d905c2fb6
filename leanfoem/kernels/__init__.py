"""Fused Triton kernels for the GPU hot paths, each tested against a pure-torch reference in leanfoem
(re-exported by `leanfoem.kernels.reference`).

Why it exists: on a GPU the column loop is launch-bound and packing/dequantizing in torch materialises
int64 temporaries; these kernels do the same work in one launch each.

What must stay true:
- Triton is optional (the `kernels` extra): importing this package never imports triton;
  `fused_available()` says whether the kernels can run, and `fused_block_step(wt)` gives the fused block
  step where it applies (float32 CUDA tensors) and None otherwise, so the solver keeps its own reference;
- this package imports nothing from the solver, so the solver can import it at module level;
- it lives inside leanfoem's namespace: a top-level `kernels` would shadow Hugging Face's `kernels`
  package, which transformers imports.

- `block_step.block_step` — one 128-column block of the FOEM/GPTQ/GPTAQ loop (oracle:
  `reference.block_step`, the body of the block loop of `leanfoem.solver.solve_columns`);
- `pack.pack_gptq` — codes/zeros → GPTQ int32 words (oracle: `leanfoem.packing.pack_gptq`);
- `dequant.gptq_matmul` / `dequantize_gptq` — x @ Wᵀ straight from a packed layer (oracle:
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


def fused_block_step(wt: torch.Tensor, block_size: int = 128):
    """The fused block step for `wt` when it applies (float32 CUDA tensor, blocks of at most 128 columns,
    triton importable), else None."""
    if wt.is_cuda and wt.dtype == torch.float32 and block_size <= 128 and fused_available():
        from leanfoem.kernels.block_step import block_step
        return block_step
    return None


__all__ = ["fused_available", "fused_block_step"]
