"""The peer quantizers of tools/bench_compare.py, one per process, run with the reference python (GPTQModel,
bitsandbytes): nothing here imports leanfoem, so a peer's wall time and peak RSS are its own.

    REF/bin/python tools/peers.py gptqmodel --model DIR --rows rows.jsonl --out DIR --bits 4 --group-size 64 \\
        --method foem --alpha 0 --beta 0.2 --damp 0.05 [--gar]
    REF/bin/python tools/peers.py bnb-nf4 --model DIR --out DIR
    REF/bin/python tools/peers.py ppl --model DIR --text wiki.test.raw --seqlen 2048 [--windows N] [--nf4] \
        [--reference FP_DIR]

`gptqmodel`: the rows are token ids (one JSON object with "input_ids" a line), the very rows leanfoem gets.
`--dtype float32` runs the layers in fp32 as leanfoem does on the CPU; GPTQModel's own choice there is bf16,
which a CPU without native bf16 (no AVX512-BF16) runs several times slower.
GPTQModel's own default for GPTQ is act_group_aware=True (GAR: columns reordered inside groups and groups
reordered by diag(H)); its FOEM path ignores that flag. Plain column order is used unless --gar, so both tools
run the same algorithm.

`bnb-nf4`: bitsandbytes NF4 needs no calibration; "quantizing" is loading with BitsAndBytesConfig on the CPU
(fp32 compute, non-linear weights and the tied head in fp32) and saving the result.

`ppl`: perplexity in-process with transformers, by `leanfoem eval`'s protocol (leanfoem/evaluation.py): the
whole text tokenized once with the model's tokenizer and its default special tokens, consecutive
non-overlapping windows of seqlen tokens (capped at max_position_embeddings, the tail dropped), each window
scored on its own, perplexity = exp(mean next-token NLL), fp32 logits. The last line of stdout is JSON.
With `--reference`, the figures of `leanfoem eval --reference` (leanfoem/divergence.py) from the full-vocabulary
logits of both models held whole (fine for the small models benchmarked here): per-token KL(P_ref ‖ P_model)
in fp64, its mean and quantiles (numpy's linear interpolation), top-1 agreement, the correct token's |Δp|.
"""

from __future__ import annotations

import argparse
import json
import math
import time


def gptqmodel_quantize(args) -> dict:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import FOEMConfig
    rows = [json.loads(line)["input_ids"] for line in open(args.rows) if line.strip()]
    calib = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows]
    kwargs = dict(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False, damp_percent=args.damp,
                  act_group_aware=args.gar)
    if args.offload_dir:
        kwargs["offload_to_disk_path"] = args.offload_dir
    if args.method == "foem":
        kwargs["foem"] = FOEMConfig(alpha=args.alpha, beta=args.beta, device="cpu")
    load = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    model = GPTQModel.load(args.model, QuantizeConfig(**kwargs), device="cpu", **load)
    model.quantize(calib, batch_size=1)
    model.save(args.out)
    return {"rows": len(rows)}


def nf4_config():
    import torch
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_nf4(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(), device_map="cpu",
                                                dtype=torch.float32)


def bnb_quantize(args) -> dict:
    import bitsandbytes
    from transformers import AutoTokenizer
    model = load_nf4(args.model)
    quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    return {"linear4bit_modules": quantized, "bitsandbytes": bitsandbytes.__version__}


def perplexity(args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer
    started = time.time()
    if args.nf4:
        model = load_nf4(args.model)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map="cpu")
    model.eval()
    text = open(args.text, encoding="utf-8").read()
    ids = torch.tensor(AutoTokenizer.from_pretrained(args.model)(text)["input_ids"], dtype=torch.long)
    seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", None) or args.seqlen)
    count = ids.numel() // seqlen
    if args.windows is not None:
        count = min(count, args.windows)
    if count < 1:
        raise SystemExit(f"evaluation text too short: {ids.numel()} tokens, one window needs {seqlen}")
    reference = None
    if args.reference:
        reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32, device_map="cpu").eval()
        if reference.config.vocab_size != model.config.vocab_size:
            raise SystemExit("the reference has another vocabulary size")
    total, figures = 0.0, []
    with torch.no_grad():
        for k in range(count):
            window = ids[k * seqlen:(k + 1) * seqlen]
            logits = model(input_ids=window[None], use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, window[1:], reduction="sum").double().item()
            if reference is not None:
                ref_logits = reference(input_ids=window[None], use_cache=False).logits[0, :-1].float()
                figures.append(token_figures(ref_logits, logits, window[1:]))
    tokens = count * (seqlen - 1)
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    extra = divergence_summary(figures) if figures else {}
    return {**extra, "perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens, "windows": count,
            "seqlen": seqlen, "seconds": round(time.time() - started, 3), "model": args.model,
            "nf4": args.nf4, "linear4bit_modules": linear4bit}


def token_figures(ref_logits, logits, targets) -> dict:
    import torch.nn.functional as F
    logp, logq = F.log_softmax(ref_logits.double(), dim=-1), F.log_softmax(logits.double(), dim=-1)
    t = targets[:, None]
    return {"kl": (logp.exp() * (logp - logq)).sum(-1), "same": logp.argmax(-1) == logq.argmax(-1),
            "dp": logq.gather(1, t).exp()[:, 0] - logp.gather(1, t).exp()[:, 0], "nll_ref": -logp.gather(1, t)[:, 0]}


def divergence_summary(figures: list[dict]) -> dict:
    import numpy as np
    import torch
    cat = {k: torch.cat([f[k] for f in figures]) for k in figures[0]}
    kl = cat["kl"].numpy()
    return {"reference_perplexity": math.exp(cat["nll_ref"].mean().item()), "kld_mean": float(kl.mean()),
            **{f"kld_{n}": float(np.quantile(kl, q)) for n, q in
               (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))},
            "kld_max": float(kl.max()), "top1_agreement": cat["same"].double().mean().item(),
            "delta_p_abs_mean": cat["dp"].abs().mean().item(), "delta_p_mean": cat["dp"].mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gptqmodel")
    g.add_argument("--model", required=True)
    g.add_argument("--rows", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--bits", type=int, required=True)
    g.add_argument("--group-size", type=int, required=True)
    g.add_argument("--method", choices=["gptq", "foem"], required=True)
    g.add_argument("--alpha", type=float, default=0.0)
    g.add_argument("--beta", type=float, default=0.2)
    g.add_argument("--damp", type=float, default=0.05)
    g.add_argument("--gar", action="store_true", help="act_group_aware (GPTQModel's GPTQ default)")
    g.add_argument("--dtype", choices=["auto", "float32"], default="auto",
                   help="compute dtype of the layers (auto: GPTQModel's choice, bf16 on the CPU)")
    g.add_argument("--offload-dir", default=None, help="GPTQModel's offload_to_disk_path (default: a temp dir)")
    g.set_defaults(handler=gptqmodel_quantize)
    b = sub.add_parser("bnb-nf4")
    b.add_argument("--model", required=True)
    b.add_argument("--out", required=True)
    b.set_defaults(handler=bnb_quantize)
    p = sub.add_parser("ppl")
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--nf4", action="store_true", help="load with bitsandbytes NF4 (BitsAndBytesConfig) first")
    p.add_argument("--reference", default=None, help="fp model: also KL divergence and top-1 agreement against it")
    p.set_defaults(handler=perplexity)
    args = parser.parse_args()
    print(json.dumps(args.handler(args)))


if __name__ == "__main__":
    main()
