"""GPU check of the whole pipeline: a 4-layer hidden-2048 model and a Llama-3-70B-shaped block, quantized on CUDA.

Run on a GPU machine from the repository root with a tokenizer directory and a calibration text in .devcarry/:
    PYTHONPATH=. OUT=/tmp/out python tools/bench_gpu_block.py
Writes $OUT/gpu_check.json (the numbers in docs/BENCHMARKS.md, "Pipeline on a GPU").
"""
import glob, json, os, subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "tests"); sys.path.insert(0, ".")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
OUT = Path(os.environ.get("OUT", "/tmp/out"))
results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}

def save():
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=1))

def build(path, layers, hidden, inter, heads, kv):
    tok = AutoTokenizer.from_pretrained(".devcarry/tok")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    m.save_pretrained(path, max_shard_size="2GB"); tok.save_pretrained(path)
    del m; torch.cuda.empty_cache()

def run(args):
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "leanfoem", "quantize", *args], capture_output=True, text=True)
    return r.returncode, time.time() - t, r.stderr[-2500:]

build("/tmp/small", 4, 2048, 5632, 16, 4)
rc, sec, err = run(["--model", "/tmp/small", "--out", "/tmp/small-q", "--calib", ".devcarry/calib.txt", "--nsamples", "32",
                    "--seqlen", "512", "--quiet"])
results["small_4L_h2048"] = {"rc": rc, "seconds": sec, "stderr": err if rc else ""}
if rc == 0:
    from gptq_decode import dense_state_dict
    from safetensors.torch import load_file
    d = dense_state_dict("/tmp/small-q")
    src = {}
    for f in glob.glob("/tmp/small/*.safetensors"): src.update(load_file(f))
    for name in ["model.layers.3.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"]:
        w = src[name].float(); q = d[name]
        results["small_rel_err_" + name] = ((w - q).norm() / w.norm()).item()
    log = [json.loads(l) for l in open("/tmp/small-q/quantize_log.jsonl")]
    results["small_device_peak_gib"] = max((r.get("device_peak_gib") or 0) for r in log if r["event"] == "module")
    results["small_block_seconds"] = [r["seconds"] for r in log if r["event"] == "block"]
save()
build("/tmp/big", 1, 8192, 28672, 64, 8)
rc, sec, err = run(["--model", "/tmp/big", "--out", "/tmp/big-q", "--calib", ".devcarry/calib.txt", "--nsamples", "128",
                    "--seqlen", "2048", "--quiet", "--batch-tokens", "8192", "--keep-work"])
results["llama70b_block"] = {"rc": rc, "seconds_total": sec, "stderr": err if rc else ""}
if rc == 0:
    log = [json.loads(l) for l in open("/tmp/big-q/quantize_log.jsonl")]
    results["llama70b_block"]["modules"] = [{k: r.get(k) for k in ("module", "seconds", "damp", "device_peak_gib", "rss_gib")} for r in log if r["event"] == "module"]
    results["llama70b_block"]["block_seconds"] = [r["seconds"] for r in log if r["event"] == "block"]
save()
print(json.dumps(results, indent=1))
