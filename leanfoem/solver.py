"""The FOEM / GPTQ / GPTAQ column loop (DESIGN §3): weights + Hessian → integer codes, scales, zeros.

Why it exists: this is the algorithm. It reproduces the reference behaviour that the FOEM authors
maintain inside GPTQModel, so results are comparable:
- GPTQ error propagation inside 128-column blocks, then one GEMM for the columns to the right;
- FOEM: err = ((w − q) − β(w − w₀)) / U_cc, and after each step the *next column of the same block* is
  pulled toward the original, w_{c+1} −= β(w_{c+1} − w₀_{c+1}) (the first column of a block never is);
- GPTAQ: in-block += w_c ⊗ P[c, c+1:] with w_c before its update, lazy += W_block · P[block, right],
  where W_block holds each column after its own step (w_c − err_c·U_cc), as in the reference;
- a group's scale and zero are fitted when the group starts, from the global W (lazy updates of earlier
  blocks applied, in-block updates of the current block not).

What must stay true:
- W is held transposed ([in, out], "Wt") so that a column is a contiguous row and every in-block update
  is a contiguous rank-1 update; the lazy update is one matmul;
- `block_step` (one block of columns) is the CPU path and the oracle of the fused Triton kernel in
  `leanfoem.kernels`, which the loop uses for float32 CUDA tensors when triton imports;
- the dequantized result is rebuilt from the stored codes, fp16 scales and zeros, so it is exactly what a
  loader of the packed checkpoint computes with;
- β = 0 and α = 0 is plain GPTQ, operation for operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

from .hessian import Factor, inverse_upper_factor
from .kernels import fused_block_step
from .packing import pack_gptq
from .quantizer import dequantize, fit_grid, max_code, quantize_codes

METHODS = ("rtn", "gptq", "gptaq", "foem")
# Damping, a fraction of mean(diag H): 0.05 had the lower KL divergence against the fp model than 0.01 on
# SmolLM2-135M at 3 and 4 bits, groups 64 and 128 (docs/BENCHMARKS.md, "Defaults: damping and β by KL divergence").
DEFAULT_DAMP = 0.05
BITS = (2, 3, 4, 8)


@dataclass
class QuantResult:
    """Codes and grid of one quantized linear layer, plus what the solve reported."""

    codes: torch.Tensor      # uint8 [in, out]
    scales: torch.Tensor     # fp16 [groups, out]
    zeros: torch.Tensor      # int32 [groups, out], the true zero points z
    g_idx: torch.Tensor      # int32 [in], group of each input column
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    loss: float              # Σ (w − q)² / U_cc²
    damp: float              # damping fraction finally used
    stats: dict = field(default_factory=dict)  # damping tried, condition estimate
    row_losses: torch.Tensor | None = None     # float64 [out]: each output row's share of `loss`

    @property
    def dequantized(self) -> torch.Tensor:
        """float32 [out, in]: exactly the weights the packed layer computes with.

        Built in chunks of 256 input columns: whole-matrix gathers of scales and zeros would cost four extra
        [in, out] fp32 temporaries at the memory peak of a layer."""
        columns, rows = self.codes.shape
        out = torch.empty((rows, columns), dtype=torch.float32, device=self.codes.device)
        scales, zeros = self.scales.float(), self.zeros.float()
        for start in range(0, columns, 256):
            stop = min(start + 256, columns)
            g = self.g_idx[start:stop].long()
            chunk = dequantize(self.codes[start:stop].float(), scales[g], zeros[g])
            out[:, start:stop] = chunk.T
        return out

    def split(self, sizes: list[int]) -> list[QuantResult]:
        """The results of the layers whose weights were stacked along the output rows, `sizes` rows each.

        Every row is solved on its own (the column loop is row-separable), so the layers of a sub-group, which
        share one input and one U, are solved as one matrix: one column loop instead of one per layer."""
        parts, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            parts.append(dataclasses.replace(
                self, codes=self.codes[:, rows], scales=self.scales[:, rows], zeros=self.zeros[:, rows],
                g_idx=self.g_idx.clone(),  # each layer's own tensor: a checkpoint shard cannot hold shared storage
                loss=self.row_losses[rows].sum().item(), row_losses=self.row_losses[rows]))
            start += size
        if start != self.codes.shape[1]:
            raise ValueError(f"split sizes add up to {start}, not {self.codes.shape[1]} rows")
        return parts

    def pack(self, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
        """{"qweight", "qzeros", "scales", "g_idx"} in the GPTQ layout (DESIGN §5)."""
        return pack_gptq(self.codes, self.zeros, self.scales, self.g_idx, self.bits, checkpoint_format)


def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor | None, *, bits: int = 4, group_size: int = 128,
                    sym: bool = True, desc_act: bool = False, method: str = "foem", alpha: float = 0.0,
                    beta: float = 0.2, damp: float = DEFAULT_DAMP, block_size: int = 128,
                    cross: torch.Tensor | None = None) -> QuantResult:
    """Quantize one linear layer's weight [out, in] given H = X·Xᵀ (up to scale) of its inputs.

    `method`: "rtn" (round to nearest, H optional), "gptq" (α = β = 0), "gptaq" (α only, needs `cross`
    = (X̃ − X)·Xᵀ on H's scale), "foem" (β, and α if given). `damp` is a fraction of mean(diag H).
    Runs on weight's device; the factorisation is fp64, the column loop fp32.
    """
    alpha, beta = method_terms(method, alpha, beta, hessian, cross)
    _check_shapes(weight, hessian, cross, bits, group_size)
    if hessian is None:
        wt = weight.detach().to(torch.float32).T.contiguous()
        return _round_to_nearest(wt, bits, group_size, sym)
    prepared = prepare_hessian(hessian, damp=damp, desc_act=desc_act, alpha=alpha, cross=cross, device=weight.device)
    return quantize_prepared(weight, prepared, bits=bits, group_size=group_size, sym=sym, method=method, beta=beta,
                             block_size=block_size)


@dataclass
class PreparedHessian:
    """Everything the column loop needs from H, shared by every layer that reads the same input."""

    upper: torch.Tensor                 # U of the (permuted) damped H, fp32
    dead: torch.Tensor                  # inputs with H_cc = 0: their weight columns are zeroed
    perm: torch.Tensor | None           # act-order permutation
    gptaq: torch.Tensor | None          # P = α·triu₁(C·Uᵀ)·U
    factor: Factor


def prepare_hessian(hessian: torch.Tensor, *, damp: float, desc_act: bool, alpha: float = 0.0,
                    cross: torch.Tensor | None = None, device=None, overwrite: bool = False) -> PreparedHessian:
    """Dead inputs, act-order and the fp64 factorisation of DESIGN §3.1/§3.5, done once per input.

    `overwrite=True` hands H's storage over (the pipeline's H is spent after this): no copy is made and U
    may end up in it — for a 28672-wide down_proj that is 3.3 GB less at the peak.
    """
    device = hessian.device if device is None else device
    # an fp64 H stays fp64 until factorised: rounding it to fp32 can already make it indefinite
    h_dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    h = hessian.detach().to(device=device, dtype=h_dtype)
    if h.data_ptr() == hessian.data_ptr() and not overwrite:  # .to() made no copy: keep the caller's H intact
        h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        h = h[perm[:, None], perm]
    factor = inverse_upper_factor(h, damp, overwrite=True)
    del h
    upper = factor.upper.to(device)
    gptaq = None
    if alpha > 0:
        c = cross.detach().to(device=device, dtype=torch.float32).clone()
        c[:, dead] = 0
        if perm is not None:
            c = c[perm][:, perm]
        gptaq = alpha * torch.triu(c @ upper.T, diagonal=1) @ upper
    return PreparedHessian(upper, dead, perm, gptaq, factor)


def quantize_prepared(weight: torch.Tensor, prepared: PreparedHessian, *, bits: int, group_size: int, sym: bool,
                      method: str, beta: float, block_size: int = 128, overwrite: bool = False) -> QuantResult:
    """The column loop for one weight [out, in] (or several stacked along the rows) with a prepared H.

    The loop works on Wt [in, out]; `overwrite=True` lets it work in `weight`'s storage when weight.T is already
    a contiguous fp32 tensor on U's device (the pipeline stacks its layers that way: one copy fewer at the peak)."""
    wt = weight.detach().to(device=prepared.upper.device, dtype=torch.float32).T
    wt = wt.contiguous() if overwrite else wt.clone(memory_format=torch.contiguous_format)  # [in, out]
    wt[prepared.dead] = 0
    if prepared.perm is not None:
        wt = wt[prepared.perm]
    if method == "rtn":
        result = _round_to_nearest(wt, bits, group_size, sym, prepared.upper.diagonal())
    else:
        result = solve_columns(wt, prepared.upper, bits=bits, group_size=group_size, sym=sym,
                               beta=0.0 if method in ("gptq", "gptaq") else beta, gptaq=prepared.gptaq,
                               block_size=block_size)
    result.damp = prepared.factor.damp
    result.stats = {"damp_tried": prepared.factor.tried, "condition": prepared.factor.condition}
    if prepared.perm is not None:
        _undo_permutation(result, prepared.perm)
    return result


