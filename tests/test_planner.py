"""`leanfoem plan`: the 70B budget on a 24 GB card, the JSON shape, no weights needed, and the host forecast
against a real run's peak RSS on this CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory import build_checkpoint
from leanfoem.cli import main
from leanfoem.planner import GIB, PlanDoesNotFit, check_fits, format_plan, parse_size, plan, shapes_from_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "leanfoem" / "demo" / "model"
DEMO_CALIB = ROOT / "leanfoem" / "demo" / "calibration.txt"

LLAMA_33_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
}


def test_llama_70b_fits_a_24gib_card_and_32gib_host():
    p = plan(LLAMA_33_70B, device="cuda", gpu_memory="24GiB", host_memory="32GiB", nsamples=128, seqlen=2048)
    assert p.fits and p.reasons == []
    assert p.device_peak_bytes <= 24 * GIB and p.host_peak_bytes <= 32 * GIB
    # the down_proj factorisation is the device peak: H fp32 + two fp64 28672² buffers + the bf16 block
    assert p.device_peak_phase.startswith("factorisation") and p.hessian_width == 28672
    assert 16 * GIB < p.device_peak_bytes < 20 * GIB  # measured on an H100: 16.9 GiB allocated + the CUDA context
    assert p.store_bytes == 128 * 2048 * 8192 * 2 and p.stores == 3
    assert 35 * GIB < p.disk_output_bytes < 40 * GIB  # 4-bit g128: ~0.53 bytes per linear weight + bf16 embeddings
    assert p.batch_tokens % 2048 == 0 and p.batch_tokens >= 2048
    check_fits(p)


def test_budget_too_small_is_refused_with_the_numbers():
    p = plan(LLAMA_33_70B, device="cuda", gpu_memory="12GiB", host_memory="32GiB", nsamples=128, seqlen=2048)
    assert not p.fits
    with pytest.raises(PlanDoesNotFit, match=r"exceeds the GPU budget 12.00 GiB") as info:
        check_fits(p)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    tight_host = plan(LLAMA_33_70B, device="cuda", gpu_memory="24GiB", host_memory="4GiB", nsamples=128, seqlen=2048)
    assert not tight_host.fits and "host budget" in tight_host.reasons[0]


def test_gptaq_doubles_the_hessian_and_the_stores():
    foem = plan(LLAMA_33_70B, device="cuda", nsamples=128, seqlen=2048, batch_tokens=4096)
    gptaq = plan(LLAMA_33_70B, device="cuda", nsamples=128, seqlen=2048, batch_tokens=4096, method="foem", alpha=0.25)
    assert gptaq.stores == 6 and gptaq.disk_work_bytes == 2 * foem.disk_work_bytes
    assert gptaq.device_peak_bytes - foem.device_peak_bytes >= 28672 ** 2 * 4 + 1.5 * GIB  # C + native block


def test_activation_stores_stream_from_disk_when_the_page_cache_cannot_hold_them():
    roomy = plan(LLAMA_33_70B, device="cuda", host_memory="64GiB", nsamples=128, seqlen=2048)
    between = max(roomy.host_required_bytes,  # the process fits, its stores do not
                  roomy.host_phases["block work"] + roomy.stores * roomy.store_bytes // 2)
    tight = plan(LLAMA_33_70B, device="cuda", host_memory=between, nsamples=128, seqlen=2048)
    assert roomy.activation_store == "ram" and tight.activation_store == "file" and tight.fits
    # read and written with pread/pwrite, the stores are never part of the resident set
    assert roomy.host_peak_bytes == roomy.host_required_bytes and tight.host_peak_bytes <= roomy.host_peak_bytes


def test_cpu_keeps_the_down_proj_inputs_only_when_they_fit_in_ram():
    config = dict(LLAMA_33_70B, num_hidden_layers=2)
    assert plan(config, device="cpu", nsamples=8, seqlen=512).keeps_mlp_inputs
    assert not plan(config, device="cuda", nsamples=8, seqlen=512).keeps_mlp_inputs
    cpu = plan(config, device="cpu", host_memory="64GiB", nsamples=8, seqlen=512)
    room = max(cpu.host_required_bytes, cpu.host_phases["block work"] + cpu.stores * cpu.store_bytes)
    short = plan(config, device="cpu", host_memory=room, nsamples=8, seqlen=512)
    assert cpu.keeps_mlp_inputs and not short.keeps_mlp_inputs and short.activation_store == "ram"
    assert cpu.disk_work_bytes == short.disk_work_bytes + 8 * 512 * 28672 * 4  # the kept inputs' file


def test_sizes_parse():
    assert parse_size("24GiB") == parse_size("24G") == 24 * GIB
    assert parse_size("24GB") == 24 * 10 ** 9 and parse_size("1.5TiB") == int(1.5 * 2 ** 40) and parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


def test_plan_cli_json_from_config_alone(tmp_path, capsys):
    """Only config.json in the directory: no weights, no tokenizer."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_33_70B))
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory", "24GiB", "--host-memory", "32GiB",
                 "--nsamples", "128", "--seqlen", "2048", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for key in ("device_peak_bytes", "host_peak_bytes", "disk_bytes", "fits", "batch_tokens", "activation_store",
                "disk_output_bytes", "disk_work_bytes", "hessian_chunk_tokens", "items"):
        assert key in result
    assert result["fits"] is True and result["device"] == "cuda"
    assert any("device peak" in line for line in out[:-1])
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--device", "cpu", "--nsamples", "16"]) == 0
    assert "device cpu" in capsys.readouterr().out


