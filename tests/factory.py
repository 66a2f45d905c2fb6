"""Real sharded checkpoints of the supported families, built with transformers (random weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),  # q/k norms
}


def build_checkpoint(out: Path, tokenizer_dir: Path, *, family: str = "llama", layers: int = 2, hidden: int = 128,
                     intermediate: int = 256, heads: int = 4, kv_heads: int = 2, tie: bool = True,
                     max_shard_size: str = "150KB", seed: int = 0, dtype=torch.bfloat16) -> Path:
    config_cls, model_cls, extra = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=1024, tie_word_embeddings=tie,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    if family == "qwen2":  # transformers initialises biases to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.02)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out
