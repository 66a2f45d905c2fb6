"""Second-order statistics of a linear layer's inputs, and their fp64 factorisation (DESIGN §3, §3.5).

Why it exists: the solver needs U, the upper Cholesky factor of (H + λI)⁻¹. Every other GPTQ tool
factorises in fp32 and retries with more damping (or silently falls back to round-to-nearest); on
long-context calibration fp32 rejects Hessians that fp64 factorises without extra damping. fp64 is
only used here, for O(n³) work done once per layer; the column loop runs in fp32.

What must stay true:
- H is accumulated as fp32 partial sums of Xᵀ·X, one unit at a time, in the order the units arrive: a unit is
  one calibration row (or, for an expert, the tokens one fixed window of rows routes to it), cut into chunks
  of at most `chunk_tokens` tokens (memory does not grow with T). The units and the chunks are fixed by the
  calibration and the settings, never by the forward batch or free memory, so H has the same bits whatever
  batch the rows came in;
- `scaled()` returns (2/T)·Σ XᵀX; the scale does not matter to the solver (damping is relative) but keeps
  GPTAQ's cross term on the same scale as H;
- damping is raised only when a factorisation fails, every value tried is reported, and a matrix that
  cannot be factorised raises `FactorizationError` — never a silent fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg.blas
import scipy.linalg.lapack
import torch

# The Gram update (_add_gram) makes no BLAS call wider than GRAM_TILE columns, and copies at most GRAM_TILE ×
# GRAM_TILE_TOKENS input values at once (64 MiB in fp32) for a diagonal tile. 8192, not less: a hidden-8192 input
# stays one syrk call (4096-wide tiles made its Gram update 1.5x slower, docs/BENCHMARKS.md).
GRAM_TILE = 8192
GRAM_TILE_TOKENS = 2048
# The CPU factorisation hands a matrix up to FACTOR_WHOLE wide to LAPACK whole; a wider one goes by FACTOR_BLOCK
# tiles (_factor_blocked): one 28672-wide dpotrf crashed (SIGSEGV) in scipy's multi-threaded OpenBLAS on an AVX-512
# Xeon (tools/check_full_width.py).
FACTOR_WHOLE = 8192
FACTOR_BLOCK = 4096
DAMP_CEILING = 1.0  # fraction of mean(diag H); beyond this the layer is effectively round-to-nearest


class FactorizationError(RuntimeError):
    """H + λI could not be factorised even at the largest damping tried."""


class HessianAccumulator:
    """Folds layer inputs into H = Σ XᵀX (and, for GPTAQ, C = Σ (X̃ − X)ᵀX), unit by unit.

    `add_batch(x)` takes x [rows, tokens, n] (each row one unit, added in row order) or x [tokens, n] (one unit);
    `x_native` are the same layer's inputs in the unquantized model (only when `track_cross`). A unit is consumed
    in chunks of `chunk_tokens`, so a long row never needs a second full-size fp32 copy, and a unit's sum never
    depends on how many other rows shared its batch.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", *, track_cross: bool = False,
                 dtype: torch.dtype = torch.float32, chunk_tokens: int = 8192):
        self.columns = columns
        self.tokens = 0
        self.chunk_tokens = chunk_tokens
        self.sum_xx = torch.zeros((columns, columns), dtype=dtype, device=device)
        self.sum_dx = torch.zeros_like(self.sum_xx) if track_cross else None

    def add_batch(self, x: torch.Tensor, x_native: torch.Tensor | None = None) -> None:
        if self.sum_dx is not None and x_native is None:
            raise ValueError("this accumulator tracks the GPTAQ cross term: pass x_native")
        units = x.reshape(-1, x.shape[-2], self.columns) if x.dim() > 2 else x[None]
        natives = None
        if self.sum_dx is not None:
            natives = x_native.reshape(units.shape)
        for i, unit in enumerate(units):
            self._add_unit(unit, None if natives is None else natives[i])

    def _add_unit(self, x: torch.Tensor, x_native: torch.Tensor | None) -> None:
        dtype, device = self.sum_xx.dtype, self.sum_xx.device
        for start in range(0, x.shape[0], self.chunk_tokens):
            chunk = x[start:start + self.chunk_tokens].to(device=device, dtype=dtype)
            _add_gram(self.sum_xx, chunk)
            if self.sum_dx is not None:
                native = x_native[start:start + self.chunk_tokens].to(device=device, dtype=dtype)
                self.sum_dx.addmm_((native - chunk).T, chunk)
        self.tokens += x.shape[0]

    def scaled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(H, cross) = (2/T)·sums, scaled in place (no second n×n copy): the accumulator is spent after this."""
        if self.tokens == 0:
            raise ValueError("no inputs were accumulated")
        factor = 2.0 / self.tokens
        cross = None if self.sum_dx is None else self.sum_dx.mul_(factor)
        hessian = self.sum_xx.mul_(factor)
        if _gram_by_syrk(hessian):
            _mirror_lower(hessian)
        self.sum_xx = self.sum_dx = None
        return hessian, cross


def _gram_by_syrk(total: torch.Tensor) -> bool:
    return total.device.type == "cpu" and total.dtype in (torch.float32, torch.float64)


def _add_gram(total: torch.Tensor, chunk: torch.Tensor) -> None:
    """total += chunkᵀ·chunk, into the lower triangle only on the CPU (`scaled()` mirrors it): half gemm's flops,
    and the Hessian accumulation is a fifth of a CPU run's time (SmolLM2-135M: 17.6 of 86 s with gemm).

    No BLAS call is wider than GRAM_TILE columns: one 28672-wide ssyrk (a 70B down_proj) kills the process with
    SIGSEGV in scipy 1.17's multi-threaded OpenBLAS 0.3.30 on AVX-512 Xeons (24576 wide still passes there).
    A wider Hessian goes tile by tile: the diagonal tiles by syrk, the tiles below them by torch's gemm."""
    if not _gram_by_syrk(total):
        total.addmm_(chunk.T, chunk)
        return
    chunk = chunk.contiguous()
    n = total.shape[0]
    if n <= GRAM_TILE:
        _syrk_lower(total, chunk)
        return
    for i0 in range(0, n, GRAM_TILE):
        i1 = min(i0 + GRAM_TILE, n)
        diagonal = total[i0:i1, i0:i1].contiguous()  # scipy's BLAS takes no leading dimension: a tile is copied
        for t0 in range(0, chunk.shape[0], GRAM_TILE_TOKENS):
            _syrk_lower(diagonal, chunk[t0:t0 + GRAM_TILE_TOKENS, i0:i1].contiguous())
        total[i0:i1, i0:i1] = diagonal
        if i1 < n:
            total[i1:, i0:i1].addmm_(chunk[:, i1:].T, chunk[:, i0:i1])


