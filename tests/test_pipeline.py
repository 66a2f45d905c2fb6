"""End to end: real sharded checkpoints in, GPTQ checkpoints out, loaded back as working models."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from factory import build_checkpoint
from gptq_decode import dense_state_dict
from leanfoem.cli import main



def quantize_cli(model, out, calib, *extra):
    code = main(["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "8",
                 "--seqlen", "64", "--group-size", "64", "--quiet", *extra])
    assert code == 0


def index_of(model_dir):
    return json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())["weight_map"]


# The stored names of the decoder linears of the test families (Mixtral's experts: w1/w2/w3; DeepSeek's MLA:
# kv_a_proj_with_mqa). Routers (`mlp.gate.weight`) are not among them: they are copied as stored.
LINEAR = re.compile(r"(_proj|_proj_with_mqa|\.w[123])\.weight$")


def assert_well_formed(out, source, bits, group_size):
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == bits and q["group_size"] == group_size
    assert json.loads((out / "quantize_config.json").read_text()) == q
    assert not (out / ".leanfoem").exists()
    weight_map = index_of(out)
    for shard in set(weight_map.values()):
        with safe_open(str(out / shard), "pt") as f:
            assert {k for k, v in weight_map.items() if v == shard} == set(f.keys())
    src = index_of(source)
    linears = [n[: -len(".weight")] for n in src if ".layers." in n and LINEAR.search(n)]
    assert linears
    for base in linears:
        assert base + ".weight" not in weight_map
        with safe_open(str(out / weight_map[base + ".qweight"]), "pt") as f:
            qweight, qzeros = f.get_tensor(base + ".qweight"), f.get_tensor(base + ".qzeros")
            scales, g_idx = f.get_tensor(base + ".scales"), f.get_tensor(base + ".g_idx")
        with safe_open(str(source / src[base + ".weight"]), "pt") as f:
            out_f, in_f = f.get_slice(base + ".weight").get_shape()
        groups = -(-in_f // group_size)
        assert qweight.dtype == torch.int32 and tuple(qweight.shape) == (in_f * bits // 32, out_f)
        assert qzeros.dtype == torch.int32 and tuple(qzeros.shape) == (groups, out_f * bits // 32)
        assert scales.dtype == torch.float16 and tuple(scales.shape) == (groups, out_f)
        assert g_idx.dtype == torch.int32 and g_idx.tolist() == [i // group_size for i in range(in_f)]
    others = {n for n in src if not LINEAR.search(n)}
    assert others <= set(weight_map)  # norms, embeddings, biases, lm_head copied


def relative_weight_error(source, out):
    dense = dense_state_dict(out)
    errors = []
    for name in index_of(source):
        if name.endswith("_proj.weight"):
            with safe_open(str(source / index_of(source)[name]), "pt") as f:
                w = f.get_tensor(name).float()
            errors.append(((dense[name] - w).norm() / w.norm()).item())
    return sorted(errors)


def assert_run_log_covers_every_module(out, source):
    """The run log (quantize_log.jsonl) has, per linear, its damping, loss, time and memory, and per block its
    current and peak resident memory."""
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    modules = {e["module"]: e for e in events if e["event"] == "module"}
    linears = {n[: -len(".weight")] for n in index_of(source) if ".layers." in n and n.endswith("_proj.weight")}
    assert set(modules) == linears
    for e in modules.values():
        assert e["damp"] > 0 and e["loss"] >= 0 and e["seconds"] >= 0 and e["rss_gib"] > 0
    blocks = [e for e in events if e["event"] == "block"]
    assert [e["index"] for e in blocks] == list(range(len(blocks))) and blocks
    assert all(0 < e["rss_gib"] <= e["peak_rss_gib"] for e in blocks)


def load_dense(out):
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dense_state_dict(out), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    model.tie_weights()
    return model.eval()


def test_untied_lm_head_and_qwen2_biases_are_copied(tmp_path, calib_file, tokenizer_dir):
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="qwen2", layers=1, tie=False)
    out = tmp_path / "out"
    quantize_cli(source, out, calib_file, "--bits", "8", "--asym", "--checkpoint-format", "gptq_v2")
    weight_map = index_of(out)
    assert "lm_head.weight" in weight_map
    with safe_open(str(out / weight_map["model.layers.0.self_attn.q_proj.bias"]), "pt") as f:
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    with safe_open(str(source / index_of(source)["model.layers.0.self_attn.q_proj.bias"]), "pt") as f:
        original = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    assert bias.dtype == torch.float16 and torch.allclose(bias.float(), original.float(), atol=1e-3)
    assert relative_weight_error(source, out)[-1] < 0.02  # 8 bits


@pytest.mark.slow
def test_real_smollm2_quantizes_and_still_answers(smollm2_dir, smollm2_w4g64):
    out = smollm2_w4g64
    assert_well_formed(out, smollm2_dir, 4, 64)
    errors = relative_weight_error(smollm2_dir, out)
    # GPTQ trades weight error for output error, so a few modules move further; most stay close
    assert errors[len(errors) // 2] < 0.15 and errors[-1] < 0.4
    model = load_dense(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids.shape[1]:])


def test_kept_down_proj_inputs_give_the_same_bits_as_recomputing_them(tmp_path, calib_file, tokenizer_dir, monkeypatch):
    """On the CPU the planner keeps down_proj's inputs (the MLP output is then one matmul); the checkpoint must be
    the one that recomputing the gate/up forward gives, byte for byte."""
    from leanfoem import pipeline
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="llama")
    kept, recomputed = tmp_path / "kept", tmp_path / "recomputed"
    quantize_cli(source, kept, calib_file)
    plan = pipeline.QuantizeRun._plan

    def without_keeping(self):
        chosen = plan(self)
        assert chosen.keeps_mlp_inputs  # the CPU default, or this test compares nothing
        chosen.keeps_mlp_inputs = False
        return chosen

    monkeypatch.setattr(pipeline.QuantizeRun, "_plan", without_keeping)
    quantize_cli(source, recomputed, calib_file)
    shards = sorted(p.name for p in kept.glob("model-*.safetensors"))
    assert shards and shards == sorted(p.name for p in recomputed.glob("model-*.safetensors"))
    for name in shards:
        assert (kept / name).read_bytes() == (recomputed / name).read_bytes()
