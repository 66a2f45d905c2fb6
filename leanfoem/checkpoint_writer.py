"""Writing the GPTQ checkpoint (DESIGN §5): one shard per block as soon as it is done, config.json last.

Why it exists: the output must load, without leanfoem, in transformers (GPTQ integration), vLLM and
GPTQModel; and a half-written output must never look finished.

What must stay true:
- every file goes through `atomic.atomic_path`;
- `config.json` (with `quantization_config`) is written last: its presence means the checkpoint is
  complete; `quantize_config.json` holds the same dict for tools that read that file;
- shard k of the output holds block k-1 (k = 1..L) and the last shard the tensors outside the blocks,
  so the index is known before the run and a resumed run rewrites nothing it already finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .activations import file_sha256
from .atomic import atomic_path, write_text

INDEX_NAME = "model.safetensors.index.json"
SIDE_FILE_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
NOT_COPIED = {"config.json", INDEX_NAME, "quantize_config.json"}


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Writes one safetensors shard atomically; returns its sha256."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        digest = file_sha256(tmp)
    return digest


def shard_tensor_names(path: Path) -> list[str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return [k for k in header if k != "__metadata__"]


def write_index(out_dir: Path, weight_map: dict[str, str]) -> None:
    total = sum((out_dir / s).stat().st_size for s in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(out_dir / INDEX_NAME, json.dumps(index, indent=2))


def copy_side_files(model_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config, chat template: everything small next to the weights."""
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and path.suffix in SIDE_FILE_SUFFIXES and path.name not in NOT_COPIED \
                and not path.name.endswith(".index.json"):
            with atomic_path(out_dir / path.name) as tmp:
                shutil.copyfile(path, tmp)


def quantization_config(*, bits: int, group_size: int, sym: bool, desc_act: bool, damp: float,
                        checkpoint_format: str, meta: dict) -> dict:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp,
        "true_sequential": True,
        "static_groups": False,
        "lm_head": False,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "meta": meta,
    }


def write_configs(out_dir: Path, config: dict, quant_config: dict) -> None:
    write_text(out_dir / "quantize_config.json", json.dumps(quant_config, indent=2))
    config = dict(config, quantization_config=quant_config)
    write_text(out_dir / "config.json", json.dumps(config, indent=2))  # last: marks the output complete
