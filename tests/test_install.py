"""leanfoem installs beside transformers without touching it.

transformers depends on Hugging Face's `kernels` package and imports it. A package of leanfoem's that were
importable as top-level `kernels` would overwrite that package's files on install, or shadow it whenever
Python runs from the repository root. These tests build the real wheel, install it into a fresh virtual
environment next to the newest transformers pip picks, and check that nothing of the dependency changed and
that both transformers and leanfoem still work there. They need the package registry (skipped when it
cannot be reached) and take a few minutes, most of it installing torch.
"""

import json
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU wheel; an open range would pull a multi-GB CUDA build

HASH_FILES = """
import hashlib, importlib.metadata as md, json, sys
out = {}
for dist in md.distributions():
    name = dist.metadata["Name"].lower()
    if name == "leanfoem":
        continue
    for f in dist.files or []:
        path = f.locate()
        if path.is_file() and "__pycache__" not in path.parts:
            out[f"{name}:{f}"] = hashlib.sha256(path.read_bytes()).hexdigest()
print(json.dumps(out))
"""


def _registry_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _run(*args, cwd=None):
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not _registry_reachable():
        pytest.skip("the package registry is unreachable (building the wheel needs setuptools from it)")
    out = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, ROOT)
    (path,) = out.glob("leanfoem-*.whl")
    return path


def test_wheel_has_only_leanfoem_as_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top_level:
            assert zf.read(top_level[0]).decode().split() == ["leanfoem"]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"leanfoem"}
    assert "leanfoem/kernels/block_step.py" in names  # the kernels ship, inside the package


def test_repository_root_does_not_shadow_transformers_kernels():
    """Python run from the repository root puts the root first on sys.path: nothing there may be `kernels`."""
    _run(sys.executable, "-c", "import transformers.integrations.hub_kernels", cwd=ROOT)


@pytest.mark.slow
def test_fresh_install_beside_transformers(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python, pip = venv / "bin" / "python", [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    _run(*pip, TORCH)
    _run(*pip, "transformers")
    before = json.loads(_run(python, "-c", HASH_FILES))
    assert any(key.startswith("kernels:") for key in before), "transformers no longer brings `kernels`"

    _run(*pip, wheel)
    after = json.loads(_run(python, "-c", HASH_FILES))
    changed = sorted(k for k, digest in before.items() if after.get(k) != digest)
    assert not changed, f"installing leanfoem changed other packages' files: {changed[:10]}"

    _run(python, "-c", "from transformers.integrations import hub_kernels", cwd=ROOT)
    _run(python, "-c", "from transformers import AutoModelForCausalLM; from leanfoem.models import demo_model_dir; "
                       "AutoModelForCausalLM.from_pretrained(demo_model_dir())", cwd=tmp_path)
    out = tmp_path / "demo-w4"
    _run(venv / "bin" / "leanfoem", "quantize", "--model", "demo", "--out", out, "--quiet", cwd=tmp_path)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert "quantization_config" in json.loads((out / "config.json").read_text())
