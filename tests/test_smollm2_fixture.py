"""The SmolLM2-135M fixture (tools/smollm2.py): a sharded Llama checkpoint with the shape DESIGN §7 promises."""

import json

import torch
from safetensors import safe_open


def test_smollm2_checkpoint(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.intermediate_size == 1536
    assert config.tie_word_embeddings

    index = smollm2_dir / "model.safetensors.index.json"
    assert index.is_file()
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1  # sharded: blocks straddle shards

    ids = AutoTokenizer.from_pretrained(smollm2_dir)("The capital of France is")["input_ids"]
    assert len(ids) > 0 and all(isinstance(i, int) for i in ids)

    # tied lm_head: either not stored, or stored equal to the embedding
    with safe_open(smollm2_dir / weight_map["model.embed_tokens.weight"], "pt") as shard:
        embedding = shard.get_tensor("model.embed_tokens.weight")
    assert tuple(embedding.shape) == (config.vocab_size, 576)
    assert embedding.dtype == torch.bfloat16
    if "lm_head.weight" in weight_map:
        with safe_open(smollm2_dir / weight_map["lm_head.weight"], "pt") as shard:
            assert torch.equal(shard.get_tensor("lm_head.weight"), embedding)
