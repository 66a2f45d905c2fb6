"""`leanfoem plan`: the 70B budget on a 24 GB card, the JSON shape, no weights needed, and the host forecast
against a real run's peak RSS on this CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory import build_checkpoint
from leanfoem.cli import main
from leanfoem.planner import GIB, PlanDoesNotFit, check_fits, parse_size, plan

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
