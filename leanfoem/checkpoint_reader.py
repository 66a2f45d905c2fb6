"""Lazy, read-only access to a safetensors checkpoint, tensor by tensor, through its shard index.

Why it exists: a 70B checkpoint is 140 GB; only one block's tensors may be in memory at a time.

What must stay true:
- the model directory is never written to;
- every shard header is validated up front (a corrupt or truncated shard is reported before any work
  starts, naming the file), and a tensor named in the index but absent from its shard is an error
  naming the tensor;
- tensors come back exactly as stored (dtype unchanged), except the weights of an FP8 source (config.json's
  `quantization_config` fp8 with block scales), which come back dequantized to bf16 under their own names, one
  tensor at a time, their `weight_scale_inv` (and static `activation_scale`) hidden from every listing
  (`source_formats.py`); an FP8 tensor is never returned as stored. NaN/Inf is checked when a block is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from . import source_formats

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """The input checkpoint is missing, unreadable or inconsistent."""


class CheckpointReader:
    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model directory not found: {self.model_dir}")
        self.weight_map = self._read_weight_map()
        names_by_shard = {shard: _validated_names(self.model_dir / shard) for shard in set(self.weight_map.values())}
        for name, shard in self.weight_map.items():
            if name not in names_by_shard[shard]:
                raise CheckpointError(f"tensor {name} is listed in {INDEX_NAME} but missing from {shard}")
        self.fp8_block = source_formats.fp8_block_size(_declared_config(self.model_dir))

    def _read_weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"unreadable shard index {index}: {exc}") from None
        single = self.model_dir / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in _validated_names(single)}
        raise CheckpointError(f"no safetensors weights in {self.model_dir} "
                              f"(expected {INDEX_NAME} or {SINGLE_NAME})")

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix) and self._shown(n))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map and self._shown(name)

    def _shown(self, name: str) -> bool:
        """Whether a stored tensor is one of the model's, not part of how an FP8 source stores a weight."""
        return self.fp8_block is None or not source_formats.is_hidden(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors([name])[name]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Reads the named tensors, opening each shard once (FP8 weights dequantized as each is read, their scales
        read first: a scale may lie in another shard than its weight)."""
        for name in names:
            if name not in self:
                raise CheckpointError(f"tensor {name} is not in the checkpoint")
        block = self.fp8_block
        scale_names = [source_formats.scale_name(n) for n in names] if block else []
        scales = self._read([n for n in scale_names if n in self.weight_map], lambda name, tensor: tensor)

        def decoded(name: str, tensor: torch.Tensor) -> torch.Tensor:
            scale = scales.pop(source_formats.scale_name(name), None)
            if scale is None:
                return source_formats.check_not_fp8(name, tensor, block)
            return source_formats.dequantize(name, tensor, scale, block)

        return self._read(list(names), decoded)

    def _read(self, names: list[str], take) -> dict[str, torch.Tensor]:
        """`take(name, tensor)` of each named tensor as stored, opening each shard once. Shards are closed
        afterwards: a mapping kept open would keep every page read so far resident, and host memory would grow
        with depth."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            try:
                handle = safe_open(str(self.model_dir / shard), framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"cannot read {shard_names[0]} from {shard}: {exc}") from None
            with handle:
                for name in shard_names:
                    try:
                        stored = handle.get_tensor(name)
                    except Exception as exc:
                        raise CheckpointError(f"cannot read {name} from {shard}: {exc}") from None
                    out[name] = take(name, stored)  # one stored tensor at a time
                    del stored
        return out

    def shard_files(self) -> list[Path]:
        return [self.model_dir / s for s in sorted(set(self.weight_map.values()))]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shard_files())


def _declared_config(model_dir: Path) -> dict | None:
    """config.json as the storage format's declaration; None when absent or unreadable (the caller that loads the
    config reports that, and an FP8 tensor without a declared block size is refused when read)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _validated_names(path: Path) -> set[str]:
    """Tensor names of one shard, after checking that safetensors accepts its header and that its data
    reaches as far as the header promises (a truncated shard keeps a valid header)."""
    if not path.is_file():
        raise CheckpointError(f"shard {path.name} named in {INDEX_NAME} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            names = set(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"corrupt or truncated shard {path.name}: {exc}") from None
    _check_extent(path)
    return names


def _check_extent(path: Path) -> None:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise CheckpointError(f"truncated shard {path.name}: {path.stat().st_size} bytes, "
                              f"header promises {8 + header_len + end}")
