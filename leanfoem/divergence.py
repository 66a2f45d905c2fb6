"""`leanfoem eval --reference`: KL divergence of a (quantized) model against its full-precision reference.

Why it exists: perplexity cannot tell two good quantizers apart on a small model — on SmolLM2-135M one
calibration draw moves it by ±1.5% from rounding alone, and seven draws were needed to see a 2.8% gap
(docs/BENCHMARKS.md). KL(P_fp ‖ P_q), compared token by token, removes the text's own difficulty from the
figure: it is what llama.cpp's `perplexity --kl-divergence` and exllamav3's comparison script report.

Memory design. Exact KL needs the full-vocabulary distribution of both models at every token: a 128k-vocab
model at 2048 tokens has 1 GB of fp32 logits per window, so neither model's logits are ever stored. Instead:
1. the reference runs first, block by block over all windows (evaluation.final_hidden_states, each block read
   once), and only its hidden states after the last block are kept: hidden/vocab of the logits' size
   (Llama-3-70B: 8192/128256 = 6%), in host RAM or a memory-mapped file like perplexity's own store;
2. the model then runs the same way over the same windows (an MoE block's experts a group at a time, for both);
3. per window, both final norms and both lm_heads (both on the device) are applied in vocab chunks, and one
   pass over the chunks accumulates, per token, everything the figures need: both log-sum-exps, the online
   sum Σ_v exp(a_v − m)(a_v − b_v) (a, b the reference's and the model's logits, m the running max of a), both
   argmaxes and both target logits. KL = Σ_v p_v (a_v − b_v) − (A − B) with A, B the log-sum-exps — one pass,
   one chunk of logits at a time.
Storing the reference's hidden states instead of running the models in lockstep keeps one block on the device
at a time (lockstep would need a block of each); recomputing the reference's logits at the head costs one
[tokens, hidden] × [hidden, vocab] product per window, small next to the blocks.

What must stay true:
- the accumulation runs in fp64 (logits are fp32 matmul products): KL is a difference of two O(|a − b|) terms,
  and at 4 bits KL ~ 1e-2, so fp32 sums would lose the figure's leading digits;
- a model against itself gives exactly 0 KL and 100% top-1 agreement (identical logits cancel exactly);
- both models tokenize the text to the same ids and have the same vocabulary size, or the run is refused;
- per-token KL values are kept (4 bytes × tokens) so the quantiles are exact, not estimated.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from .checkpoint_reader import CheckpointError
from .evaluation import Head, ModelSource, final_hidden_states, window_count
from .pipeline import resolve_device

KL_CHUNK = 4096  # vocab entries a chunk: ~6 fp64 [tokens, chunk] temporaries, ~400 MB at 2048 tokens
QUANTILES = {"median": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999}


@dataclass
class TokenFigures:
    """Per predicted token of one window: KL(P_ref ‖ P_model), both NLLs, top-1 agreement and both
    probabilities of the correct next token."""

    kl: torch.Tensor
    nll_ref: torch.Tensor
    nll: torch.Tensor
    same_top: torch.Tensor
    p_ref: torch.Tensor
    p: torch.Tensor


def token_figures(x_ref: torch.Tensor, head_ref: Head, x: torch.Tensor, head: Head, targets: torch.Tensor,
                  chunk: int = KL_CHUNK) -> TokenFigures:
    """One pass over vocab chunks of both heads (x: final-normed hidden states, fp32, [tokens, hidden])."""
    n, device = x.shape[0], x.device
    ninf = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
    m, s, w, lse_b = ninf.clone(), torch.zeros_like(ninf), torch.zeros_like(ninf), ninf.clone()
    top_a, top_b = ninf.clone(), ninf.clone()
    arg_a = torch.zeros(n, dtype=torch.long, device=device)
    arg_b = torch.zeros_like(arg_a)
    tgt_a, tgt_b = torch.empty_like(ninf), torch.empty_like(ninf)
    for v0 in range(0, head.vocab, chunk):
        a = head_ref.logits(x_ref, v0, v0 + chunk).double()
        b = head.logits(x, v0, v0 + chunk).to(a.device).double()
        m_new = torch.maximum(m, a.max(dim=1).values)
        e = torch.exp(a - m_new[:, None])
        scale = torch.exp(m - m_new)
        s = s * scale + e.sum(dim=1)
        w = w * scale + (e * (a - b)).sum(dim=1)
        m = m_new
        lse_b = torch.logaddexp(lse_b, torch.logsumexp(b, dim=1))
        arg_a, top_a = _running_argmax(a, v0, arg_a, top_a)
        arg_b, top_b = _running_argmax(b, v0, arg_b, top_b)
        inside = (targets >= v0) & (targets < v0 + a.shape[1])
        tgt_a[inside] = a[inside, targets[inside] - v0]
        tgt_b[inside] = b[inside, targets[inside] - v0]
    lse_a = m + torch.log(s)
    kl = (w / s - (lse_a - lse_b)).clamp_min(0.0)  # ≥ 0 in exact arithmetic; rounding can leave -1e-17
    return TokenFigures(kl=kl, nll_ref=lse_a - tgt_a, nll=lse_b - tgt_b, same_top=arg_a == arg_b,
                        p_ref=torch.exp(tgt_a - lse_a), p=torch.exp(tgt_b - lse_b))


def _running_argmax(logits, v0, arg, top):
    """First index of the maximum over the chunks seen so far (ties go to the lower index, as torch.argmax)."""
    values, index = logits.max(dim=1)
    better = values > top
    return torch.where(better, index + v0, arg), torch.where(better, values, top)


def evaluate_divergence(model: str, reference: str, text: str, *, seqlen: int = 2048, windows: int | None = None,
                        device: str = "auto", batch_tokens: int = 4096, spill_bytes: int | None = None,
                        expert_group: int | None = None) -> dict:
    """Both perplexities and KL(P_reference ‖ P_model) figures over the same windows (module docstring);
    `expert_group` as in `evaluation.evaluate_perplexity`, for both models."""
    started = time.time()
    source, ref = ModelSource(model), ModelSource(reference)
    _check_compatible(source, ref)
    seqlen = ref.context(source.context(seqlen))
    ids = source.token_ids(text)
    if not torch.equal(ids, ref.token_ids(text)):
        raise CheckpointError(f"the reference {ref.model_dir} tokenizes the text differently from {source.model_dir}"
                              " (another tokenizer): KL needs the same tokens")
    count = window_count(ids, seqlen, windows)
    torch_device = resolve_device(device)
    ref_runner, runner = ref.runner(torch_device), source.runner(torch_device)
    if spill_bytes is None:
        spill_bytes = psutil.virtual_memory().available // 2
    store_bytes = count * seqlen * max(source.config.hidden_size * runner.dtype.itemsize,
                                       ref.config.hidden_size * ref_runner.dtype.itemsize)
    with tempfile.TemporaryDirectory(prefix="leanfoem-kld-") as tmp:
        spill_dir = Path(tmp) if 3 * store_bytes > spill_bytes else None  # reference's + model's in and out
        same = (ids, count, seqlen, spill_dir, batch_tokens)  # both models: the same windows, stores and batches
        experts = dict(work_dir=Path(tmp), expert_group=expert_group)
        ref_hidden = final_hidden_states(ref_runner, ref.gptq, *same, "ref", **experts)
        hidden = final_hidden_states(runner, source.gptq, *same, "model", **experts)
        per_window = _head_figures(ref_runner, ref, ref_hidden, runner, source, hidden, ids, count, seqlen)
        ref_hidden.drop()
        hidden.drop()
    figures = summarize(per_window)
    figures.update(windows=count, seqlen=seqlen, seconds=round(time.time() - started, 3), model=str(source.model_dir),
                   reference=str(ref.model_dir), quantized=source.gptq is not None,
                   reference_quantized=ref.gptq is not None, device=str(torch_device), spilled=spill_dir is not None)
    return figures


def _check_compatible(source: ModelSource, ref: ModelSource) -> None:
    if source.config.vocab_size != ref.config.vocab_size:
        raise CheckpointError(f"the reference {ref.model_dir} has vocab size {ref.config.vocab_size}, the model "
                              f"{source.config.vocab_size}: KL needs the same vocabulary")


def _head_figures(ref_runner, ref, ref_hidden, runner, source, hidden, ids, count, seqlen) -> list[TokenFigures]:
    ref_head, head = Head(ref_runner, ref.arch), Head(runner, source.arch)
    if ref_head.vocab != head.vocab:
        raise CheckpointError(f"the reference's lm_head has {ref_head.vocab} rows, the model's {head.vocab}")
    out = []
    with torch.no_grad():
        for k in range(count):
            x_ref = ref_head.normed(ref_hidden.get(k))[:-1]
            x = head.normed(hidden.get(k))[:-1]
            targets = ids[k * seqlen + 1:(k + 1) * seqlen].to(runner.device)
            figures = token_figures(x_ref, ref_head, x, head, targets)
            out.append(TokenFigures(*(getattr(figures, f).cpu() for f in TokenFigures.__dataclass_fields__)))
    return out


def summarize(per_window: list[TokenFigures]) -> dict:
    """Every figure of the report from the per-token values (quantiles: numpy's linear interpolation)."""
    cat = {f: torch.cat([getattr(t, f) for t in per_window]) for f in TokenFigures.__dataclass_fields__}
    kl = cat["kl"].numpy()
    tokens = kl.size
    delta_p = (cat["p"] - cat["p_ref"])
    return {
        "perplexity": math.exp(cat["nll"].sum().item() / tokens),
        "reference_perplexity": math.exp(cat["nll_ref"].sum().item() / tokens),
        "nll": cat["nll"].mean().item(), "reference_nll": cat["nll_ref"].mean().item(),
        "kld_mean": float(kl.mean()),
        **{f"kld_{name}": float(np.quantile(kl, q)) for name, q in QUANTILES.items()},
        "kld_max": float(kl.max()),
        "top1_agreement": cat["same_top"].double().mean().item(),
        "delta_p_abs_mean": delta_p.abs().mean().item(),
        "delta_p_mean": delta_p.mean().item(),
        "tokens": tokens,
    }


def format_divergence(result: dict) -> str:
    return "\n".join([
        f"perplexity {result['perplexity']:.4f} (reference {result['reference_perplexity']:.4f}) over "
        f"{result['windows']} windows of {result['seqlen']} tokens ({result['tokens']} predicted tokens, "
        f"{result['seconds']:.1f} s)",
        f"KL(P_ref || P_model) per token: mean {result['kld_mean']:.6f}, median {result['kld_median']:.6f}, "
        f"90% {result['kld_p90']:.6f}, 99% {result['kld_p99']:.6f}, 99.9% {result['kld_p999']:.6f}, "
        f"max {result['kld_max']:.6f}",
        f"same top token {result['top1_agreement'] * 100:.3f}%; correct token's probability: mean |dp| "
        f"{result['delta_p_abs_mean']:.6f}, mean dp {result['delta_p_mean']:+.6f}",
    ])
