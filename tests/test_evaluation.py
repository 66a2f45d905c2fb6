"""`leanfoem eval` against an independent plain-transformers perplexity on the same windows."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gptq_decode import dense_state_dict
from perplexity import eval_cli, reference_perplexity
from leanfoem.cli import main
from leanfoem.evaluation import evaluate_perplexity
from leanfoem.packing import dequantize_chunked

SEQLEN, WINDOWS = 512, 4


def token_ids(model_dir, text_file) -> torch.Tensor:
    return torch.tensor(AutoTokenizer.from_pretrained(model_dir)(text_file.read_text())["input_ids"])


@pytest.mark.slow
def test_eval_matches_plain_transformers_on_smollm2_fp(smollm2_dir, shared_data, capsys):
    wikitext = shared_data / "wikitext2" / "wiki.test.raw"
    ours = eval_cli(smollm2_dir, wikitext, capsys, SEQLEN, WINDOWS)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected = reference_perplexity(model, token_ids(smollm2_dir, wikitext), SEQLEN, WINDOWS)
    assert ours == pytest.approx(expected, rel=0.005)
    assert 20 < ours < 45  # SmolLM2-135M on wikitext-2 at 512 tokens is about 30


@pytest.mark.slow
def test_eval_matches_plain_transformers_on_quantized_smollm2(smollm2_w4g64, shared_data, capsys):
    wikitext = shared_data / "wikitext2" / "wiki.test.raw"
    ours = eval_cli(smollm2_w4g64, wikitext, capsys, SEQLEN, WINDOWS)
    config = AutoConfig.from_pretrained(smollm2_w4g64)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dense_state_dict(smollm2_w4g64), strict=False)
    model.tie_weights()
    expected = reference_perplexity(model.eval(), token_ids(smollm2_w4g64, wikitext), SEQLEN, WINDOWS)
    assert ours == pytest.approx(expected, rel=0.005)


def test_eval_refuses_text_shorter_than_a_window(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main(["eval", "--model", "demo", "--text", str(short), "--seqlen", "512"]) == 2
    assert "too short" in capsys.readouterr().err


# -- fast: a tiny factory model, fp and quantized ------------------------------------------------------------------
DEMO = Path(__file__).resolve().parents[1] / "leanfoem" / "demo"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from factory import build_checkpoint
    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "fp", DEMO / "model", hidden=128, intermediate=256,
                            layers=2, tie=False)


def _plain_perplexity(model, tokenizer, text, seqlen, windows):
    ids = torch.tensor(tokenizer(text)["input_ids"])
    with torch.no_grad():
        losses = [model(ids[k * seqlen:(k + 1) * seqlen][None], labels=ids[k * seqlen:(k + 1) * seqlen][None]).loss
                  for k in range(windows)]
    return math.exp(sum(x.item() for x in losses) / windows)


def test_eval_tiny_fp_matches_plain_transformers_and_spills_identically(tiny):
    text = (DEMO / "eval.txt").read_text()
    ours = evaluate_perplexity(str(tiny), text, seqlen=64, windows=4, device="cpu")
    spilled = evaluate_perplexity(str(tiny), text, seqlen=64, windows=4, device="cpu", spill_bytes=0)
    assert spilled["spilled"] and not ours["spilled"]
    assert spilled["perplexity"] == ours["perplexity"]  # the file holds the same bits as host RAM
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    expected = _plain_perplexity(model, AutoTokenizer.from_pretrained(tiny), text, 64, 4)
    assert ours["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert ours["windows"] == 4 and ours["tokens"] == 4 * 63 and not ours["quantized"]


def test_eval_tiny_gptq_matches_dequantized_plain_model(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), "--nsamples", "4", "--seqlen", "64",
                 "--bits", "3", "--group-size", "32", "--checkpoint-format", "gptq_v2", "--quiet"]) == 0
    text_file = DEMO / "eval.txt"
    assert main(["eval", "--model", str(out), "--text", str(text_file), "--seqlen", "64", "--windows", "3",
                 "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["quantized"] and result["windows"] == 3
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dense_state_dict(out), strict=False)
    expected = _plain_perplexity(model.eval(), AutoTokenizer.from_pretrained(out), text_file.read_text(), 64, 3)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_chunked_dequantization_equals_unpack_gptq(bits):
    from leanfoem.packing import pack_gptq, unpack_gptq
    torch.manual_seed(bits)
    n, r, group = 2112, 64, 64  # runs of 1024 columns and a partial last one
    codes = torch.randint(0, 2 ** bits, (n, r), dtype=torch.uint8)
    zeros = torch.randint(1, 2 ** bits, (n // group, r), dtype=torch.int32)
    scales = torch.rand(n // group, r).half()
    g_idx = torch.arange(n, dtype=torch.int32) // group
    parts = pack_gptq(codes, zeros, scales, g_idx, bits, "gptq")
    assert torch.equal(dequantize_chunked(parts, bits, "gptq"), unpack_gptq(parts, bits, "gptq"))


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_expert_group_gets_one_line_and_exit_2(value, capsys):
    """argparse's own error, as for quantize's options: usage plus one line naming the option."""
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "demo", "--expert-group", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("leanfoem eval: error:") and "--expert-group" in last and "Traceback" not in err, err
