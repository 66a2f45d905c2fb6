"""Every dense family, on a tiny random checkpoint built with the family's own transformers config and modules
(tests/factory.py: shards that split a block, sliding and full attention interleaved where the family has a mix):
the block-streamed forward is the full model's, quantization covers every decoder linear, and `leanfoem eval`
agrees with plain transformers on the source and on the output. No family needs code: the structure is derived."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from factory import CALIB, FAMILIES, build_checkpoint
from perplexity import eval_cli, reference_perplexity
from test_pipeline import assert_well_formed, index_of, load_dense, quantize_cli, relative_weight_error
from leanfoem.architectures import architecture_for
from leanfoem.blocks import BlockRunner
from leanfoem.checkpoint_reader import CheckpointReader
from leanfoem.cli import main
from leanfoem.evaluation import Head
from leanfoem.structure import StructureError, verify

SEQLEN, WINDOWS = 64, 3  # rows longer than the factory's sliding window (16)


def streamed_logits(model_dir, ids):
    """The fp32 logits of one row, streamed the way `leanfoem eval` streams: block by block from the shards, each
    block's structure derived and verified on the way, then the head in vocab chunks."""
    config = AutoConfig.from_pretrained(model_dir)
    arch = architecture_for(config)
    runner = BlockRunner(config, CheckpointReader(model_dir), arch, torch.device("cpu"), torch.float32)
    hidden = runner.block_inputs(ids)
    for index in range(runner.num_blocks):
        block = runner.load(index, runner.source_tensors(index))
        runner.checked_structure(index, block, hidden[0])
        hidden = runner.forward(block, index, hidden)
        runner.unload(index)
    head = Head(runner, arch)
    return torch.cat([logits for _, logits in head.chunks(head.normed(hidden[0]))], dim=1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_forward_is_the_full_models_bit_for_bit(tmp_path, tokenizer_dir, family):
    """Same arithmetic, same bits: the per-layer call arguments (masks and rotary tables per layer type), the
    embedding scale and multipliers before block 0, the final norm and the logit scaling/softcapping are all the
    model's own."""
    model_dir = build_checkpoint(tmp_path / family, tokenizer_dir, family=family)
    ids = AutoTokenizer.from_pretrained(model_dir)(CALIB[:400], return_tensors="pt")["input_ids"][0, :SEQLEN]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    assert torch.equal(streamed_logits(model_dir, ids), expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_quantizes_and_evaluates_like_transformers(tmp_path, calib_file, tokenizer_dir, capsys, family):
    """Every decoder linear quantized under the checkpoint's own names (fused ones as fused), and `leanfoem eval`
    within 0.5% of plain transformers, fp and quantized (both fp32 on the CPU: in practice equal to ~1e-6)."""
    tie = family not in ("mistral", "qwen3")
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family=family, tie=tie)
    assert len({v for k, v in index_of(source).items() if k.startswith("model.layers.0.")}) > 1
    out = tmp_path / "out"
    quantize_cli(source, out, calib_file)
    capsys.readouterr()
    assert_well_formed(out, source, 4, 64)
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    linears = {n[: -len(".weight")] for n in index_of(source) if ".layers." in n and n.endswith("_proj.weight")}
    assert {e["module"] for e in events if e["event"] == "module"} == linears
    assert relative_weight_error(source, out)[-1] < 0.2
    ids = torch.tensor(AutoTokenizer.from_pretrained(source)(calib_file.read_text())["input_ids"])
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    assert eval_cli(source, calib_file, capsys, SEQLEN, WINDOWS) == pytest.approx(
        reference_perplexity(original, ids, SEQLEN, WINDOWS), rel=0.005)
    quantized = load_dense(out)
    assert eval_cli(out, calib_file, capsys, SEQLEN, WINDOWS) == pytest.approx(
        reference_perplexity(quantized, ids, SEQLEN, WINDOWS), rel=0.005)
    with torch.no_grad():
        a, b = original(ids[None, :SEQLEN]).logits, quantized(ids[None, :SEQLEN]).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.95


def loaded_block(model_dir, index=0):
    config = AutoConfig.from_pretrained(model_dir)
    runner = BlockRunner(config, CheckpointReader(model_dir), architecture_for(config), torch.device("cpu"),
                         torch.float32)
    hidden = runner.block_inputs(torch.arange(3, 3 + SEQLEN))
    return runner, runner.load(index, runner.source_tensors(index)), hidden


def test_a_structure_that_misses_a_sandwich_norm_is_refused(tmp_path, tokenizer_dir):
    """What a Llama table pasted in for Gemma would do: the branches without their post norms. `verify` runs it as
    the pipeline would and refuses it, since the layer's output differs."""
    runner, block, hidden = loaded_block(build_checkpoint(tmp_path / "g", tokenizer_dir, family="gemma2"))
    derived = runner.checked_structure(0, block, hidden[0])
    assert all(branch.tail == 1 for branch in derived.branches)
    llama_like = dataclasses.replace(derived, branches=tuple(
        dataclasses.replace(branch, calls=branch.calls[:-1], tail=0) for branch in derived.branches))
    with pytest.raises(StructureError, match="does not reproduce the decoder layer"):
        verify(block, llama_like, hidden, runner.layer_kwargs(0, SEQLEN), "block 0")


def test_parallel_residuals_fall_back_to_whole_layer_passes_and_multipliers_are_found(tmp_path, tokenizer_dir):
    """Cohere2 runs attention and MLP on one norm's output: not h <- h + chain(h), so the whole layer is one branch
    (correct, slower), and q/k/v and gate/up read one tensor and form one sub-group. Granite scales each branch by
    the layer's residual multiplier before adding it: found among the layer's float attributes."""
    runner, block, hidden = loaded_block(build_checkpoint(tmp_path / "c", tokenizer_dir, family="cohere2"))
    structure = runner.checked_structure(0, block, hidden[0])
    assert structure.layer_wide and structure.subgroups[0] == (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    runner, block, hidden = loaded_block(build_checkpoint(tmp_path / "g", tokenizer_dir, family="granite"))
    structure = runner.checked_structure(0, block, hidden[0])
    assert [(b.output, b.scale) for b in structure.branches] == [("self_attn.o_proj", 0.22), ("mlp.down_proj", 0.22)]


def test_layer_calls_are_stored_once_per_distinct_value(tmp_path, tokenizer_dir):
    """Gemma 3 with sliding, full, sliding layers: two distinct calls, layers 0 and 2 share one."""
    runner, _, _ = loaded_block(build_checkpoint(tmp_path / "g", tokenizer_dir, family="gemma3"))
    calls = runner._calls[SEQLEN]
    assert len(calls.distinct) == 2 and calls.of_layer == [0, 1, 0]
    sliding, full = calls.distinct
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])


class TwiceConfig(LlamaConfig):
    model_type = "leanfoem_test_twice"


class TwiceAttention(LlamaAttention):
    """Llama attention whose output projection is applied twice: o_proj(o_proj(attention))."""

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        return self.o_proj(out), weights


class TwiceForCausalLM(LlamaForCausalLM):
    config_class = TwiceConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn.__class__ = TwiceAttention


def test_a_layer_that_applies_a_linear_twice_is_refused(tmp_path, tokenizer_dir, calib_file, capsys):
    """A real (registered) transformers model whose layer calls o_proj twice: no sub-group can hold it (its two
    inputs differ), so `quantize` refuses with one line and exit 2 instead of quantizing with a wrong Hessian."""
    AutoConfig.register(TwiceConfig.model_type, TwiceConfig, exist_ok=True)
    AutoModelForCausalLM.register(TwiceConfig, TwiceForCausalLM, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = TwiceConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["TwiceForCausalLM"])
    TwiceForCausalLM(config).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    capsys.readouterr()
    code = main(["quantize", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--calib",
                 str(calib_file), "--nsamples", "2", "--seqlen", "32", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "linear self_attn.o_proj runs 2 times" in err[0]
    assert not list((tmp_path / "out").glob("model-*.safetensors"))

