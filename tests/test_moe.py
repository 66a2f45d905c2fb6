"""Mixture-of-experts families on tiny real checkpoints (tests/factory.py: transformers' own configs and modules,
8 experts, top-2, shards that split a block; DeepSeek-V3 and GLM-4.5 with a dense first layer): the streamed forward
is the full model's, every expert of every MoE block is quantized under its stored names, routers are copied as
stored, `leanfoem eval` agrees with plain transformers on source and output and, reading the experts a group at a
time, gives the whole block's forward bit for bit, a killed run resumes to the same bits, and bad MoE input gets one
line. No family needs code: experts and routers are found in the block, their stored
names in transformers' conversion mapping."""

import json
import subprocess
import sys
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from factory import CALIB, MOE_FAMILIES, build_checkpoint
from perplexity import eval_cli, reference_perplexity
from test_families import SEQLEN, WINDOWS, streamed_logits
from test_pipeline import assert_well_formed, index_of, quantize_cli
from test_resume import assert_identical, kill_moments, run_with_kills
from leanfoem.architectures import architecture_for
from leanfoem.blocks import BlockRunner
from leanfoem.checkpoint_reader import CheckpointReader
from leanfoem import expert_evaluation
from leanfoem.cli import main
from leanfoem.divergence import evaluate_divergence
from leanfoem.evaluation import ModelSource, dense_tensors, final_hidden_states, gptq_settings
from leanfoem.experts import RoutedCall, add_routed

EXPERTS = 8


