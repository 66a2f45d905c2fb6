"""`leanfoem eval` against an independent plain-transformers perplexity on the same windows."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gptq_decode import dense_state_dict
from leanfoem.cli import main

SEQLEN, WINDOWS = 512, 4


def reference_perplexity(model, tokenizer, text):
    """Whole model in memory, fp32, one forward per window; the loss the transformers way."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    nll = 0.0
    with torch.no_grad():
        for k in range(WINDOWS):
            window = ids[k * SEQLEN:(k + 1) * SEQLEN][None]
            nll += model(window, labels=window).loss.item() * (SEQLEN - 1)
    return math.exp(nll / (WINDOWS * (SEQLEN - 1)))


def eval_cli(model_dir, text_file, capsys):
    assert main(["eval", "--model", str(model_dir), "--text", str(text_file), "--seqlen", str(SEQLEN),
                 "--windows", str(WINDOWS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == WINDOWS and result["tokens"] == WINDOWS * (SEQLEN - 1) and result["seconds"] > 0
    return result["perplexity"]


@pytest.mark.slow
def test_eval_matches_plain_transformers_on_smollm2_fp(smollm2_dir, shared_data, capsys):
    wikitext = shared_data / "wikitext2" / "wiki.test.raw"
    ours = eval_cli(smollm2_dir, wikitext, capsys)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected = reference_perplexity(model, AutoTokenizer.from_pretrained(smollm2_dir), wikitext.read_text())
    assert ours == pytest.approx(expected, rel=0.005)
    assert 20 < ours < 45  # SmolLM2-135M on wikitext-2 at 512 tokens is about 30


@pytest.mark.slow
def test_eval_matches_plain_transformers_on_quantized_smollm2(smollm2_w4g64, shared_data, capsys):
    wikitext = shared_data / "wikitext2" / "wiki.test.raw"
    ours = eval_cli(smollm2_w4g64, wikitext, capsys)
    config = AutoConfig.from_pretrained(smollm2_w4g64)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dense_state_dict(smollm2_w4g64), strict=False)
    model.tie_weights()
    expected = reference_perplexity(model.eval(), AutoTokenizer.from_pretrained(smollm2_w4g64), wikitext.read_text())
    assert ours == pytest.approx(expected, rel=0.005)


def test_eval_refuses_text_shorter_than_a_window(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main(["eval", "--model", "demo", "--text", str(short), "--seqlen", "512"]) == 2
    assert "too short" in capsys.readouterr().err