def _syrk_lower(total: torch.Tensor, chunk: torch.Tensor) -> None:
    """total += chunkᵀ·chunk on the lower triangle of contiguous `total` by BLAS syrk, without copies: a row-major
    [n, n] array is a column-major one transposed, so syrk's "upper" of total.T is total's lower triangle, and
    contiguous chunk.T is a column-major [n, T] array, whose A·Aᵀ is chunkᵀ·chunk."""
    syrk = scipy.linalg.blas.dsyrk if total.dtype == torch.float64 else scipy.linalg.blas.ssyrk
    out = total.numpy().T
    result = syrk(1.0, chunk.numpy().T, beta=1.0, c=out, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(result, out):
        out[...] = result


def _mirror_lower(h: torch.Tensor, rows: int = 1024) -> None:
    """Copies the lower triangle onto the upper, in row blocks (no n×n temporary)."""
    n = h.shape[0]
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        diagonal = h[i0:i1, i0:i1]
        diagonal.copy_(torch.tril(diagonal) + torch.tril(diagonal, -1).T)
        h[i0:i1, i1:] = h[i1:, i0:i1].T


@dataclass
class Factor:
    upper: torch.Tensor      # U, upper triangular, (H + λI)⁻¹ = UᵀU
    damp: float              # the damping fraction finally used
    tried: list[float]       # every damping fraction tried, in order
    condition: float         # estimate of cond(H + λI): (max diag M / min diag M)²


def damping_schedule(damp: float) -> list[float]:
    """The requested damping, then doubling steps up to DAMP_CEILING."""
    steps = [damp]
    step = max(damp, 1e-4)
    while steps[-1] < DAMP_CEILING:
        step *= 2
        steps.append(min(steps[-1] + step, DAMP_CEILING))
    return steps


def inverse_upper_factor(hessian: torch.Tensor, damp: float, *, overwrite: bool = False) -> Factor:
    """U with (H + λI)⁻¹ = UᵀU, λ = damp·mean(diag H), computed in fp64; U is handed back in fp32.

    `overwrite=True` lets an fp32 CPU H's storage receive U (saves an n×n fp32 buffer at the peak).

    With J the reversal permutation, J(H+λI)J = M·Mᵀ (M lower) gives (H+λI)⁻¹ = (J M⁻¹ J)ᵀ(J M⁻¹ J) and
    J M⁻¹ J is upper: one Cholesky and one triangular inverse, instead of Cholesky → inverse → Cholesky.
    """
    if not _all_finite(hessian):
        raise FactorizationError("the Hessian holds NaN or Inf (non-finite activations reached this layer)")
    mean_diag = torch.diagonal(hessian).double().mean().item()
    if mean_diag <= 0:
        raise FactorizationError("the Hessian is zero: no calibration input reached this layer")
    if hessian.device.type != "cpu":
        factorise = _factor_torch
    else:
        factorise = _factor_lapack if hessian.shape[0] <= FACTOR_WHOLE else _factor_blocked
    tried = []
    for fraction in damping_schedule(damp):
        tried.append(fraction)
        found = factorise(hessian, fraction * mean_diag, overwrite)
        if found is not None:
            upper, condition = found
            return Factor(upper, fraction, tried, condition)
    raise FactorizationError(
        f"Cholesky of H + λI failed at every damping tried ({', '.join(f'{d:g}' for d in tried)} × mean diag)")


def _all_finite(hessian: torch.Tensor, rows: int = 1024) -> bool:
    """Whether every entry is finite. First from the sum (NaN and ±Inf propagate into it; no temporary): an
    isfinite mask, even by row blocks, leaves tens of MB of freed temporaries in the heap under the factorisation's
    fp64 buffer (hidden-2048 down_proj: 42-100 MiB on the block's peak). Only when the sum is not finite (a
    non-finite entry, or finite entries whose sum overflows) are the entries looked at, by row blocks."""
    if math.isfinite(hessian.sum().item()):
        return True
    return all(bool(torch.isfinite(hessian[i:i + rows]).all()) for i in range(0, hessian.shape[0], rows))


def _factor_lapack(hessian: torch.Tensor, damping: float, overwrite: bool):
    """CPU: LAPACK in place on one fp64 buffer (potrf, then trtri: n³/3 each). Peak memory is that buffer
    plus the fp32 result — for a 28672-wide down_proj 6.6 GB + 3.3 GB, where torch's out-of-place
    Cholesky, inverse and flips would need three or four fp64 copies."""
    a = np.array(hessian.numpy()[::-1, ::-1], dtype=np.float64, order="F")  # J·H·J, Fortran order: no copies below
    a.flat[:: a.shape[0] + 1] += damping
    lower, info = scipy.linalg.lapack.dpotrf(a, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        return None
    diag = np.diagonal(lower)
    condition = float(diag.max() / diag.min()) ** 2
    inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise FactorizationError(f"triangular inverse failed (LAPACK info {info})")
    if overwrite and hessian.dtype == torch.float32 and hessian.is_contiguous():
        np.copyto(hessian.numpy(), inverse[::-1, ::-1], casting="same_kind")
        return hessian, condition
    return torch.from_numpy(np.ascontiguousarray(inverse[::-1, ::-1], dtype=np.float32)), condition


def _factor_blocked(hessian: torch.Tensor, damping: float, overwrite: bool):
    """CPU, wider than FACTOR_WHOLE: the same factor by FACTOR_BLOCK tiles, in place on one fp64 buffer as with LAPACK
    (peak: that buffer, H and a few tile-sized temporaries), with no library call wider than a tile: LAPACK on the
    diagonal tiles, torch's BLAS (MKL) for the panels and trailing updates. The same flops as potrf + trtri."""
    n = hessian.shape[0]
    a = torch.empty((n, n), dtype=torch.float64)
    for start in range(0, n, FACTOR_BLOCK):  # J·H·J by row blocks: a whole flip would be an n×n temporary
        stop = min(start + FACTOR_BLOCK, n)
        a[start:stop] = hessian[n - stop:n - start].flip(0, 1)
    a.diagonal().add_(damping)
    if not _cholesky_in_place(a):
        return None
    diag = a.diagonal()
    condition = (diag.max() / diag.min()).item() ** 2
    _invert_lower_by_tiles(a)
    return _upper_from_reversed_inverse(a, hessian, overwrite), condition


def _tiles(start: int, n: int):
    return [(i, min(i + FACTOR_BLOCK, n)) for i in range(start, n, FACTOR_BLOCK)]


def _cholesky_in_place(a: torch.Tensor) -> bool:
    """Right-looking blocked Cholesky: a's lower triangle becomes M with a = M·Mᵀ; its upper tiles are zeroed.
    False when a is not positive definite."""
    n = a.shape[0]
    for k0, k1 in _tiles(0, n):
        a[k0:k1, k1:] = 0
        factor, info = scipy.linalg.lapack.dpotrf(a[k0:k1, k0:k1].numpy(), lower=1, clean=1)
        if info != 0:
            return False
        diagonal = torch.from_numpy(factor)
        a[k0:k1, k0:k1] = diagonal
        for r0, r1 in _tiles(k1, n):  # panel: M21 = A21·M11⁻ᵀ
            a[r0:r1, k0:k1] = torch.linalg.solve_triangular(diagonal.T, a[r0:r1, k0:k1], upper=True, left=False)
        for i0, i1 in _tiles(k1, n):  # trailing lower tiles: A22 −= M21·M21ᵀ
            for j0, j1 in _tiles(k1, i1):
                a[i0:i1, j0:j1].addmm_(a[i0:i1, k0:k1], a[j0:j1, k0:k1].T, alpha=-1)
    return True


def _invert_lower_by_tiles(a: torch.Tensor) -> None:
    """M ← M⁻¹ in place for a lower-triangular M with zero upper tiles, block column by block column from the right
    (LAPACK trtri's order): the panel under a diagonal block becomes −(M22⁻¹·M21)·M11⁻¹, M22⁻¹ already in place."""
    n = a.shape[0]
    for j0, j1 in reversed(_tiles(0, n)):
        diagonal = a[j0:j1, j0:j1].clone()
        for i0, i1 in reversed(_tiles(j1, n)):  # panel ← M22⁻¹·panel, bottom up: the rows above are still unread
            a[i0:i1, j0:j1] = a[i0:i1, j1:i1] @ a[j1:i1, j0:j1]
        for i0, i1 in _tiles(j1, n):
            a[i0:i1, j0:j1] = -torch.linalg.solve_triangular(diagonal, a[i0:i1, j0:j1], upper=False, left=False)
        inverse, info = scipy.linalg.lapack.dtrtri(diagonal.numpy(), lower=1)
        if info != 0:
            raise FactorizationError(f"triangular inverse failed (LAPACK info {info})")
        a[j0:j1, j0:j1] = torch.from_numpy(np.tril(inverse))


def _factor_torch(hessian: torch.Tensor, damping: float, overwrite: bool):
    """Accelerators: the same in torch, memory-lean. For n = 28672 (a 70B down_proj) the peak is two n×n fp64
    buffers plus H (16.5 GB): the reversal goes through an fp32 temporary, the triangular inverse works in
    place, and U is written back in row chunks."""
    reversed_h = hessian.flip(0, 1).to(torch.float64)
    reversed_h.diagonal().add_(damping)
    lower, info = torch.linalg.cholesky_ex(reversed_h)
    del reversed_h
    if info.item() != 0:
        return None
    diag = torch.diagonal(lower)
    condition = (diag.max() / diag.min()).item() ** 2
    _invert_lower_in_place(lower)
    return _upper_from_reversed_inverse(lower, hessian, overwrite), condition


def _upper_from_reversed_inverse(inverse: torch.Tensor, hessian: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """U = J·M⁻¹·J in fp32, written into H's storage when allowed, in row chunks: a whole flip would be another n×n
    fp64 copy."""
    n = inverse.shape[0]
    out = hessian if overwrite and hessian.dtype == torch.float32 and hessian.is_contiguous() else \
        torch.empty((n, n), dtype=torch.float32, device=hessian.device)
    for start in range(0, n, 1024):
        stop = min(start + 1024, n)
        out[start:stop] = inverse[n - stop:n - start].flip(0, 1)
    return out


def _invert_lower_in_place(lower: torch.Tensor) -> None:
    """M ← M⁻¹ for lower-triangular M, recursively: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ C A⁻¹, D⁻¹]].
    Matmuls only (the accelerator's fast path); temporaries are at most two (n/2)² blocks."""
    n = lower.shape[0]
    if n <= 256:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return
    half = n // 2
    _invert_lower_in_place(lower[:half, :half])
    _invert_lower_in_place(lower[half:, half:])
    lower[half:, :half] = -(lower[half:, half:] @ (lower[half:, :half] @ lower[:half, :half]))
