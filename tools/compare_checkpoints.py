"""Where two GPTQ checkpoints of one model part ways: code agreement by column and each first-block layer's error.

    python tools/compare_checkpoints.py --model FP_DIR --rows rows.jsonl A_DIR B_DIR [--bits 4]

Why it exists: leanfoem and GPTQModel run the same algorithm, yet their perplexities differ by a few per cent.
This separates the two possible causes. The linears of block 0 that read the block's input (q/k/v on Llama) see
the same activations in both tools (embeddings of the same token ids through the same norm), so their
Hessian-weighted output error ‖(W − Q)X‖² on the calibration rows compares the two solvers on identical inputs.
The share of equal codes per 64-column slice shows where the two runs diverge: a code that flips (an fp16 against
an fp32 scale, a last-bit difference in the Hessian) is carried into every later column by the error feedback,
so identical algorithms drift apart column by column, then layer by layer.

Reads both checkpoints and the fp model (transformers, fp32) in memory: for small models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from leanfoem.architectures import architecture_for  # noqa: E402
from leanfoem.evaluation import dequantize_chunked  # noqa: E402
from leanfoem.packing import unpack_rows  # noqa: E402

PACKED = ("qweight", "qzeros", "scales", "g_idx")


def packed_layers(checkpoint: Path, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: its packed tensors} for the linears under `prefix`."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                name, _, part = key.rpartition(".")
                if key.startswith(prefix) and part in PACKED:
                    layers.setdefault(name, {})[part] = f.get_tensor(key)
    return layers


def first_block_inputs(model, arch, rows: list[list[int]]) -> torch.Tensor:
    """What the linears of block 0's first sub-group read: norm(embeddings), [tokens, hidden], fp64."""
    block = model.get_submodule(arch.layers)[0]
    norm = block.get_submodule(arch.branches[0].norm)
    with torch.no_grad():
        x = norm(model.get_input_embeddings()(torch.tensor(rows)))
    return x.reshape(-1, x.shape[-1]).double()


def code_agreement(a: dict, b: dict, bits: int, slice_columns: int = 64) -> list[float]:
    """Share of equal codes in each slice of input columns."""
    equal = (unpack_rows(a["qweight"], bits) == unpack_rows(b["qweight"], bits)).float().mean(dim=1)
    return [equal[i:i + slice_columns].mean().item() for i in range(0, equal.numel(), slice_columns)]


def output_error(weight: torch.Tensor, packed: dict, bits: int, hessian: torch.Tensor) -> float:
    """‖(W − Q)X‖² = tr((W − Q) XᵀX (W − Q)ᵀ) with X the calibration inputs."""
    diff = weight.double() - dequantize_chunked(packed, bits, "gptq").double()
    return torch.einsum("oi,ij,oj->", diff, hessian, diff).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the fp checkpoint both were quantized from")
    parser.add_argument("--rows", type=Path, required=True, help="the calibration rows (.jsonl, input_ids)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    arch = architecture_for(model.config)
    rows = [json.loads(line)["input_ids"] for line in args.rows.read_text().splitlines() if line.strip()]
    x = first_block_inputs(model, arch, rows)
    hessian = x.T @ x

    print(f"A = {args.a}\nB = {args.b}\n")
    print("share of equal codes, per 64 input columns (first 8 slices), blocks 0, 1 and the last:")
    last = len(model.get_submodule(arch.layers)) - 1
    for index in (0, 1, last):
        prefix = arch.block_prefix(index)
        a, b = packed_layers(args.a, prefix), packed_layers(args.b, prefix)
        for name in sorted(a):
            shares = code_agreement(a[name], b[name], args.bits)
            print(f"  {name:<40} " + " ".join(f"{s:.3f}" for s in shares[:8]))

    print("\nblock 0, linears reading the block input (same inputs in both): ‖(W − Q)X‖² on the calibration rows")
    prefix = arch.block_prefix(0)
    a, b = packed_layers(args.a, prefix), packed_layers(args.b, prefix)
    for local in arch.subgroups_of(arch.branches[0])[0]:
        name = prefix + local
        weight = model.get_submodule(name).weight
        ea, eb = output_error(weight, a[name], args.bits, hessian), output_error(weight, b[name], args.bits, hessian)
        print(f"  {name:<40} A {ea:.4e}  B {eb:.4e}  A/B {ea / eb:.4f}")


if __name__ == "__main__":
    main()
