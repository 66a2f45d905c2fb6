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
