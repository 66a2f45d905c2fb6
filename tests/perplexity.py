"""Perplexity the plain transformers way, and `leanfoem eval`'s, on the same consecutive windows: the two sides
of every test that holds the streamed evaluation against transformers."""

import json
import math

import torch

from leanfoem.cli import main


def reference_perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """Whole model in memory, one forward per window of `ids`; the loss the transformers way."""
    nll = 0.0
    with torch.no_grad():
        for k in range(windows):
            window = ids[k * seqlen:(k + 1) * seqlen][None]
            nll += model(window, labels=window).loss.item() * (seqlen - 1)
    return math.exp(nll / (windows * (seqlen - 1)))


def eval_cli(model_dir, text_file, capsys, seqlen: int, windows: int) -> float:
    """`leanfoem eval --json` on the first `windows` windows; checks the counts it reports."""
    assert main(["eval", "--model", str(model_dir), "--text", str(text_file), "--seqlen", str(seqlen),
                 "--windows", str(windows), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == windows and result["tokens"] == windows * (seqlen - 1) and result["seconds"] > 0
    return result["perplexity"]
