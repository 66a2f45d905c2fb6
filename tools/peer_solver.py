"""`leanfoem quantize` with GPTQModel's own FOEM solver in place of leanfoem's: which half of the pipeline makes the
perplexity gap between the two tools.

    PYTHONPATH=. /work/venv-ref/bin/python tools/peer_solver.py quantize --model DIR --out DIR --calib rows.jsonl \
        --nsamples 32 --seqlen 512 --bits 4 --group-size 64 --method foem --damp 0.05 --beta 0.2 --device cpu

Why it exists: on SmolLM2-135M leanfoem's FOEM perplexity is a few per cent above GPTQModel's, yet both tools run the
same algorithm on the same rows (docs/BENCHMARKS.md, "Is the perplexity gap systematic?"). This runs leanfoem's
pipeline (its blocks, Hessians, activation stores, packing) and hands every sub-group's weights and Hessian to
GPTQModel 7.7.0's `FOEM.quantize` (the class its own pipeline calls, with the quantizer configured per channel as its
GPTQ processor does); the codes are read back from its dequantized weights and fp32 grid and packed with fp16 scales,
as GPTQModel's packer stores them. Its perplexity next to leanfoem's and GPTQModel's on the same calibration draw says
whether the solver or the rest of the pipeline carries the gap.

Needs the reference venv (gptqmodel 7.7.0 next to the pinned torch, see tools/bench_compare.py) with this checkout on
PYTHONPATH. The per-module losses in the run log are 0: GPTQModel reports its own, on another scale.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import leanfoem.pipeline as pipeline  # noqa: E402
from leanfoem.cli import main  # noqa: E402
from leanfoem.solver import QuantResult  # noqa: E402


@dataclass
class RawHessian:
    """What leanfoem's prepare step hands on here: H itself and --damp (GPTQModel damps and factorises it)."""
    hessian: torch.Tensor
    damp: float


def keep_hessian(hessian, *, damp, **_):
    return RawHessian(hessian.detach().float().clone(), damp)


def peer_solve(weight, prepared: RawHessian, *, bits, group_size, sym, method, beta, **_) -> QuantResult:
    """GPTQModel's FOEM on one (stacked) weight [out, in]; the loop is row-separable, so a stack solves as its layers."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.looper.named_module import NamedModule
    from gptqmodel.quantization.config import FOEMConfig
    from gptqmodel.quantization.foem import FOEM

    if method != "foem":
        raise SystemExit("tools/peer_solver.py swaps in GPTQModel's FOEM: use --method foem")
    w = weight.detach().float().contiguous()
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.clone()
    config = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=False, damp_percent=prepared.damp,
                            foem=FOEMConfig(alpha=0, beta=beta, device="cpu"))
    solver = FOEM(NamedModule(linear, "layer", "model.layers.0.layer", 0), config)
    solver.quantizer.configure(perchannel=True)
    solver.H, solver.nsamples = prepared.hessian, 1
    dequantized, scale, zero, g_idx, *_ = solver.quantize()  # scale, zero: [out, groups]
    groups = g_idx.long()
    codes = torch.round(dequantized.float() / scale[:, groups] + zero[:, groups]).clamp(0, 2**bits - 1)
    return QuantResult(codes.T.to(torch.uint8).contiguous(), scale.T.to(torch.float16).contiguous(),
                       zero.T.to(torch.int32).contiguous(), g_idx.to(torch.int32), bits, group_size, sym, False,
                       loss=0.0, damp=prepared.damp, row_losses=torch.zeros(w.shape[0], dtype=torch.float64))


if __name__ == "__main__":
    pipeline.prepare_hessian = keep_hessian
    pipeline.quantize_prepared = peer_solve
    sys.exit(main(sys.argv[1:]))
