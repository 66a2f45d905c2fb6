"""Where two GPTQ checkpoints of one model part ways: code agreement by column and each first-block layer's error.

    python tools/compare_checkpoints.py --model FP_DIR --rows rows.jsonl A_DIR B_DIR

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
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from leanfoem.architectures import architecture_for  # noqa: E402
from leanfoem.checkpoint_reader import CheckpointReader  # noqa: E402
from leanfoem.evaluation import gptq_settings  # noqa: E402
from leanfoem.packing import PACKED_PARTS, dequantize_chunked, unpack_rows  # noqa: E402


class Quantized:
    """A GPTQ checkpoint: its bits and format (from its config.json) and the packed linears of one block."""

    def __init__(self, path: Path):
        self.path, self.reader = path, CheckpointReader(path)
        settings = gptq_settings(AutoConfig.from_pretrained(path))
        self.bits, self.format = settings["bits"], settings["format"]

    def block(self, prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        """{linear name: its packed tensors} for the linears under `prefix`."""
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.reader.tensors(self.reader.names(prefix)).items():
            name, _, part = key.rpartition(".")
            if part in PACKED_PARTS:
                layers.setdefault(name, {})[part] = tensor
        return layers

    def codes(self, packed: dict) -> torch.Tensor:
        return unpack_rows(packed["qweight"], self.bits)

    def weight(self, packed: dict) -> torch.Tensor:
        return dequantize_chunked(packed, self.bits, self.format)


def first_subgroup(model, arch, rows: list[list[int]]) -> tuple[list[str], torch.Tensor]:
    """Block 0's first sub-group (the linears that read the first input a linear reads) and that input,
    [tokens, hidden], fp64: the full model runs on the rows with hooks on block 0's linears."""
    block = model.get_submodule(arch.layers)[0]
    seen, handles = [], []
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0]))))
    with torch.no_grad():
        model(torch.tensor(rows))
    for handle in handles:
        handle.remove()
    x = seen[0][1]
    return [name for name, y in seen if y is x], x.reshape(-1, x.shape[-1]).double()


def code_agreement(codes_a: torch.Tensor, codes_b: torch.Tensor, slice_columns: int = 64) -> list[float]:
    """Share of equal codes in each slice of input columns (codes are [in, out])."""
    equal = (codes_a == codes_b).float().mean(dim=1)
    return [equal[i:i + slice_columns].mean().item() for i in range(0, equal.numel(), slice_columns)]


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Q)X‖² = tr((W − Q) XᵀX (W − Q)ᵀ) with X the calibration inputs."""
    diff = weight.double() - quantized.double()
    return torch.einsum("oi,ij,oj->", diff, hessian, diff).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the fp checkpoint both were quantized from")
    parser.add_argument("--rows", type=Path, required=True, help="the calibration rows (.jsonl, input_ids)")
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM
    qa, qb = Quantized(args.a), Quantized(args.b)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    arch = architecture_for(model.config)
    rows = [json.loads(line)["input_ids"] for line in args.rows.read_text().splitlines() if line.strip()]
    group, x = first_subgroup(model, arch, rows)
    hessian = x.T @ x

    print(f"A = {args.a}\nB = {args.b}\n")
    print("share of equal codes, per 64 input columns (first 8 slices), blocks 0, 1 and the last:")
    last = len(model.get_submodule(arch.layers)) - 1
    blocks = {i: (qa.block(arch.block_prefix(i)), qb.block(arch.block_prefix(i))) for i in (0, 1, last)}
    for a, b in blocks.values():
        for name in sorted(a):
            shares = code_agreement(qa.codes(a[name]), qb.codes(b[name]))
            print(f"  {name:<40} " + " ".join(f"{s:.3f}" for s in shares[:8]))

    print("\nblock 0, linears reading the block input (same inputs in both): ‖(W − Q)X‖² on the calibration rows")
    a, b = blocks[0]
    for local in group:
        name = arch.block_prefix(0) + local
        weight = model.get_submodule(name).weight
        ea, eb = output_error(weight, qa.weight(a[name]), hessian), output_error(weight, qb.weight(b[name]), hessian)
        print(f"  {name:<40} A {ea:.4e}  B {eb:.4e}  A/B {ea / eb:.4f}")


if __name__ == "__main__":
    main()
