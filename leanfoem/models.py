"""Where a `--model` argument points: a local directory, the bundled demo, or a Hugging Face repo id.

What must stay true: a repo id is fetched with huggingface_hub (safetensors, config, tokenizer files
only); offline, the error says so in one line instead of a traceback.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .checkpoint_reader import CheckpointError

DEMO = "demo"
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def demo_model_dir() -> Path:
    return Path(str(files("leanfoem") / "demo" / "model"))


def resolve_model_dir(model: str) -> Path:
    if model == DEMO:
        return demo_model_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"no config.json in model directory {path}")
        return path
    if path.exists():
        raise CheckpointError(f"--model {model} is a file, not a model directory")
    if _looks_like_repo_id(model):
        return _download(model)
    raise CheckpointError(f"model directory not found: {model}")


def _looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"cannot download {repo_id} from the Hugging Face hub (offline, or no such "
                              f"repo?): {type(exc).__name__}: {first_line}") from None
