"""Lazy, read-only access to a safetensors checkpoint, tensor by tensor, through its shard index.

Why it exists: a 70B checkpoint is 140 GB; only one block's tensors may be in memory at a time.

What must stay true:
- the model directory is never written to;
- every shard header is validated up front (a corrupt or truncated shard is reported before any work
  starts, naming the file), and a tensor named in the index but absent from its shard is an error
  naming the tensor;
- tensors come back exactly as stored (dtype unchanged); NaN/Inf is checked when a block is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """The input checkpoint is missing, unreadable or inconsistent."""


class CheckpointReader:
    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model directory not found: {self.model_dir}")
        self._handles, self._names = {}, {}
        self.weight_map = self._read_weight_map()
        for shard in sorted(set(self.weight_map.values())):
            self._open(shard)
        for name, shard in self.weight_map.items():
            if name not in self._names[shard]:
                raise CheckpointError(f"tensor {name} is listed in {INDEX_NAME} but missing from {shard}")

    def _read_weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"unreadable shard index {index}: {exc}") from None
        single = self.model_dir / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        raise CheckpointError(f"no safetensors weights in {self.model_dir} "
                              f"(expected {INDEX_NAME} or {SINGLE_NAME})")

    def _open(self, shard: str):
        if shard in self._handles:
            return self._handles[shard]
        path = self.model_dir / shard
        if not path.is_file():
            raise CheckpointError(f"shard {shard} named in {INDEX_NAME} is missing")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            names = set(handle.keys())
            _check_extent(handle, path, names)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"corrupt or truncated shard {shard}: {exc}") from None
        self._names[shard] = names
        self._handles[shard] = handle
        return handle

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"tensor {name} is not in the checkpoint")
        try:
            return self._handles[shard].get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name} from {shard}: {exc}") from None

    def shard_files(self) -> list[Path]:
        return [self.model_dir / s for s in sorted(set(self.weight_map.values()))]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shard_files())


def _check_extent(handle, path: Path, names: set[str]) -> None:
    """A truncated shard still has a valid header; its data must reach the end of the last tensor."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_len + end:
        raise CheckpointError(f"truncated shard {path.name}: {path.stat().st_size} bytes, "
                              f"header promises {8 + header_len + end}")
