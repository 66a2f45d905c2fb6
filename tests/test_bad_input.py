"""Every bad input: a one-line cause on stderr, a non-zero exit, the input and earlier output untouched."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factory import build_checkpoint
from leanfoem.cli import main
from leanfoem.models import demo_model_dir

TEXT = "The quick brown fox jumps over the lazy dog, and then it naps in the warm afternoon sun. " * 60


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = build_checkpoint(root / "model", demo_model_dir(), layers=2)
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    return model, calib


@pytest.fixture
def model(pristine, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(pristine[0], copy)
    return copy


@pytest.fixture
def calib(pristine):
    return pristine[1]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def fails(capsys, args, cause, code=2):
    assert main(args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert cause in err, err
    return err


def quantize_args(model, out, calib, *extra):
    return ["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "64", "--group-size", "64", "--quiet", *extra]


def test_missing_model_dir(tmp_path, calib, capsys):
    fails(capsys, quantize_args(tmp_path / "nope", tmp_path / "out", calib), "model directory not found")


def test_no_config_json(model, tmp_path, calib, capsys):
    (model / "config.json").unlink()
    before = digest(model)
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "no config.json")
    assert digest(model) == before


def test_unsupported_architecture(model, tmp_path, calib, capsys):
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    before = digest(model)
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "unsupported architecture GPT2LMHeadModel")
    assert digest(model) == before


def first_shard(model):
    return sorted(model.glob("*.safetensors"))[0]


def test_truncated_shard(model, tmp_path, calib, capsys):
    shard = first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-1000])
    before = digest(model)
    fails(capsys, quantize_args(model, tmp_path / "out", calib), f"truncated shard {shard.name}")
    assert digest(model) == before


def test_corrupt_shard_header(model, tmp_path, calib, capsys):
    shard = first_shard(model)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    fails(capsys, quantize_args(model, tmp_path / "out", calib), f"corrupt or truncated shard {shard.name}")


def test_tensor_in_index_missing_from_shard(model, tmp_path, calib, capsys):
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    fails(capsys, quantize_args(model, tmp_path / "out", calib), f"tensor {name} is listed")


def test_nan_in_weights(model, tmp_path, calib, capsys):
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    fails(capsys, quantize_args(model, tmp_path / "out", calib), f"tensor {name} holds NaN or Inf")


@pytest.mark.parametrize("content,cause", [(None, "calibration file not found"), ("", "calibration text too short"),
                                           ("a few words only", "calibration text too short")],
                         ids=["missing", "empty", "too-short"])
def test_bad_calibration(model, tmp_path, capsys, content, cause):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content)
    err = fails(capsys, quantize_args(model, tmp_path / "out", path), cause)
    if content:
        assert "tokens found" in err and "64 needed" in err


@pytest.mark.parametrize("option", [["--bits", "5"], ["--group-size", "0"], ["--damp", "2"], ["--nsamples", "0"],
                                    ["--method", "awq"], ["--beta", "-1"]])
def test_invalid_option_values(model, tmp_path, calib, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(quantize_args(model, tmp_path / "out", calib, *option))
    assert exit_info.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_gptaq_without_alpha(model, tmp_path, calib, capsys):
    fails(capsys, quantize_args(model, tmp_path / "out", calib, "--method", "gptaq"), "alpha > 0")


def test_output_equal_to_input(model, calib, capsys):
    before = digest(model)
    fails(capsys, quantize_args(model, model, calib), "is the input model directory")
    assert digest(model) == before


def test_output_holding_another_finished_job_is_refused(model, tmp_path, calib, capsys):
    out = tmp_path / "out"
    assert main(quantize_args(model, out, calib)) == 0
    before = digest(out)
    fails(capsys, quantize_args(model, out, calib, "--bits", "3"), "finished checkpoint of another job")
    fails(capsys, quantize_args(model, out, calib, "--bits", "3", "--restart"), "finished checkpoint of another job")
    assert digest(out) == before


def test_unrelated_non_empty_output_is_refused(model, tmp_path, calib, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    fails(capsys, quantize_args(model, out, calib), "not empty")
    assert (out / "thesis.tex").read_text() == "precious"


def test_unwritable_output(model, tmp_path, calib, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    fails(capsys, quantize_args(model, blocker / "out", calib), "cannot write to output directory")


def test_full_disk_then_the_same_command_resumes(model, tmp_path, calib, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        out = mount / "out"
        args = quantize_args(model, out, calib)
        fails(capsys, args, "no space left on device", code=1)
        assert not (out / "config.json").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        assert main(args) == 0
        reference = tmp_path / "reference"
        assert main(quantize_args(model, reference, calib)) == 0
        for shard in reference.glob("*.safetensors"):
            a, b = load_file(shard), load_file(out / shard.name)
            assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        subprocess.run(["umount", "-l", str(mount)])  # lazy: a failed run may still map a file there