def full_model(model_dir):
    """The whole model the plain transformers way, with the eager experts loop (the arithmetic leanfoem replays;
    transformers' default grouped_mm sums in another order)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                experts_implementation="eager").eval()


def expert_weights(model_dir) -> dict[str, torch.Tensor]:
    """The per-expert weights of a checkpoint as stored (dequantized for a GPTQ one), by stored name."""
    config = AutoConfig.from_pretrained(model_dir)
    out = {}
    for name, shard in index_of(model_dir).items():
        if ".experts." in name:
            with safe_open(str(model_dir / shard), "pt") as f:
                out[name] = f.get_tensor(name)
    return dense_tensors(out, gptq_settings(config))


def dense_twin(out, where):
    """The quantized checkpoint dequantized into a plain one (transformers fuses its experts when loading it)."""
    config = AutoConfig.from_pretrained(out)
    gptq = gptq_settings(config)
    tensors = {}
    for shard in sorted(set(index_of(out).values())):
        with safe_open(str(out / shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    del config.quantization_config
    config.save_pretrained(where)
    save_file({k: v.contiguous() for k, v in dense_tensors(tensors, gptq).items()}, where / "model.safetensors")
    return full_model(where)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_streamed_forward_is_the_full_models_bit_for_bit(tmp_path, tokenizer_dir, family):
    model_dir = build_checkpoint(tmp_path / family, tokenizer_dir, family=family)
    ids = AutoTokenizer.from_pretrained(model_dir)(CALIB[:400], return_tensors="pt")["input_ids"][0, :SEQLEN]
    with torch.no_grad():
        expected = full_model(model_dir)(ids[None]).logits[0]
    assert torch.equal(streamed_logits(model_dir, ids), expected)


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_every_expert_is_quantized_under_its_stored_name_and_evaluates_like_transformers(
        tmp_path, calib_file, tokenizer_dir, capsys, family):
    """Groups of 3 experts (8 = 3 + 3 + 2): routers, shared-expert gates and score-correction biases copied as
    stored; every stored expert projection packed under its own name; the dequantized experts close to the
    originals; the run log has each expert's routed tokens, Hessian tokens and damping; eval within 0.5% of plain
    transformers on the source and on the output."""
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family=family)
    block = max(int(n.split(".")[2]) for n in index_of(source) if ".experts." in n)  # an MoE block
    assert len({v for k, v in index_of(source).items() if k.startswith(f"model.layers.{block}.")}) > 1
    out = tmp_path / "out"
    quantize_cli(source, out, calib_file, "--expert-group", "3")
    capsys.readouterr()
    assert_well_formed(out, source, 4, 64)
    stored, written = index_of(source), index_of(out)
    experts = [n[: -len(".weight")] for n in stored if ".experts." in n]
    moe_blocks = {n.split(".experts.")[0] for n in experts}
    assert len(experts) == EXPERTS * 3 * len(moe_blocks)
    assert all(f"{name}.{part}" in written for name in experts for part in ("qweight", "qzeros", "scales", "g_idx"))
    assert not any(n.endswith(".weight") and ".experts." in n for n in written)
    kept = [n for n in stored if n.endswith(("gate.weight", "e_score_correction_bias"))]
    assert kept and all(n in written for n in kept)
    original, quantized = expert_weights(source), expert_weights(out)
    errors = sorted(((quantized[n] - original[n].float()).norm() / original[n].float().norm()).item()
                    for n in original)
    assert errors[-1] < 0.2
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    per_expert = [e for e in events if e["event"] == "expert"]
    assert len(per_expert) == EXPERTS * len(moe_blocks)
    assert all(e["hessian_tokens"] == 8 * SEQLEN and e["damp"] > 0 and e["routed_tokens"] >= 0 for e in per_expert)
    assert sum(e["routed_tokens"] for e in per_expert) == 2 * 8 * SEQLEN * len(per_expert) // EXPERTS
    assert [e["least_routed"] for e in events if e["event"] == "experts"]

    ids = torch.tensor(AutoTokenizer.from_pretrained(source)(calib_file.read_text())["input_ids"])
    assert eval_cli(source, calib_file, capsys, SEQLEN, WINDOWS) == pytest.approx(
        reference_perplexity(full_model(source), ids, SEQLEN, WINDOWS), rel=0.005)
    twin = dense_twin(out, tmp_path / "twin")
    assert eval_cli(out, calib_file, capsys, SEQLEN, WINDOWS) == pytest.approx(
        reference_perplexity(twin, ids, SEQLEN, WINDOWS), rel=0.005)


def test_routed_sums_of_groups_are_the_experts_modules_output_bit_for_bit(tmp_path, tokenizer_dir):
    """`add_routed` over groups of 3 into one accumulator equals the experts module's own eager forward with all
    experts loaded: grouping changes nothing."""
    model_dir = build_checkpoint(tmp_path / "m", tokenizer_dir, family="qwen3_moe", layers=1)
    config = AutoConfig.from_pretrained(model_dir)
    runner = BlockRunner(config, CheckpointReader(model_dir), architecture_for(config), torch.device("cpu"),
                         torch.float32)
    block = runner.load(0, runner.source_tensors(0))
    module = block.mlp.experts
    torch.manual_seed(0)
    hidden = torch.randn(50, config.hidden_size)
    _, weights, index = block.mlp.gate(hidden)
    with torch.no_grad():
        expected = module(hidden, index, weights)
    acc = torch.zeros_like(hidden)
    for first in range(0, EXPERTS, 3):
        experts = range(first, min(first + 3, EXPERTS))
        gate_up, down = (runner.expert_weights(0, "mlp.experts", experts, p) for p in ("gate_up_proj", "down_proj"))
        add_routed(acc, RoutedCall(hidden, index, weights), module, first, gate_up, down)
    assert torch.equal(acc, expected)


def test_routed_calibration_falls_back_to_all_tokens_for_an_expert_no_token_reaches(tmp_path, tokenizer_dir,
                                                                                    calib_file):
    """DeepSeek-V3 routing with expert 5's score-correction bias far below the others: no token is routed to it.
    In routed mode it still gets quantized, from all tokens' statistics, and the log says so."""
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="deepseek_v3")
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    shard = source / index_of(source)[name]
    with safe_open(str(shard), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[name][5] = -100.0
    save_file(tensors, shard, metadata)
    out = tmp_path / "out"
    quantize_cli(source, out, calib_file, "--expert-calibration", "routed")
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    five = next(e for e in events if e["event"] == "expert" and e["module"].endswith("experts.5"))
    assert five["routed_tokens"] == 0 and five["hessian_tokens"] == 8 * SEQLEN and "all tokens" in five["fallback"]
    others = [e for e in events if e["event"] == "expert" and not e["module"].endswith("experts.5")]
    assert all(e["hessian_tokens"] == e["routed_tokens"] > 0 for e in others)
    assert "model.layers.1.mlp.experts.5.down_proj.qweight" in index_of(out)
    summary = next(e for e in events if e["event"] == "experts")
    assert summary["least_routed"].startswith("5 (0)") and summary["all_token_fallbacks"] == 1


def test_killed_moe_runs_resume_to_bit_identical_output(tmp_path, tokenizer_dir, calib_file, family="deepseek_v3"):
    """DeepSeek-V3 (a dense first block, MLA, shared and routed experts), experts in groups of 3: SIGKILL at random
    moments, the same command each time, and the output is the uninterrupted run's, bit for bit. One family here for
    CI's time: every family passed it when it was written (fd03c59), the expert loop is the same code for all, and
    tests/test_distributed.py kills a Qwen3-MoE run under 2 ranks the same way."""
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family=family, layers=3)

    def command(out):
        return [sys.executable, "-m", "leanfoem", "quantize", "--model", str(source), "--out", str(out), "--calib",
                str(calib_file), "--nsamples", "4", "--seqlen", "64", "--group-size", "64", "--expert-group", "3",
                "--quiet"]

    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in (reference / "quantize_log.jsonl").read_text().splitlines()]
    t0 = events[0]["time"] - 3.0  # start-up before the first record
    timeline = [(e["event"], e["time"] - t0) for e in events if e["event"] in ("start", "block", "done")]
    out = tmp_path / "killed"
    landed = run_with_kills(command(out), out, reference, kill_moments(timeline, 3, seed=len(family)))
    assert landed, "no kill landed before the run finished"
    assert_identical(reference, out)


