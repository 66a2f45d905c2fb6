"""The bundled demo model is complete, small, shaped for group 128, sharded across blocks, and trained."""

import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leanfoem.models import demo_model_dir


def test_demo_model_is_small_sharded_and_group_128_friendly():
    model_dir = demo_model_dir()
    demo = model_dir.parent
    assert sum(p.stat().st_size for p in demo.rglob("*") if p.is_file()) <= 10 * 2**20
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    assert any(len({s for n, s in weight_map.items() if n.startswith(f"model.layers.{i}.")}) > 1 for i in range(4))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.in_features % 128 == 0 for m in linears)


def test_demo_model_is_trained():
    model_dir = demo_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer((model_dir.parent / "eval.txt").read_text())["input_ids"][:4 * 256])
    with torch.no_grad():
        loss = sum(model(w[None], labels=w[None]).loss.item() for w in ids.view(4, 256)) / 4
    assert math.exp(loss) < 260  # measured 172 at build time; an untrained model scores about len(vocab) = 2048
