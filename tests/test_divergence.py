"""`leanfoem eval --reference` against a plain transformers computation of the same figures, and its refusals."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gptq_decode import dense_state_dict
from leanfoem.cli import main
from test_evaluation import DEMO, tiny  # noqa: F401  (the tiny fp checkpoint fixture)

SEQLEN, WINDOWS = 64, 4
TEXT = DEMO / "eval.txt"


def eval_reference(model, reference, capsys, text=TEXT, seqlen=SEQLEN, windows=WINDOWS):
    capsys.readouterr()  # what the test itself printed (transformers' loading bars) is not the command's
    code = main(["eval", "--model", str(model), "--reference", str(reference), "--text", str(text), "--seqlen",
                 str(seqlen), "--windows", str(windows), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err)


def plain_figures(model, reference, tokenizer, text=TEXT, seqlen=SEQLEN, windows=WINDOWS):
    """Whole models in memory, fp32, full-vocabulary logits per window; the figures by their definitions."""
    ids = torch.tensor(tokenizer(text.read_text())["input_ids"])
    kl, same, p, p_ref, nll, nll_ref = [], [], [], [], [], []
    with torch.no_grad():
        for k in range(windows):
            window = ids[k * seqlen:(k + 1) * seqlen]
            logq = F.log_softmax(model(window[None]).logits[0, :-1].double(), dim=-1)
            logp = F.log_softmax(reference(window[None]).logits[0, :-1].double(), dim=-1)
            target = window[1:, None]
            kl.append((logp.exp() * (logp - logq)).sum(-1))
            same.append(logp.argmax(-1) == logq.argmax(-1))
            p.append(logq.gather(1, target).exp()[:, 0])
            p_ref.append(logp.gather(1, target).exp()[:, 0])
            nll.append(-logq.gather(1, target)[:, 0])
            nll_ref.append(-logp.gather(1, target)[:, 0])
    kl, p, p_ref = torch.cat(kl).numpy(), torch.cat(p), torch.cat(p_ref)
    return {"kld_mean": kl.mean(), "kld_median": np.quantile(kl, 0.5), "kld_p90": np.quantile(kl, 0.9),
            "kld_p99": np.quantile(kl, 0.99), "kld_p999": np.quantile(kl, 0.999), "kld_max": kl.max(),
            "top1_agreement": torch.cat(same).double().mean().item(),
            "delta_p_abs_mean": (p - p_ref).abs().mean().item(), "delta_p_mean": (p - p_ref).mean().item(),
            "perplexity": torch.cat(nll).mean().exp().item(), "reference_perplexity": torch.cat(nll_ref).mean().exp().item()}


def test_model_against_itself_gives_zero_kld_and_full_agreement(tiny, capsys):  # noqa: F811
    code, result = eval_reference(tiny, tiny, capsys)
    assert code == 0
    assert result["kld_mean"] == 0.0 and result["kld_max"] == 0.0 and result["top1_agreement"] == 1.0
    assert result["delta_p_abs_mean"] == 0.0 and result["perplexity"] == result["reference_perplexity"]
    assert result["tokens"] == WINDOWS * (SEQLEN - 1)


def test_quantized_tiny_matches_plain_transformers(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), "--nsamples", "4", "--seqlen", "64",
                 "--bits", "3", "--group-size", "32", "--quiet"]) == 0
    code, ours = eval_reference(out, tiny, capsys)
    assert code == 0 and ours["quantized"] and not ours["reference_quantized"]
    spilled = evaluate_spilled(out, tiny)
    assert spilled["spilled"] and spilled["kld_mean"] == ours["kld_mean"]  # the files hold the same bits as RAM
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dense_state_dict(out), strict=False)
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    expected = plain_figures(model.eval(), reference.eval(), AutoTokenizer.from_pretrained(tiny))
    assert 0.001 < ours["kld_mean"] and ours["top1_agreement"] < 1  # 3 bit: the figures are not trivially 0 / 1
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-4), name


def evaluate_spilled(model, reference):
    from leanfoem.divergence import evaluate_divergence
    return evaluate_divergence(str(model), str(reference), TEXT.read_text(), seqlen=SEQLEN, windows=WINDOWS,
                               device="cpu", spill_bytes=0)


def test_reference_with_another_vocabulary_is_refused(tiny, tmp_path, capsys):  # noqa: F811
    bigger = tmp_path / "bigger"
    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(bigger)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(bigger)
    code, err = eval_reference(tiny, bigger, capsys)
    assert code == 2 and "vocab size" in err and len(err.strip().splitlines()) == 1


def test_reference_with_another_tokenizer_is_refused(tiny, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]  # same size, different ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    code, err = eval_reference(tiny, other, capsys)
    assert code == 2 and "tokenizes the text differently" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_quantized_smollm2_matches_plain_transformers(smollm2_dir, smollm2_w4g64, shared_data, capsys):
    """The real SmolLM2-135M (4 bit, group 64) against its fp model on wikitext-2, 2 windows of 512 tokens."""
    window = {"text": shared_data / "wikitext2" / "wiki.test.raw", "seqlen": 512, "windows": 2}
    code, ours = eval_reference(smollm2_w4g64, smollm2_dir, capsys, **window)
    assert code == 0
    config = AutoConfig.from_pretrained(smollm2_w4g64)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dense_state_dict(smollm2_w4g64), strict=False)
    model.tie_weights()
    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected = plain_figures(model.eval(), reference.eval(), AutoTokenizer.from_pretrained(smollm2_dir), **window)
    assert 0.01 < ours["kld_mean"] < 1 and 0.5 < ours["top1_agreement"] < 1
    for name in ("kld_mean", "kld_median", "kld_p90", "kld_p99", "delta_p_abs_mean", "perplexity",
                 "reference_perplexity"):
        assert ours[name] == pytest.approx(expected[name], rel=5e-3), name  # the perplexity test's tolerance
    assert ours["top1_agreement"] == pytest.approx(expected["top1_agreement"], abs=2 / ours["tokens"])
