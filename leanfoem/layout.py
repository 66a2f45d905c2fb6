"""A block's tensors as the checkpoint stores them versus the parameters transformers builds.

Why it exists: transformers 5 does not always load a tensor under its stored name. Mixtral's
`block_sparse_moe.*` becomes `mlp.*`, and the experts of every mixture-of-experts family are stored one tensor per
expert and projection (`mlp.experts.7.gate_proj.weight`, Mixtral's `experts.7.w1.weight`) but built as two 3-D
parameters per block (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`). The rules for both live in
transformers' own conversion mapping (`conversion_mapping.py`, applied key by key by
`core_model_loading.rename_source_key`); this module reads them, so no family's names are written here.

leanfoem reads per expert (one expert group at a time, never a whole block of experts) and writes per expert
under the stored names, which is what vLLM's and GPTQModel's GPTQ MoE loaders read.

What must stay true:
- every stored tensor of a block is either a plain parameter (under its model name) or one piece of a fused expert
  parameter (expert index, position in the concatenation); nothing is dropped silently;
- only the two fusing operations transformers uses for experts are accepted: stacking the experts (dim 0) and,
  for gate/up, concatenating the pieces along the output rows; any other conversion of a block's tensors is
  refused in one line, naming it;
- output names come from the stored names, never from the model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .structure import StructureError


@dataclass
class FusedParameter:
    """One 3-D expert parameter (e.g. `mlp.experts.gate_up_proj`) and, per expert, its stored pieces in the order
    they are concatenated along the output rows (gate before up)."""
    model_name: str                                             # relative to the block
    pieces: dict[int, list[str | None]] = field(default_factory=dict)  # expert -> stored names (relative)

    def stored(self, expert: int) -> list[str]:
        names = self.pieces.get(expert)
        if names is None or None in names:
            raise KeyError(expert)
        return names


@dataclass
class BlockLayout:
    plain: dict[str, str]                   # model parameter -> stored tensor (relative to the block prefix)
    fused: dict[str, FusedParameter]        # model parameter -> its per-expert pieces

    def stored_module(self, module: str) -> str:
        """The stored name of a linear module of the block (for its packed tensors)."""
        stored = self.plain.get(module + ".weight")
        return module if stored is None else stored[: -len(".weight")]


class StoredLayout:
    """The conversion rules of one model (from its config), applied to the stored names of each block."""

    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model, add_legacy=False) or []
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.prefix = model.base_model_prefix
        self.meta_state = {k: None for k in model.state_dict()}

    def block(self, block_prefix: str, stored_names: list[str]) -> BlockLayout:
        from transformers.core_model_loading import rename_source_key

        plain, fused = {}, {}
        for name in stored_names:
            target, pattern = rename_source_key(name, self.renamings, self.converters, self.prefix, self.meta_state)
            local, model_local = name[len(block_prefix):], target[len(block_prefix):]
            if pattern is None:
                plain[model_local] = local
                continue
            converter = next(c for c in self.converters if pattern in c.source_patterns)
            _check_expert_fusion(converter, target)
            expert = _expert_index(pattern, name)
            param = fused.setdefault(model_local, FusedParameter(model_local))
            slots = param.pieces.setdefault(expert, [None] * len(converter.source_patterns))
            slots[converter.source_patterns.index(pattern)] = local
        return BlockLayout(plain, fused)


def _check_expert_fusion(converter, target: str) -> None:
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        shown = ", ".join(f"{name}(dim={dim})" for name, dim in ops)
        raise StructureError(f"unsupported stored layout for {target}: transformers converts it with {shown}; "
                             "leanfoem reads per-expert tensors stacked (and gate/up concatenated) only")


def _expert_index(pattern: str, name: str) -> int:
    """The expert number that the pattern's `*` stands for in a stored name."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, name)
    return int(match.group(1))


def fuse(pieces_per_expert: list[list[torch.Tensor]]) -> torch.Tensor:
    """The 3-D parameter from its pieces: each expert's pieces concatenated along the output rows, experts stacked."""
    return torch.stack([torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0] for pieces in pieces_per_expert])
