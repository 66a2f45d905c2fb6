"""`--dtype`: the decision from CPU flags and probe timings (independent of the machine the tests run on), the
parsing of /proc/cpuinfo, the command-line option, and what the planner makes of the dtype."""

from __future__ import annotations

import pytest
import torch

from leanfoem.cli import build_parser
from leanfoem.dtype_choice import FASTER_BY, NATIVE_BF16_FLAGS, choose, cpu_flags, decide
from leanfoem.planner import plan

X86_NO_BF16 = {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}            # the AMD EPYC (Zen 3) here
X86_AMX = X86_NO_BF16 | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}  # Sapphire Rapids and later


def test_no_native_bf16_flag_means_fp32_whatever_the_timings():
    for timings in (None, (1.0, 0.1)):
        choice = decide(X86_NO_BF16, timings)
        assert choice.dtype == torch.float32 and "no native bf16" in choice.reason


@pytest.mark.parametrize("flags", [X86_AMX, X86_NO_BF16 | {"avx512_bf16"}, {"fp", "asimd", "bf16"}],
                         ids=["amx", "avx512_bf16", "aarch64"])
def test_native_bf16_is_chosen_only_when_the_probe_finds_it_faster(flags):
    fast = decide(flags, (1.0, 1.0 / (FASTER_BY * 2)))
    assert fast.dtype == torch.bfloat16 and "x as fast as fp32" in fast.reason
    assert decide(flags, (1.0, 1.0 / FASTER_BY)).dtype == torch.bfloat16   # the threshold itself counts as faster
    slow = decide(flags, (1.0, 1.0 / (FASTER_BY * 0.9)))
    assert slow.dtype == torch.float32 and "only" in slow.reason
    assert decide(flags, None).dtype == torch.float32                      # not timed: never a guess


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "cpuinfo-x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile\n"
                   "bugs\t\t: spectre_v1\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile\n")
    assert {"avx512_bf16", "amx_bf16", "amx_tile", "avx2"} <= cpu_flags(x86)
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm bf16 i8mm\n")
    assert "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "absent") <= {"avx512_bf16"}  # only what torch's own probe may add


def test_auto_on_this_machine_follows_its_flags():
    choice = choose("auto", torch.device("cpu"), torch.float32)
    assert choice.reason.startswith("auto: ")
    if not cpu_flags() & NATIVE_BF16_FLAGS:  # e.g. the AMD EPYC here: emulated bf16 is never chosen
        assert choice.dtype == torch.float32


def test_an_explicit_dtype_is_kept_and_an_accelerator_keeps_its_default():
    assert choose("bfloat16", torch.device("cpu"), torch.float32).dtype == torch.bfloat16
    assert choose("float32", torch.device("cuda"), torch.bfloat16).dtype == torch.float32
    auto = choose("auto", torch.device("cuda"), torch.float16)
    assert auto.dtype == torch.float16 and auto.name == "float16"


@pytest.mark.parametrize("command", [["quantize", "--model", "m", "--out", "o"], ["plan", "--model", "m"]])
def test_dtype_option(command, capsys):
    parser = build_parser()
    assert parser.parse_args(command).dtype == "auto"
    assert parser.parse_args(command + ["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(command + ["--dtype", "float16"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_planner_counts_the_forward_dtype():
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "dtype": "bfloat16"}
    fp32 = plan(config, device="cpu", batch_tokens=4096)
    bf16 = plan(config, device="cpu", batch_tokens=4096, compute_dtype="bfloat16")
    assert fp32.compute_dtype == "float32" and bf16.compute_dtype == "bfloat16"
    assert bf16.store_bytes * 2 == fp32.store_bytes
    assert bf16.device_peak_bytes < fp32.device_peak_bytes
