"""`--beta auto`: FOEM's first-order weight β chosen for each layer from a small grid, by held-out output error.

Why it exists: one β for every layer is the wrong shape. Over calibration draws, β = 0.2 cut SmolLM2-135M's KL
divergence by a fifth against GPTQ (β = 0) and raised the demo model's by as much (docs/BENCHMARKS.md, "Defaults:
what the KLD table says"). The column loop is row-separable and cheap beside the forwards, so a candidate β costs one
more loop over the sub-group's stacked weights and no forward.

How a sub-group is solved:
- the last `held_out_rows(n)` calibration rows (1 in 8, at least 1) stay out of the Hessian that the candidates are
  solved with (H_fit); their own H_held measures each candidate: a layer's output error on the held-out inputs
  against the unquantized layer's output on the same inputs, ‖(W − Q_β)·X_held‖² = Σ_rows (ΔW·H_held·ΔWᵀ)_rr;
- the candidates are solved on every SAMPLE_EVERY-th output row of each layer only: the column loop is row-separable,
  so a sampled row's result is the one it has in the whole layer's solve, and a layer's error is estimated from
  its sampled rows; five candidates then cost 1.25 loops over the sub-group instead of 5;
- each layer of the sub-group takes the β of least error (the smaller β on a tie);
- the sub-group is then solved once more, with the Hessian of all rows and each layer's chosen β, so the weights
  written have seen every calibration token, as a fixed-β run's have.

What must stay true:
- the choice depends only on the calibration rows and the settings (deterministic; the grid and the held-out count
  are in the run's fingerprint), so a resumed run chooses what an uninterrupted one chose;
- a fixed β never comes here: its bits do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hessian import HessianAccumulator
from .solver import PreparedHessian, QuantResult, prepare_hessian, quantize_prepared

AUTO = "auto"
GRID = (0.0, 0.05, 0.1, 0.2, 0.3)
HELD_OUT_EVERY = 8    # one calibration row in 8 measures the candidates
SAMPLE_EVERY = 4      # the candidates are solved on every 4th output row of each layer (the loop is row-separable)
ERROR_ROWS = 4096     # output rows per product with H_held: bounds its temporaries on a 70B-wide layer


def check_applies(method: str, nsamples: int) -> None:
    """Refused up front: only FOEM has a β, and a held-out row needs a row left to fit with."""
    if method != "foem":
        raise ValueError(f"--beta auto chooses FOEM's β: it needs --method foem, not {method!r}")
    if nsamples < 2:
        raise ValueError("--beta auto holds calibration rows out of the Hessian: it needs --nsamples 2 or more")


def held_out_rows(nsamples: int) -> int:
    return max(1, nsamples // HELD_OUT_EVERY)


@dataclass
class HeldOutHessians:
    """What `solve` needs for one sub-group: the candidates' factor, the held-out H, and all rows' H for the end."""

    fit: PreparedHessian | None
    held: torch.Tensor | None
    held_cross: torch.Tensor | None  # with a native stream (GPTAQ): the held-out rows' (X̃ − X)ᵀX
    full: torch.Tensor
    full_cross: torch.Tensor | None


def split_statistics(fit: HessianAccumulator, held: HessianAccumulator, *, damp: float, desc_act: bool,
                     alpha: float) -> HeldOutHessians:
    """The fit rows' H factorised for the candidates, and all rows' H (and cross term) put together from the two
    accumulators: both are on the (2/T)·ΣXᵀX scale of their own tokens, so all rows' is their token-weighted mean.

    On a GPU the held-out and all-rows matrices wait in host memory while the fit rows' H is factorised, so the
    card's peak (that factorisation's fp64 buffers) is the fixed-β run's; `solve` brings each back when needed."""
    share = fit.tokens / (fit.tokens + held.tokens)
    h_fit, cross_fit = fit.scaled()
    h_held, cross_held = held.scaled()
    full = _park(h_fit * share + h_held * (1 - share))
    full_cross = None if cross_fit is None else _park(cross_fit * share + cross_held * (1 - share))
    h_held, cross_held = _park(h_held), cross_held if cross_held is None else _park(cross_held)
    prepared = prepare_hessian(h_fit, damp=damp, desc_act=desc_act, alpha=alpha, cross=cross_fit, overwrite=True)
    return HeldOutHessians(prepared, h_held, cross_held, full, full_cross)


