"""Builds the bundled demo model: a byte-level BPE tokenizer and a small Llama trained from scratch on the
public-domain corpus (Tiny Shakespeare, War and Peace), so `leanfoem quantize --model demo` runs offline.

    python tools/build_demo_model.py [--corpus ../shared/data/corpus] [--steps 1200] [--seed 0]

Shape: hidden 256, intermediate 768, 4 layers, 4 heads of 64, 2 kv heads, vocab 4096, tied embeddings —
every linear's in_features (256, 768) is a multiple of 128, so GPTQ group 128 divides every layer. Weights
are stored in bf16 in 2 MB shards, so decoder blocks straddle shards and the demo exercises multi-shard
reading.

Data: training text = Tiny Shakespeare + the first ~95% of War and Peace; validation = the rest of War and
Peace (cut at a paragraph boundary). calibration.txt is taken from the training part, eval.txt from the
validation part. The number of optimizer steps is fixed (not a wall-clock budget), so the run is
deterministic for a seed up to the floating-point reduction order of the machine's matmul kernels (which
depends on the thread count).

Hyperparameters were chosen by a sweep at equal token budgets (batch 2-16, lr 3e-4 to 6e-3): at ~1.3M
tokens, batch 4 × 256 with peak lr 1e-3..1.4e-3 gave the lowest validation perplexity; larger batches or
learning rates were clearly worse. Training throughput on a 2-core CPU shared with other jobs is ~1600-2400
tokens/s with one torch thread (two threads fighting other processes ran 4x slower), so 1200 steps
(~1.2M tokens, one epoch) fit the 15-minute budget.

Writes leanfoem/demo/{model/, calibration.txt, eval.txt, build.json}; README.md is written by hand from
the numbers in build.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # deterministic merges, no fork warnings

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "leanfoem" / "demo"
VALID_FRACTION = 0.05
CALIBRATION_CHARS = 300_000
EVAL_CHARS = 100_000


def read_corpus(corpus: Path) -> tuple[str, str]:
    """(training text, validation text): the validation text is the last ~5% of War and Peace."""
    shakespeare = (corpus / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tolstoy = (corpus / "war_and_peace.txt").read_text(encoding="utf-8")
    cut = tolstoy.index("\n\n", int(len(tolstoy) * (1 - VALID_FRACTION))) + 2
    return shakespeare.strip() + "\n\n" + tolstoy[:cut], tolstoy[cut:]


def train_tokenizer(text: str, vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, windows: int | None = None, batch: int = 16) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping windows, each scored on its own."""
    was_training = model.training
    model.eval()
    n = ids.numel() // seqlen if windows is None else min(windows, ids.numel() // seqlen)
    x = ids[:n * seqlen].view(n, seqlen)
    nll = 0.0
    for i in range(0, n, batch):
        chunk = x[i:i + batch].to(next(model.parameters()).device)
        nll += model(chunk, labels=chunk).loss.item() * chunk.shape[0]
    model.train(was_training)
    return math.exp(nll / n)


def unigram_perplexity(train_ids: torch.Tensor, valid_ids: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[valid_ids].mean().item())


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(ids: torch.Tensor, seqlen: int, batch: int, generator: torch.Generator):
    """Endless epochs of shuffled non-overlapping windows (a fresh random offset each epoch)."""
    while True:
        offset = int(torch.randint(0, seqlen, (1,), generator=generator))
        n = (ids.numel() - offset) // seqlen
        windows = ids[offset:offset + n * seqlen].view(n, seqlen)
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield windows[order[i:i + batch]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "data" / "corpus")
    parser.add_argument("--out", type=Path, default=DEMO, help="demo directory to (re)write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768, help="a multiple of 128")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1.2e-3)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: all cores on an idle machine, 1 when others use the CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    # On a shared 2-core CPU two torch threads fighting other processes ran 4x slower than one thread.
    torch.set_num_threads(args.threads or (1 if os.getloadavg()[0] >= 1.0 else os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    t0 = time.time()

    train_text, valid_text = read_corpus(args.corpus)
    tokenizer = train_tokenizer(train_text, args.vocab)
    train_ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"])
    valid_ids = torch.tensor(tokenizer(valid_text, add_special_tokens=False)["input_ids"])
    unigram = unigram_perplexity(train_ids, valid_ids, len(tokenizer))
    print(f"tokenizer: vocab {len(tokenizer)}, train {train_ids.numel()} tokens "
          f"({len(train_text) / train_ids.numel():.2f} chars/token), validation {valid_ids.numel()} tokens, "
          f"unigram validation perplexity {unigram:.1f} ({time.time() - t0:.0f} s)", flush=True)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).to(args.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    stream = batches(train_ids, args.seqlen, args.batch, generator)
    warmup = max(1, args.steps // 20)
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        x = next(stream).to(args.device)
        loss = model(x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0 or step == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.time() - t_train:.0f} s)", flush=True)
    train_seconds = time.time() - t_train
    tokens_seen = args.steps * args.batch * args.seqlen

    # Score what ships: weights rounded to bf16, evaluated in fp32.
    model = model.to("cpu", torch.bfloat16).to(torch.float32)
    valid_ppl = perplexity(model, valid_ids, 256)
    eval_text = valid_text[:EVAL_CHARS]
    eval_ids = torch.tensor(tokenizer(eval_text)["input_ids"])
    eval4_ppl = perplexity(model, eval_ids, 256, windows=4)
    print(f"{args.steps} steps ({tokens_seen} tokens, {tokens_seen / train_ids.numel():.2f} epochs) in "
          f"{train_seconds:.0f} s; validation perplexity {valid_ppl:.2f} "
          f"({valid_ids.numel() // 256} windows of 256, bf16 weights); eval.txt first 4 windows {eval4_ppl:.2f}; "
          f"unigram {unigram:.1f}", flush=True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(out / "model", max_shard_size="2MB", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    (out / "model" / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "calibration.txt").write_text(train_text[-CALIBRATION_CHARS:], encoding="utf-8")
    (out / "eval.txt").write_text(eval_text, encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "build.json")
    build = {"command": f"python tools/build_demo_model.py --seed {args.seed} --steps {args.steps}",
             "seed": args.seed, "vocab": len(tokenizer), "steps": args.steps, "batch": args.batch,
             "seqlen": args.seqlen, "peak_lr": args.lr, "tokens_seen": tokens_seen,
             "train_tokens": train_ids.numel(), "validation_tokens": valid_ids.numel(),
             "train_seconds": round(train_seconds), "total_seconds": round(time.time() - t0),
             "device": args.device, "torch_threads": torch.get_num_threads(),
             "validation_perplexity": round(valid_ppl, 3), "eval_first4x256_perplexity": round(eval4_ppl, 3),
             "unigram_validation_perplexity": round(unigram, 1), "bytes": size,
             "parameters": sum(p.numel() for p in model.parameters())}
    (out / "build.json").write_text(json.dumps(build, indent=1) + "\n")
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
