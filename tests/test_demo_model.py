"""The bundled demo model is complete, small, shaped for group 128, sharded across blocks, and trained."""

import json
import math
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# Measured at build time (leanfoem/demo/build.json: eval_first4x256_perplexity = 94.8); the bound leaves
# ~25% margin. A unigram model scores ~750 on this tokenizer, an untrained one about len(vocab) = 4096.
EVAL_4X256_PERPLEXITY_BOUND = 120.0


def demo_dir() -> Path:
    return Path(str(files("leanfoem") / "demo"))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return demo_dir() / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_demo_files_are_small(model_dir):
    total = sum(p.stat().st_size for p in demo_dir().rglob("*") if p.is_file())
    assert total <= 10 * 2**20
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    assert (demo_dir() / "calibration.txt").stat().st_size >= 200_000
    assert (demo_dir() / "eval.txt").stat().st_size >= 50_000


def test_demo_model_is_sharded_across_a_block(model_dir):
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) >= 2 and all((model_dir / s).is_file() for s in shards)
    layers = {n.split(".")[2] for n in weight_map if n.startswith("model.layers.")}
    straddling = [i for i in layers
                  if len({s for n, s in weight_map.items() if n.startswith(f"model.layers.{i}.")}) > 1]
    assert straddling, "no decoder layer is split across two shards"


def test_demo_model_linears_fit_group_128(model):
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers
    assert all(m.in_features % 128 == 0 for m in linears)


def test_demo_tokenizer_loads(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    text = "Prince Andrew looked at Pierre."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_demo_model_is_trained(model, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer((demo_dir() / "eval.txt").read_text(encoding="utf-8"))["input_ids"][:4 * 256])
    assert ids.numel() == 4 * 256
    with torch.no_grad():
        loss = sum(model(w[None], labels=w[None]).loss.item() for w in ids.view(4, 256)) / 4
    assert math.exp(loss) < EVAL_4X256_PERPLEXITY_BOUND
