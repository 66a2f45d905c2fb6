"""Every bad input: a one-line cause on stderr, a non-zero exit, the input and earlier output untouched (DESIGN §6).

Most cases call `leanfoem.cli.main` in this process (fast); `test_real_stderr_is_one_line` runs the real
command for a few of them, to see the whole stderr a user sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from factory import build_checkpoint
from leanfoem.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog, and then it naps in the warm afternoon sun. It was the best "
        "of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. ") * 30


# -- fixtures -----------------------------------------------------------------------------------------
def make_tokenizer_dir(workdir: Path) -> Path:
    """The bundled demo model's tokenizer when it ships one; otherwise a small byte-level BPE trained here on
    text this function writes itself (no network, no ../shared)."""
    demo = ROOT / "leanfoem" / "demo" / "model"
    if (demo / "tokenizer.json").is_file():
        return demo
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    text = workdir / "tokenizer-text.txt"
    text.write_text(TEXT + "0123456789 ,.;:!?'\"()[]\n" * 20)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(text)], trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = workdir / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = build_checkpoint(root / "model", make_tokenizer_dir(root), layers=2)
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    return model, calib


@pytest.fixture
def model(pristine, tmp_path):
    """A private copy of the pristine model (mtimes kept, so runs made from either fingerprint alike)."""
    return Path(shutil.copytree(pristine[0], tmp_path / "model"))


@pytest.fixture
def calib(pristine):
    return pristine[1]


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """main() installs SIGINT/SIGTERM handlers; give pytest its own back and clear a pending stop."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    from leanfoem.pipeline import StopSignal
    StopSignal.requested = False


@pytest.fixture(scope="module")
def reference(pristine, tmp_path_factory):
    """A finished run of the pristine model with the default test settings."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(quantize_args(pristine[0], out, pristine[1])) == 0
    return out


# -- helpers ------------------------------------------------------------------------------------------
def digest(path: Path) -> str:
    """Names, bytes and mtimes of every file under `path` (a file rewritten with the same bytes counts)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes() + str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def quantize_args(model, out, calib, *extra) -> list[str]:
    return ["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
            "--seqlen", "64", "--group-size", "64", "--quiet", *extra]


def fails(capsys, args, cause, code=2, untouched=()) -> str:
    """Runs the CLI, expects exit `code` and exactly one stderr line naming `cause`; the paths in `untouched`
    must be unchanged, and no output may look finished."""
    before = {p: digest(p) for p in untouched}
    assert main(args) == code
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("leanfoem: "), f"not one line: {err!r}"
    assert "Traceback" not in err + captured.out
    assert cause in err, err
    for p, d in before.items():
        assert digest(p) == d, f"{p} was changed by a failed run"
    return err


def out_of(args) -> Path:
    return Path(args[args.index("--out") + 1])


def assert_not_finished(out: Path) -> None:
    assert not (out / "config.json").exists(), "a failed run left an output that looks finished"


def rewrite_tensor(model: Path, name: str, change) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def interrupt_after_first_block(args) -> None:
    """Runs the CLI in this process and stops it (like SIGINT) once block 0 is in the journal."""
    from leanfoem.pipeline import StopSignal
    journal = out_of(args) / ".leanfoem" / "journal.json"

    def stop_when_a_block_is_done():
        while not StopSignal.requested:
            try:
                if json.loads(journal.read_text())["blocks"]:
                    StopSignal.requested = True
            except (OSError, ValueError):
                pass
            time.sleep(0.005)

    watcher = threading.Thread(target=stop_when_a_block_is_done, daemon=True)
    watcher.start()
    try:
        assert main(args) == 130
    finally:
        StopSignal.requested = True
        watcher.join()
        StopSignal.requested = False


def assert_same_tensors(a: Path, b: Path) -> None:
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards == sorted(p.name for p in b.glob("*.safetensors"))
    for shard in shards:
        assert (a / shard).read_bytes() == (b / shard).read_bytes(), shard


