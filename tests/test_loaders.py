"""The output loads, without leanfoem, in the tools people use for GPTQ checkpoints.

Needs `gptqmodel` and `optimum` next to transformers (heavy: C++ kernels compiled on first use), so it is
skipped where they are not installed; docs/BENCHMARKS.md records a run where they are.
"""

import pytest
import torch


@pytest.mark.slow
def test_transformers_gptq_integration_loads_and_answers(smollm2_w4g64):
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (see docs/BENCHMARKS.md)")
    pytest.importorskip("optimum", reason="optimum is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_w4g64, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_w4g64)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids.shape[1]:])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_gptqmodel_loads_moe_outputs_with_experts_under_their_stored_names(tmp_path, tokenizer_dir, calib_file,
                                                                           family):
    """The families GPTQModel 7.7.0 loads (tools/check_moe_loaders.py: Mixtral and GLM-4.5 are refused by GPTQModel
    itself): its logits equal the hand-dequantized checkpoint's up to the precision it computes in."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (see docs/BENCHMARKS.md)")
    from gptqmodel import GPTQModel
    from factory import build_checkpoint
    from test_moe import dense_twin
    from test_pipeline import quantize_cli
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family=family)
    out = tmp_path / "out"
    quantize_cli(source, out, calib_file, "--group-size", "32")  # its CPU kernel: in_features divisible by the group
    ids = torch.tensor([[1, 5, 9, 200, 31, 77, 12, 400]])
    with torch.no_grad():
        theirs = GPTQModel.load(str(out), device="cpu").model(ids).logits.float()
        ours = dense_twin(out, tmp_path / "twin")(ids).logits
    assert ((theirs - ours).norm() / ours.norm()).item() < 0.02