def solve_columns(wt: torch.Tensor, upper: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                  beta: float = 0.0, gptaq: torch.Tensor | None = None, block_size: int = 128) -> QuantResult:
    """The column loop on Wt [in, out] (modified in place) with U = upper; computes in wt's dtype."""
    columns, rows = wt.shape
    group = columns if group_size == -1 else group_size
    original = wt.clone() if beta else None
    codes = torch.empty((columns, rows), dtype=torch.uint8, device=wt.device)
    scales = torch.empty((-(-columns // group), rows), dtype=wt.dtype, device=wt.device)
    zeros = torch.empty_like(scales)
    step = fused_block_step(wt, block_size) or block_step
    row_losses = torch.zeros(rows, dtype=torch.float64, device=wt.device)
    with _one_thread_on_cpu(wt.device):
        _column_loop(wt, upper, step, codes, scales, zeros, row_losses, bits=bits, group=group, sym=sym, beta=beta,
                     original=original, gptaq=gptaq, block_size=block_size)
    g_idx = torch.arange(columns, device=wt.device, dtype=torch.int32) // group
    return QuantResult(codes, scales.to(torch.float16), zeros.to(torch.int32), g_idx,
                       bits, group_size, sym, False, row_losses.sum().item(), 0.0, row_losses=row_losses.cpu())


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device):
    """The column loop is thousands of small row operations; split over the CPU's threads each one waits on the
    others. Measured on the 2-core machine, SmolLM2's 576×1536 down_proj: 0.09 s with one thread, 0.25–4.6 s
    with two. The results do not depend on it."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _column_loop(wt, upper, step, codes, scales, zeros, row_losses, *, bits, group, sym, beta, original, gptaq,
                 block_size) -> None:
    columns = wt.shape[0]
    for b0 in range(0, columns, block_size):
        b1 = min(b0 + block_size, columns)
        errors, block, scaled_errors = step(wt, upper, b0, b1, codes, scales, zeros, bits=bits, group=group,
                                            sym=sym, beta=beta, original=original, gptaq=gptaq)
        row_losses += scaled_errors.double().square().sum(dim=0)
        if b1 < columns:
            wt[b1:].addmm_(upper[b0:b1, b1:].T, errors, alpha=-1)
            if gptaq is not None:
                wt[b1:].addmm_(gptaq[b0:b1, b1:].T, block)


def block_step(wt: torch.Tensor, upper: torch.Tensor, b0: int, b1: int, codes: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor, *, bits: int, group: int, sym: bool, beta: float = 0.0,
               original: torch.Tensor | None = None,
               gptaq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns b0:b1 of the FOEM/GPTQ/GPTAQ column loop on Wt [in, out]: the CPU path, and the oracle of the
    fused Triton kernel `leanfoem.kernels.block_step.block_step` (same signature, same effects).

    Every in-block update is rounded twice, product then difference (`block -= outer(u, err)`), never as a
    fused multiply-add: `addr_` rounds once in the CPU's vector lanes and twice in its tails, so no other
    device could reproduce it; with two roundings everywhere the kernel matches this bit for bit.

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
    maxq = max_code(bits)
    block = wt[b0:b1].clone()
    block_original = original[b0:b1] if beta else None
    # Per-column results go straight into rows of these buffers (out= and in-place ops): on the CPU the loop
    # costs per operation, not per flop (SmolLM2-135M: ~100k columns of 576-3072 values), so fewer, allocation-free
    # operations are what makes it faster. The arithmetic is the same, operation for operation.
    float_codes = torch.empty_like(block)
    residuals = torch.empty_like(block)
    errors = torch.empty_like(block)
    diag_u = upper[b0:b1, b0:b1]
    scale, zero = scales[b0 // group], zeros[b0 // group]  # the grid in force, if its group began earlier
    for i in range(b1 - b0):
        c = b0 + i
        if c % group == 0:
            scale, zero = fit_grid(wt[c:min(c + group, columns)], bits, sym)
            scales[c // group] = scale
            zeros[c // group] = zero
        w, code, residual, err = block[i], float_codes[i], residuals[i], errors[i]
        torch.div(w, scale, out=code).round_().add_(zero).clamp_(0, maxq)       # quantize_codes
        torch.sub(code, zero, out=residual).mul_(scale)                         # dequantize
        torch.sub(w, residual, out=residual)                                    # w − q
        if block_original is None:
            err.copy_(residual)
        else:
            torch.sub(residual, torch.sub(w, block_original[i]).mul_(beta), out=err)
        err.div_(diag_u[i, i])
        w_before = w.clone() if gptaq is not None else None
        block[i:] -= torch.outer(diag_u[i, i:], err)
        if gptaq is not None:
            block[i + 1:] += torch.outer(gptaq[c, c + 1:b1], w_before)
        if block_original is not None and i + 1 < b1 - b0:
            block[i + 1] -= torch.sub(block[i + 1], block_original[i + 1]).mul_(beta)
    codes[b0:b1] = float_codes.to(torch.uint8)
    return errors, block, residuals.div_(diag_u.diagonal()[:, None])



def _round_to_nearest(wt: torch.Tensor, bits: int, group_size: int, sym: bool,
                      diag_u: torch.Tensor | None = None) -> QuantResult:
    columns, rows = wt.shape
    group = columns if group_size == -1 else group_size
    codes = torch.empty((columns, rows), dtype=torch.uint8, device=wt.device)
    scales, zeros = [], []
    row_losses = torch.zeros(rows, dtype=torch.float64, device=wt.device)
    for g0 in range(0, columns, group):
        chunk = wt[g0:g0 + group]
        scale, zero = fit_grid(chunk, bits, sym)
        code = quantize_codes(chunk, scale, zero, bits)
        codes[g0:g0 + group] = code.to(torch.uint8)
        residual = chunk - dequantize(code, scale, zero)
        if diag_u is not None:
            residual = residual / diag_u[g0:g0 + group, None]
        row_losses += residual.double().square().sum(dim=0)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(columns, device=wt.device, dtype=torch.int32) // group
    return QuantResult(codes, torch.stack(scales).to(torch.float16), torch.stack(zeros).to(torch.int32), g_idx,
                       bits, group_size, sym, False, row_losses.sum().item(), 0.0, row_losses=row_losses.cpu())


def _undo_permutation(result: QuantResult, perm: torch.Tensor) -> None:
    inverse = torch.argsort(perm)
    result.codes = result.codes[inverse]
    result.g_idx = result.g_idx[inverse]
    result.desc_act = True


def method_terms(method: str, alpha: float, beta: float, hessian, cross) -> tuple[float, float]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "gptq":
        alpha, beta = 0.0, 0.0
    elif method == "gptaq":
        beta = 0.0
        if alpha <= 0:
            raise ValueError("method 'gptaq' needs alpha > 0")
    if alpha < 0 or beta < 0:
        raise ValueError("alpha and beta must be >= 0")
    if method != "rtn" and hessian is None:
        raise ValueError(f"method {method!r} needs the Hessian of the layer's inputs")
    if alpha > 0 and cross is None:
        raise ValueError("alpha > 0 (the GPTAQ term) needs cross = (X_native - X)·Xᵀ")
    return alpha, beta


def _check_shapes(weight, hessian, cross, bits, group_size) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, not {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"group_size must be -1 (per row) or positive, not {group_size}")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    columns = weight.shape[1]
    for name, matrix in (("hessian", hessian), ("cross", cross)):
        if matrix is not None and tuple(matrix.shape) != (columns, columns):
            raise ValueError(f"{name} must be [{columns}, {columns}] for a weight with {columns} inputs, "
                             f"got {tuple(matrix.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight holds NaN or Inf")
