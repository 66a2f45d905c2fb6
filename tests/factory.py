"""Real sharded checkpoints of dense and mixture-of-experts decoder families, built with each family's own
transformers config and modules (random weights). Families with a layer-type mix get sliding and full attention
interleaved, with a window shorter than the test rows so that the mix matters. MoE families get 8 experts, top-2,
routers with weights large enough to spread the tokens, and shards small enough to split a block."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (AutoTokenizer, Cohere2Config, Cohere2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, Glm4Config,
                          Glm4ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM, GraniteConfig, GraniteForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

MIX = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 16}

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),  # q/k norms
    # sandwich norms, attention and final logit softcapping, eager attention, embeddings scaled by sqrt(hidden)
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(MIX, head_dim=32, query_pre_attn_scalar=32,
                                                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    # local and global rotary tables per layer type, q/k norms, a scaled embedding module
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(MIX, head_dim=32, query_pre_attn_scalar=32,
                                                         final_logit_softcapping=30.0)),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": None}),  # fused qkv_proj and gate_up_proj
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {"pad_token_id": None}),  # post norms, q/k norms over all heads
    "granite": (GraniteConfig, GraniteForCausalLM, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                                    "attention_multiplier": 0.0625, "logits_scaling": 8.0}),
    "glm4": (Glm4Config, Glm4ForCausalLM, {"head_dim": 32, "pad_token_id": None}),  # four norms, fused gate_up_proj
    # parallel attention and MLP, a layer-type mix, logit scale
    "cohere2": (Cohere2Config, Cohere2ForCausalLM, dict(MIX, logit_scale=0.25, pad_token_id=None)),
}

# Mixture-of-experts families: 8 experts of 64, top-2 (intermediate_size is the dense layers' MLP, and Mixtral's
# experts'). DeepSeek-V3 and GLM-4.5: the first layer dense, shared experts, grouped routing with a score correction
# bias; DeepSeek-V3 with MLA attention.
MOE = {"num_experts_per_tok": 2}
MOE_FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(MOE, num_local_experts=8)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(MOE, num_experts=8, moe_intermediate_size=64,
                                                           shared_expert_intermediate_size=96)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(MOE, num_experts=8, moe_intermediate_size=64,
                                                           head_dim=32)),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(
        MOE, n_routed_experts=8, moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
        topk_group=1, routed_scaling_factor=2.5, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=32, num_key_value_heads=4, pad_token_id=None)),  # MLA: one kv head each
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM, dict(
        MOE, n_routed_experts=8, moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
        topk_group=1, head_dim=32, pad_token_id=None)),
}


# Calibration text of the tiny-checkpoint tests (tokenizes to a few hundred tokens with the demo tokenizer).
CALIB = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
         "that lour'd upon our house in the deep bosom of the ocean buried. ") * 60


def build_checkpoint(out: Path, tokenizer_dir: Path, *, family: str = "llama", layers: int = 2, hidden: int = 128,
                     intermediate: int = 256, heads: int = 4, kv_heads: int = 2, tie: bool = True,
                     max_shard_size: str = "150KB", seed: int = 0, dtype=torch.bfloat16, **overrides) -> Path:
    """`overrides`: config fields over the family's (e.g. num_experts_per_tok)."""
    config_cls, model_cls, extra = {**FAMILIES, **MOE_FAMILIES}[family]
    extra = dict(extra, **overrides)
    if "layer_types" in extra:
        layers = len(extra["layer_types"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024, tie_word_embeddings=tie,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = config_cls(**dict(fields, **extra))
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    if family == "qwen2":  # transformers initialises biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.02)
    if family in MOE_FAMILIES:  # routers spread the tokens over the experts; correction biases matter
        for name, module in model.named_modules():
            if name.endswith(".mlp.gate"):
                module.weight.data.normal_(0, 0.5)
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.data.normal_(0, 0.1)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out
