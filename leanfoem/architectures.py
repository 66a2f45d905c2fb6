"""What differs between decoder-only families: names only. One table, no `if` chains.

Why it exists: the pipeline is generic (skeleton on meta, one block materialised at a time); an
architecture only tells where the blocks live and in which order their linear layers are quantized.

What must stay true:
- `subgroups` lists every quantized linear of a block, in forward order; the modules of one sub-group
  read the same input (one Hessian serves them all) and later sub-groups see earlier ones quantized;
- adding a family is one entry in ARCHITECTURES (see README, "Adding an architecture").
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    layers: str = "model.layers"                      # where the decoder blocks live
    final_norm: str = "model.norm"                    # applied after the last block (evaluation)
    lm_head: str = "lm_head"                          # tied to the input embedding when absent
    subgroups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

    def block_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.subgroups for name in group)


LLAMA_LIKE = Architecture()

# Qwen2 adds q/k/v biases and Qwen3 q/k norms: both are plain tensors of the block, copied as they are.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": LLAMA_LIKE,
    "MistralForCausalLM": LLAMA_LIKE,
    "Qwen2ForCausalLM": LLAMA_LIKE,
    "Qwen3ForCausalLM": LLAMA_LIKE,
}


def architecture_for(config) -> Architecture:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedArchitecture(
        f"unsupported architecture {shown}; supported: {', '.join(sorted(ARCHITECTURES))}")