def _park(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.cpu() if matrix.is_cuda else matrix


def solve(weight: torch.Tensor, sizes: list[int], stats: HeldOutHessians, *, bits: int, group_size: int, sym: bool,
          damp: float, desc_act: bool, alpha: float, grid=GRID) -> tuple[list[QuantResult], list[dict]]:
    """The layers stacked in `weight` ([out, in], `sizes` rows each), each solved with its chosen β; and, per layer,
    {"beta": chosen, "held_out_error": {β: error relative to ‖W·X_held‖², both over the sampled rows}} for the
    log."""
    device = stats.fit.upper.device
    held = stats.held.to(device)
    held_cross = None if stats.held_cross is None else stats.held_cross.to(device)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    sampled = torch.cat([torch.arange(start, start + size, SAMPLE_EVERY, device=weight.device)
                         for start, size in zip(starts, sizes)])
    sample, sample_sizes = weight[sampled], [-(-size // SAMPLE_EVERY) for size in sizes]
    errors = [_held_out_errors(sample, sample_sizes, stats.fit, held, held_cross, beta, bits, group_size, sym)
              for beta in grid]
    references = _layer_sums(_row_errors(sample, torch.zeros((), device=device), held, None), sample_sizes)
    del sample
    # the candidates' statistics are spent: freed before the final factorisation
    stats.fit = stats.held = stats.held_cross = held = held_cross = None
    chosen = [min(range(len(grid)), key=lambda k: (errors[k][layer], k)) for layer in range(len(sizes))]
    prepared = prepare_hessian(stats.full, damp=damp, desc_act=desc_act, alpha=alpha, cross=stats.full_cross,
                               device=device, overwrite=True)
    stats.full = stats.full_cross = None
    results: list[QuantResult | None] = [None] * len(sizes)
    for k in sorted(set(chosen)):
        members = [layer for layer in range(len(sizes)) if chosen[layer] == k]
        rows = torch.cat([torch.arange(starts[m], starts[m] + sizes[m], device=weight.device) for m in members])
        result = quantize_prepared(weight[rows], prepared, bits=bits, group_size=group_size, sym=sym,
                                   method="foem", beta=grid[k])
        for layer, part in zip(members, result.split([sizes[m] for m in members])):
            results[layer] = part
    choices = [{"beta": grid[chosen[layer]],
                "held_out_error": {str(beta): errors[k][layer] / max(references[layer], 1e-30)
                                   for k, beta in enumerate(grid)}}
               for layer in range(len(sizes))]
    return results, choices


def _held_out_errors(weight, sizes, fit: PreparedHessian, held, held_cross, beta: float, bits, group_size,
                     sym) -> list[float]:
    result = quantize_prepared(weight, fit, bits=bits, group_size=group_size, sym=sym, method="foem", beta=beta)
    return _layer_sums(_row_errors(weight, result.dequantized, held, held_cross), sizes)


def _row_errors(weight: torch.Tensor, quantized: torch.Tensor, held: torch.Tensor,
                held_cross: torch.Tensor | None) -> torch.Tensor:
    """Every output row's error on the held-out rows, a bounded number of rows at a time (fp64 sums):
    ‖ΔW·X‖² = (ΔW·H·ΔWᵀ)_rr with ΔW = W − Q; with the native stream's M = (X̃ − X)ᵀX (GPTAQ), the error against the
    unquantized model's own output, ‖W·X̃ − Q·X‖² = ‖ΔW·X + W·(X̃ − X)‖², less its constant ‖W·(X̃ − X)‖²:
    (ΔW·H·ΔWᵀ)_rr + 2·(ΔW·Mᵀ·Wᵀ)_rr."""
    out = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    for r0 in range(0, weight.shape[0], ERROR_ROWS):
        r1 = min(r0 + ERROR_ROWS, weight.shape[0])
        w = weight[r0:r1].to(torch.float32)
        delta = w - (quantized if quantized.ndim == 0 else quantized[r0:r1])
        rows = ((delta @ held) * delta).sum(dim=1, dtype=torch.float64)
        if held_cross is not None:
            rows += 2 * ((delta @ held_cross.T) * w).sum(dim=1, dtype=torch.float64)
        out[r0:r1] = rows
    return out


def _layer_sums(row_errors: torch.Tensor, sizes: list[int]) -> list[float]:
    return [part.sum().item() for part in row_errors.split(sizes)]