# -- the model ----------------------------------------------------------------------------------------
def test_missing_model_dir(tmp_path, calib, capsys):
    args = quantize_args(tmp_path / "nope", tmp_path / "out", calib)
    fails(capsys, args, "model directory not found")
    assert not (tmp_path / "out").exists()


def test_model_path_is_a_file(tmp_path, calib, capsys):
    (tmp_path / "weights.bin").write_bytes(b"x")
    fails(capsys, quantize_args(tmp_path / "weights.bin", tmp_path / "out", calib), "is a file, not a model directory")


def test_no_config_json(model, tmp_path, calib, capsys):
    (model / "config.json").unlink()
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "no config.json", untouched=[model])
    assert not (tmp_path / "out").exists()


def test_corrupt_config_json(model, tmp_path, calib, capsys):
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": ')
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "cannot read the config.json", untouched=[model])


def test_unsupported_architecture(model, tmp_path, calib, capsys):
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "unsupported architecture GPT2LMHeadModel",
          untouched=[model])
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(model, tmp_path, calib, capsys):
    for p in model.glob("tokenizer*"):
        p.unlink()
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "cannot read the tokenizer", untouched=[model])


def test_no_weights(model, tmp_path, calib, capsys):
    for p in model.glob("model*"):
        p.unlink()
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "no safetensors weights", untouched=[model])


def first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


@pytest.mark.parametrize("keep", [-1000, 0, 5], ids=["last-1000-bytes-cut", "empty", "5-bytes"])
def test_truncated_shard(model, tmp_path, calib, capsys, keep):
    shard = first_shard(model)
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    cause = f"truncated shard {shard.name}" if keep < 0 else f"corrupt or truncated shard {shard.name}"
    fails(capsys, quantize_args(model, tmp_path / "out", calib), cause, untouched=[model])
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_header(model, tmp_path, calib, capsys):
    shard = first_shard(model)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    fails(capsys, quantize_args(model, tmp_path / "out", calib), f"corrupt or truncated shard {shard.name}",
          untouched=[model])


def test_corrupt_shard_index(model, tmp_path, calib, capsys):
    (model / "model.safetensors.index.json").write_text('{"weight_map": ')
    fails(capsys, quantize_args(model, tmp_path / "out", calib), "unreadable shard index", untouched=[model])


def test_shard_named_in_the_index_is_missing(model, tmp_path, calib, capsys):
    shard = first_shard(model)
    shard.unlink()
    fails(capsys, quantize_args(model, tmp_path / "out", calib), f"shard {shard.name} named in", untouched=[model])


def test_tensor_in_index_missing_from_shard(model, tmp_path, calib, capsys):
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_tensor(model, name, lambda t: t.pop(name))
    fails(capsys, quantize_args(model, tmp_path / "out", calib), f"tensor {name} is listed", untouched=[model])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,value", [("model.layers.1.self_attn.o_proj.weight", float("nan")),
                                        ("model.embed_tokens.weight", float("inf")),
                                        ("model.norm.weight", float("-inf"))],
                         ids=["nan-in-block-1", "inf-in-embedding", "inf-in-final-norm"])
def test_nan_or_inf_in_weights(model, tmp_path, calib, capsys, name, value):
    def poison(tensors):
        tensors[name].view(-1)[7] = value
    rewrite_tensor(model, name, poison)
    args = quantize_args(model, tmp_path / "out", calib)
    fails(capsys, args, f"tensor {name} holds NaN or Inf", untouched=[model])
    assert_not_finished(out_of(args))


# -- calibration --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,cause", [
    (None, "calibration file not found"),
    ("", "calibration text too short"),
    ("a few words only", "calibration text too short"),
    (b"\xff\xfe\x00 binary", "is not UTF-8 text"),
], ids=["missing", "empty", "too-short", "not-utf8"])
def test_bad_calibration_text(model, tmp_path, capsys, content, cause):
    path = tmp_path / "calib.txt"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    err = fails(capsys, quantize_args(model, tmp_path / "out", path), cause, untouched=[model])
    if cause == "calibration text too short":
        assert "tokens found" in err and "64 needed" in err
    assert not (tmp_path / "out").exists()


