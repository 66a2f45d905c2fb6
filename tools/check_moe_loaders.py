"""Do leanfoem's mixture-of-experts checkpoints load in GPTQModel, and compute what leanfoem says they hold?

    python tools/check_moe_loaders.py [--families mixtral,qwen2_moe,qwen3_moe,deepseek_v3,glm4_moe]
        [--ref-python /work/venv-ref/bin/python] [--workdir /tmp/leanfoem-moe-loaders] [--write-docs]

For each family: a tiny random checkpoint of the family's own transformers config (tests/factory.py: 8 experts,
top-2), quantized by leanfoem (4 bit, group 32, symmetric: GPTQModel's CPU kernel needs every in_features divisible
by the group, and Qwen2-MoE's shared expert here is 96 wide); then, in the reference venv (GPTQModel 7.7.0 next to the
pinned CPU torch, see tools/bench_compare.py), `GPTQModel.load(out, device="cpu")` and the logits of one row; here,
the logits of the same row from the checkpoint dequantized by hand (leanfoem.evaluation.dense_tensors) and loaded by
plain transformers. Reported: whether it loaded, the kernel GPTQModel chose, and the relative difference of the two
logits (GPTQModel computes in its own dtype, so a small difference is expected; a wrong layout gives O(1)).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
from benchdoc import machine_line, replace_section  # noqa: E402

ROW = [1, 5, 9, 200, 31, 77, 12, 400, 3, 18, 260, 71, 90, 14, 8, 33]

PEER = """
import json, sys, torch
from gptqmodel import GPTQModel
model = GPTQModel.load(sys.argv[1], device="cpu")
with torch.no_grad():
    logits = model.model(torch.tensor([ROW])).logits[0].float()
torch.save(logits, sys.argv[2])
kernels = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
print(json.dumps({"class": type(model).__name__, "kernels": kernels}))
""".replace("ROW", repr(ROW))


def quantize(family: str, work: Path) -> Path:
    from factory import CALIB, build_checkpoint
    from leanfoem.cli import main
    from leanfoem.models import demo_model_dir
    source = build_checkpoint(work / f"{family}-src", demo_model_dir(), family=family)
    calib = work / "calib.txt"
    calib.write_text(CALIB)
    out = work / f"{family}-w4g32"
    assert main(["quantize", "--model", str(source), "--out", str(out), "--calib", str(calib), "--nsamples", "8",
                 "--seqlen", "64", "--group-size", "32", "--restart", "--quiet"]) == 0
    return out


def twin_logits(out: Path) -> torch.Tensor:
    from test_moe import dense_twin
    with tempfile.TemporaryDirectory() as where, torch.no_grad():
        return dense_twin(out, Path(where))(torch.tensor([ROW])).logits[0].float()


def check(family: str, work: Path, ref_python: str) -> dict:
    out = quantize(family, work)
    logits_file = work / f"{family}-gptqmodel-logits.pt"
    env = {"GPTQMODEL_CPU_WORKERS": "2", "GPTQMODEL_CACHE_DIR": str(work / "cache"),
           "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(work / "ext"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([ref_python, "-c", PEER, str(out), str(logits_file)], capture_output=True, text=True,
                          cwd=work, env=env)
    if done.returncode != 0:
        return {"family": family, "loaded": False, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    theirs, ours = torch.load(logits_file), twin_logits(out)
    difference = ((theirs - ours).norm() / ours.norm()).item()
    return {"family": family, "loaded": True, **peer, "relative_logit_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="mixtral,qwen2_moe,qwen3_moe,deepseek_v3,glm4_moe")
    parser.add_argument("--ref-python", default="/work/venv-ref/bin/python")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/leanfoem-moe-loaders"))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = [check(f, args.workdir, args.ref_python) for f in args.families.split(",")]
    version = subprocess.run([args.ref_python, "-c", "import gptqmodel; print(gptqmodel.__version__)"],
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]  # after its banner
    lines = [f"Command: `python tools/check_moe_loaders.py --families {args.families}` ({machine_line()}; "
             f"GPTQModel {version} in the reference venv, CPU).", "",
             "| family | loads in GPTQModel | its class, kernel | logits vs hand-dequantized (relative) |",
             "|---|---|---|---|"]
    for r in results:
        if r["loaded"]:
            lines.append(f"| {r['family']} | yes | {r['class']}, {', '.join(r['kernels'])} | "
                         f"{r['relative_logit_difference']:.2e} |")
        else:
            lines.append(f"| {r['family']} | no: {r['error']} | | |")
    print("\n".join(lines))
    if args.write_docs:
        replace_section(ROOT / "docs" / "BENCHMARKS.md", "Mixture-of-experts checkpoints in GPTQModel",
                        "\n".join(lines))


if __name__ == "__main__":
    main()