def test_plan_cli_bad_model(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 2
    assert "config.json" in capsys.readouterr().err


def _peak_rss_of(cmd: list[str]) -> int:
    """ru_maxrss of a child run in a fresh interpreter (children's maxrss is a high-water mark)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_host_forecast_matches_a_real_cpu_run(tmp_path):
    model = build_checkpoint(tmp_path / "m", DEMO_TOKENIZER, hidden=512, intermediate=1536, heads=8, kv_heads=4,
                             layers=1, max_shard_size="2MB")
    settings = {"nsamples": 16, "seqlen": 128, "group_size": 128}
    cmd = [sys.executable, "-m", "leanfoem", "quantize", "--model", str(model), "--out", str(tmp_path / "out"),
           "--calib", str(DEMO_CALIB), "--nsamples", "16", "--seqlen", "128", "--group-size", "128", "--quiet"]
    measured = _peak_rss_of(cmd)
    forecast = plan(model, device="cpu", calib_bytes=DEMO_CALIB.stat().st_size, batch_tokens=4096,
                    **settings).host_peak_bytes
    assert forecast == pytest.approx(measured, rel=0.3), (forecast, measured)


@pytest.mark.parametrize("architecture", ["BlorbForCausalLM", "DeepseekV3ForCausalLM"])
def test_plan_refuses_what_quantize_refuses(tmp_path, capsys, architecture):
    """No "fits: yes" for a model that `quantize` would refuse: the same one-line cause, exit 2."""
    model = build_checkpoint(tmp_path / "model", DEMO_TOKENIZER, layers=1, hidden=64)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    capsys.readouterr()  # the factory's progress bars
    assert main(["plan", "--model", str(model)]) == 2
    planned = capsys.readouterr()
    assert main(["quantize", "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    quantized = capsys.readouterr()
    assert planned.out == ""
    assert planned.err == quantized.err and planned.err.count("\n") == 1, planned.err
    assert f"unsupported architecture {architecture}" in planned.err


# -- mixture-of-experts models (tests/configs: the published config.json files) --------------------------------------

CONFIGS = ROOT / "tests" / "configs"
CALIBRATION_128x2048 = {"nsamples": 128, "seqlen": 2048}


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name / "config.json").read_text())


def test_deepseek_v3_fits_a_24gib_card_and_64gib_host():
    p = plan(CONFIGS / "DeepSeek-V3", device="cuda", gpu_memory="24GiB", host_memory="64GiB", **CALIBRATION_128x2048)
    assert p.fits and p.reasons == [] and p.device_peak_bytes <= 24 * GIB and p.host_peak_bytes <= 64 * GIB
    assert (p.experts, p.expert_intermediate, p.top_k, p.shared_experts) == (256, 2048, 8, 1)
    assert (p.moe_blocks, p.dense_blocks) == (58, 3)  # first_k_dense_replace = 3
    assert 256 % p.expert_group == 0 and p.expert_groups == 256 // p.expert_group and p.expert_group >= 8
    assert p.expert_calibration == "all" and p.source_fp8
    assert p.hessian_width == 18432  # the dense blocks' down_proj
    assert p.activation_store == "ram"  # 3 stores + the experts' inputs + the fp32 accumulator fit the page cache
    assert p.expert_files_bytes == 128 * 2048 * 7168 * (2 + 4)
    check_fits(p)


def test_deepseek_v3_attention_is_mla_and_its_first_blocks_dense():
    s = shapes_from_config(_config("DeepSeek-V3"))
    dense, moe = s.blocks
    assert (dense.kind, dense.count, moe.kind, moe.count) == ("dense", 3, "MoE", 58)
    assert s.attention_linears == {"q_a_proj": (1536, 7168), "q_b_proj": (128 * 192, 1536),
                                   "kv_a_proj_with_mqa": (512 + 64, 7168), "kv_b_proj": (128 * 256, 512),
                                   "o_proj": (7168, 128 * 128)}
    assert s.attention_subgroups[0] == (("q_a_proj", "kv_a_proj_with_mqa"), 7168)
    assert [n for _, n in s.attention_subgroups] == [7168, 1536, 512, 16384]
    assert dense.linears["down_proj"] == (7168, 18432)
    assert moe.linears["shared_expert.down_proj"] == (7168, 2048)  # 1 shared expert of moe_intermediate_size
    assert "down_proj" not in moe.linears and s.expert_linears["down_proj"] == (7168, 2048)
    no_q_lora = shapes_from_config(dict(_config("DeepSeek-V3"), q_lora_rank=None))
    assert "q_proj" in no_q_lora.attention_linears and "q_b_proj" not in no_q_lora.attention_linears


def test_qwen3_235b_fits_a_24gib_card_and_32gib_host():
    p = plan(CONFIGS / "Qwen3-235B-A22B", device="cuda", gpu_memory="24GiB", host_memory="32GiB",
             **CALIBRATION_128x2048)
    assert p.fits and p.device_peak_bytes <= 24 * GIB and p.host_peak_bytes <= 32 * GIB
    assert (p.experts, p.expert_intermediate, p.top_k, p.shared_experts) == (128, 1536, 8, 0)
    assert (p.moe_blocks, p.dense_blocks) == (94, 0) and not p.source_fp8
    assert 128 % p.expert_group == 0


@pytest.mark.parametrize("name", ["Qwen3-30B-A3B", "Mixtral-8x7B"])
def test_smaller_moe_models_fit_a_24gib_card(name):
    p = plan(CONFIGS / name, device="cuda", gpu_memory="24GiB", host_memory="32GiB", **CALIBRATION_128x2048)
    assert p.fits and p.expert_group and p.experts % p.expert_group == 0


def test_moe_plan_from_a_transformers_config_equals_the_one_from_config_json():
    """The pipeline plans from a PretrainedConfig, whose to_dict() renames fields (num_experts → num_local_experts,
    DeepSeek's head_dim = the rope part): the plan must not change."""
    from transformers import AutoConfig
    for name in ("DeepSeek-V3", "Qwen3-235B-A22B", "Mixtral-8x7B"):
        fields = _config(name)
        config = AutoConfig.for_model(fields["model_type"], **{k: v for k, v in fields.items() if k != "model_type"})
        settings = dict(device="cuda", gpu_memory="24GiB", host_memory="32GiB", **CALIBRATION_128x2048)
        assert plan(config, **settings).to_dict() == plan(fields, **settings).to_dict(), name


def test_expert_group_shrinks_with_the_budget():
    big = plan(CONFIGS / "DeepSeek-V3", device="cuda", gpu_memory="24GiB", host_memory="64GiB", **CALIBRATION_128x2048)
    small = plan(CONFIGS / "DeepSeek-V3", device="cuda", gpu_memory="14GiB", host_memory="64GiB",
                 **CALIBRATION_128x2048)
    assert big.fits and small.fits and small.expert_group < big.expert_group
    assert small.expert_groups > big.expert_groups and 256 % small.expert_group == 0
    # and a larger group than the chosen one would not have fit
    larger = plan(CONFIGS / "DeepSeek-V3", device="cuda", gpu_memory="14GiB", host_memory="64GiB",
                  expert_group=2 * small.expert_group, batch_tokens=2048, **CALIBRATION_128x2048)
    assert not larger.fits
    # the host budget bounds the group too (on the CPU the group lives in host memory)
    roomy = plan(CONFIGS / "Qwen3-30B-A3B", device="cpu", host_memory="64GiB", **CALIBRATION_128x2048)
    tight = plan(CONFIGS / "Qwen3-30B-A3B", device="cpu", host_memory="4GiB", **CALIBRATION_128x2048)
    assert roomy.fits and tight.fits and tight.expert_group < roomy.expert_group


def test_moe_refused_with_the_numbers_when_one_expert_per_group_does_not_fit():
    p = plan(CONFIGS / "Mixtral-8x7B", device="cuda", gpu_memory="4GiB", host_memory="32GiB", **CALIBRATION_128x2048)
    assert not p.fits and p.expert_group == 1
    with pytest.raises(PlanDoesNotFit, match=r"even with one expert per group, device peak .* exceeds the GPU "
                                             r"budget 4.00 GiB") as info:
        check_fits(p)
    assert "\n" not in str(info.value)
    assert "fits: NO" in format_plan(p)


def test_expert_group_given_is_kept_and_checked():
    p = plan(CONFIGS / "Qwen3-235B-A22B", device="cuda", gpu_memory="24GiB", host_memory="32GiB", expert_group=3,
             **CALIBRATION_128x2048)
    assert p.fits and p.expert_group == 3 and p.expert_groups == 43  # 42 groups of 3, then one of 2
    assert plan(CONFIGS / "Qwen3-235B-A22B", device="cuda", expert_group=1000).expert_group == 128
    assert not plan(CONFIGS / "Qwen3-235B-A22B", device="cuda", gpu_memory="8GiB", expert_group=128).fits


def test_routed_calibration_needs_more_memory_than_all():
    settings = dict(device="cuda", gpu_memory="24GiB", host_memory="64GiB", **CALIBRATION_128x2048)
    every = plan(CONFIGS / "DeepSeek-V3", expert_group=16, batch_tokens=4096, **settings)
    routed = plan(CONFIGS / "DeepSeek-V3", expert_group=16, batch_tokens=4096, expert_calibration="routed", **settings)
    assert routed.expert_calibration == "routed"
    # one H×H Hessian (and its factor) for the whole block, against one per expert of the group
    loop = "expert group: gate/up column loop (experts stacked)"
    assert routed.device_phases[loop] - every.device_phases[loop] == (16 - 2) * 7168 ** 2 * 4
    assert routed.device_peak_bytes > every.device_peak_bytes
    chosen_all = plan(CONFIGS / "DeepSeek-V3", **settings)
    chosen_routed = plan(CONFIGS / "DeepSeek-V3", expert_calibration="routed", **settings)
    assert chosen_routed.expert_group < chosen_all.expert_group
    with pytest.raises(ValueError, match="expert_calibration"):
        plan(CONFIGS / "DeepSeek-V3", expert_calibration="some")


def test_fp8_source_is_read_as_stored_and_dequantized_one_tensor_at_a_time():
    fp8_config = _config("DeepSeek-V3")
    bf16_config = {k: v for k, v in fp8_config.items() if k != "quantization_config"}
    settings = dict(device="cuda", gpu_memory="24GiB", host_memory="64GiB", expert_group=64, batch_tokens=4096,
                    **CALIBRATION_128x2048)
    fp8, bf16 = plan(fp8_config, **settings), plan(bf16_config, **settings)
    assert fp8.source_fp8 and not bf16.source_fp8
    assert fp8.host_peak_phase == bf16.host_peak_phase == "reading an expert group"
    expert = 3 * 7168 * 2048
    reading = "the group's 64 experts as stored + shard pages while read"
    assert _host_item(fp8, reading) == 2 * 64 * (expert + 4 * 3 * (7168 // 128) * (2048 // 128))  # + fp32 scales
    assert _host_item(bf16, reading) == 2 * 64 * expert * 2
    assert _host_item(fp8, "one FP8 tensor dequantized (fp32 product, bf16 copy)") == 6 * 7168 * 2048
    assert fp8.host_peak_bytes < bf16.host_peak_bytes
    # the device holds the compute dtype either way; the output does not depend on the source
    assert fp8.device_peak_bytes == bf16.device_peak_bytes and fp8.disk_output_bytes == bf16.disk_output_bytes
    assert "FP8" in format_plan(fp8) and "FP8" not in format_plan(bf16)


def _host_item(p, name: str) -> int:
    return next(item.bytes for item in p.items if item.where == "host" and item.name == name)


def test_dense_layers_and_shared_experts_from_config_fields():
    """Which layers route (mlp_only_layers, decoder_sparse_step, first_k_dense_replace) and the shared expert
    (its own width and a sigmoid gate, or n experts fused) come from fields, not from the family."""
    qwen = _config("Qwen3-30B-A3B")
    assert shapes_from_config(dict(qwen, mlp_only_layers=[0, 1])).moe_layers == 46
    assert shapes_from_config(dict(qwen, decoder_sparse_step=2)).moe_layers == 24
    gated = shapes_from_config(dict(qwen, shared_expert_intermediate_size=5632))
    assert (gated.shared_experts, gated.shared_intermediate, gated.shared_gate) == (1, 5632, True)
    fused = shapes_from_config(dict(_config("DeepSeek-V3"), n_shared_experts=2))
    assert (fused.shared_experts, fused.shared_intermediate, fused.shared_gate) == (2, 4096, False)
    mixtral = shapes_from_config(_config("Mixtral-8x7B"))
    assert (mixtral.experts, mixtral.expert_intermediate, mixtral.top_k) == (8, 14336, 2)
    assert shapes_from_config(LLAMA_33_70B).moe_layers == 0 and len(shapes_from_config(LLAMA_33_70B).blocks) == 1


def test_expert_group_prefers_equal_groups():
    from leanfoem.planner import _expert_group
    fits_up_to = lambda most: (lambda g: g <= most)  # noqa: E731
    assert _expert_group(fits_up_to(63), 256) == 32     # a divisor: 8 equal groups
    assert _expert_group(fits_up_to(13), 60) == 12
    assert _expert_group(fits_up_to(500), 128) == 128
    assert _expert_group(fits_up_to(6), 7) == 4         # a prime count: two balanced groups, not seven of one
    assert _expert_group(fits_up_to(0), 8) is None


@pytest.mark.parametrize("name, budgets", [("DeepSeek-V3", ["--gpu-memory", "24GiB", "--host-memory", "64GiB"]),
                                           ("Qwen3-235B-A22B", ["--gpu-memory", "24GiB", "--host-memory", "32GiB"])])
def test_plan_cli_on_moe_configs(capsys, name, budgets):
    assert main(["plan", "--model", str(CONFIGS / name), *budgets, "--nsamples", "128", "--seqlen", "2048",
                 "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["fits"] is True and result["expert_group"] >= 1
    assert result["source_fp8"] is (name == "DeepSeek-V3")  # the CLI plans the source as stored, fp8 included
    line = next(line for line in out if line.lstrip().startswith("experts "))
    assert f"groups of {result['expert_group']} experts ({result['expert_groups']} group" in line
    assert "  fits: yes" in out
    assert main(["plan", "--model", str(CONFIGS / name), *budgets, "--expert-calibration", "routed",
                 "--expert-group", "2", "--json"]) == 0
    routed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert routed["expert_group"] == 2 and routed["expert_calibration"] == "routed"
