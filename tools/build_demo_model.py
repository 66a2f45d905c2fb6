"""Builds the bundled demo model: a byte-level BPE tokenizer and a small Llama trained from scratch on the
public-domain corpus (Tiny Shakespeare, War and Peace), so `leanfoem quantize --model demo` runs offline.

    python tools/build_demo_model.py [--corpus ../shared/data/corpus] [--minutes 4]

Shape: hidden 256, intermediate 768, 4 layers, 4 heads of 64, 2 kv heads, vocab 2048, tied embeddings —
every linear's in_features is a multiple of 128 (so group 128 divides every layer); bf16, 2 MB shards
(blocks straddle shards). Writes leanfoem/demo/{model/, calibration.txt, eval.txt, README.md}.
Deterministic for a seed up to the thread scheduling of the training matmuls.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "leanfoem" / "demo"


def read_corpus(corpus: Path) -> tuple[str, str]:
    shakespeare = (corpus / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tolstoy = (corpus / "war_and_peace.txt").read_text(encoding="utf-8")
    cut = int(len(tolstoy) * 0.95)
    return shakespeare + "\n\n" + tolstoy[:cut], tolstoy[cut:]


def train_tokenizer(text: str, vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    model.eval()
    nll, count = 0.0, 0
    for k in range(min(windows, ids.numel() // seqlen)):
        window = ids[k * seqlen:(k + 1) * seqlen][None]
        nll += model(window, labels=window).loss.item() * (seqlen - 1)
        count += seqlen - 1
    model.train()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "corpus")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train_text, valid_text = read_corpus(args.corpus)
    tokenizer = train_tokenizer(train_text, 2048)
    train_ids = torch.tensor(tokenizer(train_text)["input_ids"])
    valid_ids = torch.tensor(tokenizer(valid_text)["input_ids"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    seqlen, batch = 256, 16
    generator = torch.Generator().manual_seed(args.seed)
    started, step = time.time(), 0
    while time.time() - started < args.minutes * 60:
        starts = torch.randint(0, train_ids.numel() - seqlen, (batch,), generator=generator)
        x = torch.stack([train_ids[s:s + seqlen] for s in starts])
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    model = model.to(torch.bfloat16)
    valid_ppl = perplexity(model.float(), valid_ids, 256, 16)
    print(f"{step} steps in {time.time() - started:.0f} s; validation perplexity (16 × 256 tokens, fp32) {valid_ppl:.2f}")
    shutil.rmtree(DEMO / "model", ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(DEMO / "model", max_shard_size="2MB")
    tokenizer.save_pretrained(DEMO / "model")
    (DEMO / "calibration.txt").write_text(train_text[-300_000:], encoding="utf-8")
    (DEMO / "eval.txt").write_text(valid_text[:100_000], encoding="utf-8")
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    (DEMO / "build.json").write_text(json.dumps({"steps": step, "seconds": round(time.time() - started),
                                                 "validation_perplexity": round(valid_ppl, 3), "bytes": size}, indent=1))
    print(f"wrote {DEMO} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