def test_bad_calibration_jsonl(model, tmp_path, capsys):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    fails(capsys, quantize_args(model, tmp_path / "out", path), "line 2: expected a JSON object", untouched=[model])


def test_calibration_token_ids_outside_the_vocabulary(model, tmp_path, capsys):
    path = tmp_path / "ids.jsonl"
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    path.write_text(json.dumps({"input_ids": [1, 2, 3] * 20}) + "\n" + json.dumps({"input_ids": [5, vocab, 7] * 20}))
    fails(capsys, quantize_args(model, tmp_path / "out", path),
          f"calibration row 2 holds token id {vocab}, outside the model's vocabulary of {vocab}", untouched=[model])


# -- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", [["--bits", "5"], ["--group-size", "0"], ["--damp", "2"], ["--nsamples", "0"],
                                    ["--seqlen", "0"], ["--method", "awq"], ["--beta", "-1"], ["--bits", "four"]],
                         ids=lambda o: " ".join(o))
def test_invalid_option_values(model, tmp_path, calib, capsys, option):
    """argparse's own error: usage plus one line naming the option, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(quantize_args(model, tmp_path / "out", calib, *option))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("leanfoem quantize: error:") and option[0] in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,cause", [(["--method", "gptaq"], "alpha > 0"), (["--seqlen", "1"], "seqlen >= 2"),
                                          (["--device", "cuda:7"], "--device cuda:7")],
                         ids=["gptaq-without-alpha", "seqlen-1", "no-such-device"])
def test_inconsistent_options(model, tmp_path, calib, capsys, option, cause):
    if option[0] == "--device" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: the no-device error is for machines without one")
    fails(capsys, quantize_args(model, tmp_path / "out", calib, *option), cause, untouched=[model])
    assert not (tmp_path / "out").exists()


# -- the output ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_equal_to_or_inside_the_input(model, calib, capsys, where):
    out = model if where == "same" else model / "quantized"
    fails(capsys, quantize_args(model, out, calib), "is the input model directory", untouched=[model])
    assert not (model / "quantized").exists()


def test_output_holding_another_finished_job_is_refused(model, tmp_path, calib, reference, capsys):
    out = Path(shutil.copytree(reference, tmp_path / "out"))
    for extra in (["--bits", "3"], ["--bits", "3", "--restart"]):
        fails(capsys, quantize_args(model, out, calib, *extra), "finished checkpoint of another job",
              untouched=[out, model])


def test_unrelated_non_empty_output_is_refused(model, tmp_path, calib, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for extra in ([], ["--restart"]):
        fails(capsys, quantize_args(model, out, calib, *extra), "not empty", untouched=[out, model])
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_output_is_a_file(model, tmp_path, calib, capsys):
    out = tmp_path / "out"
    out.write_text("precious")
    fails(capsys, quantize_args(model, out, calib), "is not a directory", untouched=[model])
    assert out.read_text() == "precious"


def _chmod_protects(directory: Path) -> bool:
    directory.chmod(0o555)
    try:
        (directory / "probe").mkdir()
    except OSError:
        return True
    (directory / "probe").rmdir()
    return False  # root ignores the mode bits


def _mount(*args) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["read-only-parent", "file-as-parent", "under-proc"])
def test_unwritable_output(model, tmp_path, calib, capsys, how):
    parent = tmp_path / "parent"
    parent.mkdir()
    mounted = False
    if how == "read-only-parent" and not _chmod_protects(parent):
        parent.chmod(0o755)  # running as root: a read-only mount is what stops root
        mounted = _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(parent))
        if not mounted:
            pytest.skip("root ignores chmod 555 here and a read-only tmpfs cannot be mounted")
    elif how == "file-as-parent":
        parent.rmdir()
        parent.write_text("x")
    elif how == "under-proc":
        parent = Path("/proc/self")
    try:
        fails(capsys, quantize_args(model, parent / "out", calib), "cannot write to output directory",
              untouched=[model])
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(parent)])
        if parent.is_dir() and parent != Path("/proc/self"):
            parent.chmod(0o755)


def test_input_damaged_between_runs_leaves_the_unfinished_run_untouched(model, tmp_path, calib, reference, capsys):
    args = quantize_args(model, tmp_path / "out", calib)
    interrupt_after_first_block(args)
    capsys.readouterr()
    out = out_of(args)
    shard = first_shard(model)
    saved = tmp_path / "saved.safetensors"
    shutil.copy2(shard, saved)
    shard.write_bytes(shard.read_bytes()[:-1000])
    fails(capsys, args, f"truncated shard {shard.name}", untouched=[out, model])
    shutil.copy2(saved, shard)  # the shard restored as it was (bytes and mtime): the same command resumes
    assert main(args) == 0
    assert_same_tensors(reference, out)


def test_unreadable_journal_is_named_and_restart_recovers(model, tmp_path, calib, reference, capsys):
    args = quantize_args(model, tmp_path / "out", calib)
    interrupt_after_first_block(args)
    capsys.readouterr()
    out = out_of(args)
    (out / ".leanfoem" / "journal.json").write_text('{"version": 1, "fingerp')
    fails(capsys, args, "journal", untouched=[out, model])
    assert main(args + ["--restart"]) == 0
    assert_same_tensors(reference, out)


def test_a_changed_damping_is_refused_naming_the_damping_that_resumes(model, tmp_path, calib, reference, capsys):
    """A run started with another damping (the default was 0.01 before it was measured) is refused, naming the
    --damp that resumes it; that resumes it."""
    args = quantize_args(model, tmp_path / "out", calib)
    interrupt_after_first_block(args)
    capsys.readouterr()
    out = out_of(args)
    err = fails(capsys, quantize_args(model, out, calib, "--damp", "0.01"), "add --damp 0.05 to resume it",
                untouched=[out, model])
    assert "settings.damp: 0.05 -> 0.01" in err, err
    assert main(args) == 0
    assert_same_tensors(reference, out)


def test_a_changed_compute_dtype_is_refused_naming_the_dtype_that_resumes(model, tmp_path, calib, capsys):
    """`--dtype auto` may choose otherwise on another machine: a resume in another forward dtype is refused (one
    checkpoint never mixes dtypes), naming the --dtype that resumes it; that resumes it to the bits of an
    uninterrupted run in that dtype, which differ from an fp32 run's."""
    args = quantize_args(model, tmp_path / "out", calib, "--dtype", "bfloat16")
    interrupt_after_first_block(args)
    capsys.readouterr()
    out = out_of(args)
    err = fails(capsys, quantize_args(model, out, calib, "--dtype", "float32"), "add --dtype bfloat16 to resume it",
                untouched=[out, model])
    assert 'compute.dtype: "bfloat16" -> "float32"' in err and "--restart" in err, err
    assert main(args) == 0
    start = json.loads((out / "quantize_log.jsonl").read_text().splitlines()[0])
    assert start["dtype"] == "bfloat16" and start["dtype_reason"] == "--dtype bfloat16"
    whole, fp32 = tmp_path / "whole", tmp_path / "fp32"
    assert main(quantize_args(model, whole, calib, "--dtype", "bfloat16")) == 0
    assert_same_tensors(whole, out)
    assert main(quantize_args(model, fp32, calib, "--dtype", "float32")) == 0
    shard = "model-00001-of-00003.safetensors"
    assert (out / shard).read_bytes() != (fp32 / shard).read_bytes(), "--dtype bfloat16 computed in fp32"


