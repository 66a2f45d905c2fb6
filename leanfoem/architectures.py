"""What differs between decoder-only families: names only. One table, no `if` chains.

Why it exists: the pipeline is generic (skeleton on meta, one block materialised at a time); an
architecture only tells where the blocks live and in which order their linear layers are quantized.

A block is a sequence of pre-norm residual branches, h ← h + body(norm(h)) (attention, then MLP), and the
pipeline runs them one at a time: the MLP's sub-groups never recompute the attention, and the input of a
branch's output linear (o_proj, down_proj) is kept so the branch output is one matmul, not a forward. On
SmolLM2-135M this cut the forward work of quantization by about half against whole-block passes.

What must stay true:
- `subgroups` lists every quantized linear of a block, in forward order; the modules of one sub-group
  read the same input (one Hessian serves them all) and later sub-groups see earlier ones quantized;
- `branches` cover the block: running them in order gives the block's output bit for bit (the decoder
  layer does exactly these calls), every sub-group lies inside one branch's body, and each branch's last
  sub-group is its `output` linear alone, whose output the body returns as it is;
- adding a family is one entry in ARCHITECTURES (see README, "Adding an architecture").
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Branch:
    """h ← h + body(norm(h)); `output` is the linear whose output the body returns unchanged."""
    norm: str
    body: str
    output: str
    takes_block_kwargs: bool  # attention needs the position embeddings and mask the block receives


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
    branches: tuple[Branch, ...] = (
        Branch("input_layernorm", "self_attn", "self_attn.o_proj", takes_block_kwargs=True),
        Branch("post_attention_layernorm", "mlp", "mlp.down_proj", takes_block_kwargs=False),
    )

    def __post_init__(self):
        grouped = [self.subgroups_of(branch) for branch in self.branches]
        if sum(len(g) for g in grouped) != len(self.subgroups) or any(g[-1] != (b.output,) for b, g in
                                                                      zip(self.branches, grouped)):
            raise ValueError("every sub-group must lie in one branch, ending with the branch's output linear")

    def block_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    def subgroups_of(self, branch: Branch) -> tuple[tuple[str, ...], ...]:
        return tuple(g for g in self.subgroups if all(n.startswith(branch.body + ".") for n in g))

    def linears_of(self, branch: Branch) -> tuple[str, ...]:
        return tuple(name for group in self.subgroups_of(branch) for name in group)

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
    """The entry of a config (a PretrainedConfig, or config.json as a dict: `plan` refuses what `quantize` does)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    names = list(get("architectures") or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = ", ".join(names) or f"model_type {get('model_type') or '?'!r}"
    raise UnsupportedArchitecture(
        f"unsupported architecture {shown}; supported: {', '.join(sorted(ARCHITECTURES))}")