@pytest.mark.parametrize("damage,message", [
    ("missing_expert", "tensor model.layers.1.mlp.experts.6.up_proj.weight is missing from the checkpoint"),
    ("nan_router", "tensor model.layers.1.mlp.gate.weight holds NaN or Inf values"),
])
def test_bad_moe_input_gets_one_line_and_exit_2(tmp_path, tokenizer_dir, calib_file, capsys, damage, message):
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="qwen3_moe")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    if damage == "missing_expert":
        name = "model.layers.1.mlp.experts.6.up_proj.weight"
        shard = source / index["weight_map"].pop(name)
        with safe_open(str(shard), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys() if k != name}, f.metadata()
        save_file(tensors, shard, metadata)
        (source / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        name = "model.layers.1.mlp.gate.weight"
        shard = source / index["weight_map"][name]
        with safe_open(str(shard), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors[name][3, 7] = float("nan")
        save_file(tensors, shard, metadata)
    capsys.readouterr()
    code = main(["quantize", "--model", str(source), "--out", str(tmp_path / "out"), "--calib", str(calib_file),
                 "--nsamples", "2", "--seqlen", "32", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_gptaq_is_refused_for_moe_models_up_front_by_quantize_and_plan(tmp_path, tokenizer_dir, calib_file, capsys):
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="mixtral", layers=1)
    capsys.readouterr()
    code = main(["quantize", "--model", str(source), "--out", str(tmp_path / "out"), "--calib", str(calib_file),
                 "--nsamples", "2", "--seqlen", "32", "--alpha", "0.25", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "GPTAQ" in err[0] and not (tmp_path / "out").exists()
    assert main(["plan", "--model", str(source), "--alpha", "0.25"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == err


def test_a_layer_past_the_last_block_is_left_out_and_said(tmp_path, tokenizer_dir, calib_file, capsys):
    """DeepSeek-V3/R1 store a multi-token-prediction layer after the last block (`model.layers.61.*` with 61 layers,
    `num_nextn_predict_layers` 1). transformers builds no module for it: leanfoem neither quantizes nor copies it,
    and says so on screen and in the log instead of dropping it silently."""
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="deepseek_v3")
    extra = {"model.layers.2.eh_proj.weight": torch.randn(128, 256).to(torch.bfloat16),
             "model.layers.2.enorm.weight": torch.ones(128, dtype=torch.bfloat16),
             "model.layers.2.hnorm.weight": torch.ones(128, dtype=torch.bfloat16)}
    save_file(extra, source / "model-mtp.safetensors", {"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"].update({name: "model-mtp.safetensors" for name in extra})
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=1)))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["quantize", "--model", str(source), "--out", str(out), "--calib", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--group-size", "64"]) == 0
    said = capsys.readouterr().out
    assert "model.layers.2 (3 tensors) lies past the model's 2 decoder layers" in said
    assert not any(n.startswith("model.layers.2.") for n in index_of(out))
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    assert [(e["layer"], e["tensors"]) for e in events if e["event"] == "left_out"] == [(2, 3)]


# -- eval: routed experts a group at a time ----------------------------------------------------------------------
EVAL_SEQLEN, EVAL_WINDOWS, EVAL_BATCH_TOKENS = 64, 4, 128  # two batches of two windows: groups outside batches


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def moe_pair(request, tmp_path_factory, tokenizer_dir, calib_file):
    """(fp checkpoint, its GPTQ checkpoint written by leanfoem) of one MoE family: 8 experts, top-4 (four routed
    outputs per token, so the order they are summed in shows in the bits)."""
    where = tmp_path_factory.mktemp(request.param)
    source = build_checkpoint(where / "fp", tokenizer_dir, family=request.param, num_experts_per_tok=4)
    quantize_cli(source, where / "gptq", calib_file, "--expert-group", "3")
    return source, where / "gptq"


def eval_ids(model_dir, calib_file) -> torch.Tensor:
    return ModelSource(str(model_dir)).token_ids(calib_file.read_text())


def whole_block_hidden_states(model_dir, ids) -> torch.Tensor:
    """What `leanfoem eval` computed before experts were read a group at a time: every block loaded whole (its
    experts fused into the module, dequantized first for GPTQ), the same batches of windows through the model's own
    eager forward; the hidden states after the last block, [windows, seqlen, hidden]."""
    source = ModelSource(str(model_dir))
    runner = source.runner(torch.device("cpu"))
    hidden = [runner.block_inputs(ids[k * EVAL_SEQLEN:(k + 1) * EVAL_SEQLEN])[0] for k in range(EVAL_WINDOWS)]
    per_batch = EVAL_BATCH_TOKENS // EVAL_SEQLEN
    for index in range(runner.num_blocks):
        block = runner.load(index, dense_tensors(runner.source_tensors(index), source.gptq))
        hidden = [row for k in range(0, EVAL_WINDOWS, per_batch)
                  for row in runner.forward(block, index, torch.stack(hidden[k:k + per_batch]))]
        runner.unload(index)
    return torch.stack(hidden)


def grouped_hidden_states(model_dir, ids, group, work_dir, spill=False) -> torch.Tensor:
    source = ModelSource(str(model_dir))
    hidden = final_hidden_states(source.runner(torch.device("cpu")), source.gptq, ids, EVAL_WINDOWS, EVAL_SEQLEN,
                                 work_dir if spill else None, EVAL_BATCH_TOKENS, work_dir=work_dir, expert_group=group)
    out = torch.stack([hidden.get(k) for k in range(EVAL_WINDOWS)])
    hidden.drop()
    return out


def test_eval_in_expert_groups_is_the_whole_block_forward_bit_for_bit(moe_pair, calib_file, tmp_path):
    """fp and GPTQ checkpoints: experts 1, 3 (8 = 3 + 3 + 2) or 8 at a time, routed inputs in RAM or spilled to a
    file, give the hidden states of the old whole-block path bit for bit; so every figure of `eval --reference` is
    the same whatever the group size."""
    for model_dir in moe_pair:
        ids = eval_ids(model_dir, calib_file)
        expected = whole_block_hidden_states(model_dir, ids)
        for group, spill in [(1, False), (3, True), (8, False)]:
            got = grouped_hidden_states(model_dir, ids, group, tmp_path, spill)
            assert torch.equal(got, expected), (model_dir.name, group, spill)
        assert not list(tmp_path.iterdir())  # routed inputs and sums removed with their block
    fp, gptq = moe_pair
    text = calib_file.read_text()
    figures = [evaluate_divergence(str(gptq), str(fp), text, seqlen=EVAL_SEQLEN, windows=EVAL_WINDOWS, device="cpu",
                                   batch_tokens=EVAL_BATCH_TOKENS, expert_group=group) for group in (1, None)]
    for result in figures:
        del result["seconds"]
    assert figures[0] == figures[1] and figures[0]["kld_mean"] > 0


def test_eval_holds_one_group_of_experts_at_a_time_and_reads_each_expert_once(moe_pair, calib_file, tmp_path,
                                                                              monkeypatch):
    """Observed through the real reader and the real `add_routed`: per MoE block, each group of 3 experts is read
    (every tensor of its experts once), then applied to both batches of windows, then dropped before the next group is
    read; the experts module itself never holds weights (on meta)."""
    gptq = moe_pair[1]
    events, handed = [], []  # ("read", block, experts) / ("add", block, first, count); weakrefs of group weights
    real_tensors, real_add = CheckpointReader.tensors, expert_evaluation.add_routed

    def tensors(self, names):
        experts = {(int(n.split(".")[2]), int(n.split(".experts.")[1].split(".")[0]))
                   for n in names if ".experts." in n}  # (block, expert) of model.layers.B.*.experts.E.*
        if experts:
            assert all(ref() is None for ref in handed), "a group's weights outlived it"
            (block,) = {b for b, _ in experts}
            events.append(("read", block, frozenset(e for _, e in experts), tuple(names)))
        return real_tensors(self, names)

    def add_routed(acc, call, module, first, gate_up, down):
        assert module.gate_up_proj.device.type == "meta" and module.down_proj.device.type == "meta"
        assert gate_up.shape[0] == down.shape[0] <= 3
        handed.extend([weakref.ref(gate_up), weakref.ref(down)])
        block = next(e[1] for e in reversed(events) if e[0] == "read")
        events.append(("add", block, first, gate_up.shape[0]))
        return real_add(acc, call, module, first, gate_up, down)

    monkeypatch.setattr(CheckpointReader, "tensors", tensors)
    monkeypatch.setattr(expert_evaluation, "add_routed", add_routed)
    grouped_hidden_states(gptq, eval_ids(gptq, calib_file), 3, tmp_path)

    stored = [n for n in index_of(gptq) if ".experts." in n]
    read = [n for e in events if e[0] == "read" for n in e[3]]
    assert sorted(read) == sorted(stored)  # every expert tensor read, each once
    blocks = sorted({int(n.split(".")[2]) for n in stored})  # the MoE blocks
    expected = []
    for block in blocks:
        for first in (0, 3, 6):
            count = min(3, EXPERTS - first)
            group = range(first, first + count)  # gate/up of each expert of the group, then down of each
            expected += [("read", block, frozenset([e])) for part in ("gate_up", "down") for e in group]
            expected += [("add", block, first, count)] * (EVAL_WINDOWS * EVAL_SEQLEN // EVAL_BATCH_TOKENS)
    assert [e[:3] if e[0] == "read" else e for e in events] == expected


def test_default_expert_group_fits_half_the_free_memory(monkeypatch):
    """DeepSeek-V3's experts (256 of 3 × 7168 × 2048): 84 MiB each in bf16, so half of 24 GiB free holds 146 of
    them (73 in fp32); on CUDA what torch's cache holds unused counts as free; a given size is kept (at most all
    experts); at least one whatever the memory."""
    from types import SimpleNamespace
    module = SimpleNamespace(num_experts=256, gate_up_proj=torch.empty(256, 4096, 7168, device="meta"),
                             down_proj=torch.empty(256, 7168, 2048, device="meta"))
    monkeypatch.setattr(expert_evaluation.psutil, "virtual_memory", lambda: SimpleNamespace(available=24 << 30))
    assert expert_evaluation.group_size(module, torch.device("cpu"), torch.bfloat16, None) == 146
    assert expert_evaluation.group_size(module, torch.device("cpu"), torch.float32, None) == 73
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 << 30, 24 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 5 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1 << 30)
    assert expert_evaluation.group_size(module, torch.device("cuda"), torch.bfloat16, None) == 146  # 20 + 5 - 1 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 << 20, 24 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    assert expert_evaluation.group_size(module, torch.device("cuda"), torch.bfloat16, None) == 1
    assert expert_evaluation.group_size(module, torch.device("cpu"), torch.bfloat16, 16) == 16
    assert expert_evaluation.group_size(module, torch.device("cpu"), torch.bfloat16, 1000) == 256


def test_only_standard_experts_modules_run_in_groups(tmp_path, tokenizer_dir):
    """DeepSeek-V3's dense first block runs whole, its MoE block in groups; an experts module of another form than
    `add_routed` replays (here: with biases, as GPT-OSS's) runs whole too, in the model's own forward."""
    model_dir = build_checkpoint(tmp_path / "m", tokenizer_dir, family="deepseek_v3")
    runner = ModelSource(str(model_dir)).runner(torch.device("cpu"))
    assert [expert_evaluation.runs_in_groups(layer) for layer in runner.layers] == [False, True]
    experts = runner.layers[1].mlp.experts
    experts.has_bias = True
    assert not expert_evaluation.runs_in_groups(runner.layers[1])
