"""Turns a GPTQ checkpoint back into a dense state dict, for tests that load it as a plain model."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from leanfoem.packing import unpack_gptq


def dense_state_dict(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    qconfig = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out_dir / shard))
    dense = {}
    for name in list(tensors):
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            parts = {k: tensors.pop(f"{base}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
            dense[base + ".weight"] = unpack_gptq(parts, qconfig["bits"], qconfig["checkpoint_format"])
    dense.update(tensors)
    return dense