# -- a full disk --------------------------------------------------------------------------------------
def _pages(nbytes: int) -> int:
    return -(-nbytes // 4096) * 4096


@pytest.mark.parametrize("stage", ["activations-file", "block-shard", "side-files"])
def test_full_disk_then_the_same_command_resumes(model, tmp_path, calib, reference, capsys, stage):
    """A tmpfs too small for the run, sized from the reference output so that the disk fills while the second
    activation-sized work file is reserved, while the shard of block 0 is written, or while the tokenizer is copied at
    the end. Then the disk grows and the same command finishes, bit-identical."""
    import torch
    config = json.loads((model / "config.json").read_text())
    itemsize = 2 if torch.cuda.is_available() else 4
    # A block's work files must fit where its shard does not: with 4 rows of 64 tokens the kept down_proj inputs
    # alone outweigh this model's shard, so that stage calibrates on 8 tokens (and has its own reference run).
    rows, tokens = (1, 8) if stage == "block-shard" else (4, 64)
    fewer = ["--nsamples", str(rows), "--seqlen", str(tokens)] if stage == "block-shard" else []
    if fewer:
        reference = tmp_path / "reference"
        assert main(quantize_args(model, reference, calib, *fewer)) == 0

    def work_file(width: int) -> int:
        return _pages(128 + rows * tokens * width * itemsize)  # .npy header, then the rows

    acts = work_file(config["hidden_size"])
    # the down_proj's inputs, kept in a work file on the CPU (Plan.keeps_mlp_inputs)
    mlp_acts = 0 if torch.cuda.is_available() else work_file(config["intermediate_size"])
    shards = sorted(reference.glob("*.safetensors"))
    small_files = 6 * 4096  # journal, run log
    size = {
        "activations-file": acts + acts // 2 + small_files,
        # a block keeps up to three activation-sized work files at once (inputs, kept o_proj inputs or the next
        # inputs, the states after attention) and the kept down_proj inputs; plus an eighth of block 0's shard
        # (not half: these bounds run a few pages high, and with half the shard fitted on an AMD EPYC)
        "block-shard": 3 * acts + mlp_acts + _pages(shards[0].stat().st_size) // 8 + small_files,
        "side-files": (sum(_pages(p.stat().st_size) for p in shards) + acts + small_files
                       + sum(_pages((reference / n).stat().st_size)
                             for n in ("model.safetensors.index.json", "generation_config.json"))
                       + _pages((reference / "tokenizer.json").stat().st_size) // 2),
    }[stage]
    mount = tmp_path / "small"
    mount.mkdir()
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        args = quantize_args(model, mount / "out", calib, *fewer)
        err = fails(capsys, args, "no space left on device", code=1, untouched=[model])
        print(f"{stage}, {size // 1024} KiB: {err.strip()}")
        assert "run the same command again" in err and str(model) not in err, err
        if stage == "block-shard":
            assert "writing a shard" in err
        if stage == "side-files":
            assert str(mount / "out") in err and (mount / "out" / shards[-1].name).is_file(), err
        assert_not_finished(mount / "out")
        subprocess.run(["mount", "-o", f"remount,size={64 << 20}", str(mount)], check=True)
        assert main(args) == 0
        assert_same_tensors(reference, mount / "out")
        assert not (mount / "out" / ".leanfoem").exists()
    finally:
        subprocess.run(["umount", "-l", str(mount)])  # lazy: a failed run may still map a file there


# -- the real command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["truncated-shard", "nan-in-block-1"])
def test_real_stderr_is_one_line(model, tmp_path, calib, case):
    """The whole stderr of `python -m leanfoem`: logging, transformers and tqdm included."""
    if case == "truncated-shard":
        shard = first_shard(model)
        shard.write_bytes(shard.read_bytes()[:-1000])
        cause = f"truncated shard {shard.name}"
    else:
        name = "model.layers.1.self_attn.o_proj.weight"
        rewrite_tensor(model, name, lambda t: t[name].view(-1).__setitem__(3, float("nan")))
        cause = f"tensor {name} holds NaN or Inf"
    before = digest(model)
    done = subprocess.run([sys.executable, "-m", "leanfoem", *quantize_args(model, tmp_path / "out", calib)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and cause in lines[0] and lines[0].startswith("leanfoem: "), done.stderr
    assert digest(model) == before
