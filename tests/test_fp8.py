"""FP8 source checkpoints (DeepSeek-V3/R1, GLM-4.5-FP8, Qwen3-*-FP8) are read as they are: a tiny Llama converted
here into DeepSeek's layout (float8_e4m3fn weights, float32 `weight_scale_inv` per 128 × 128 block, down_proj's 224
inputs and gate/up's 224 outputs padded in the scale grid, `quantization_config` in config.json, shards that split
every block and put scales apart from their weights) quantizes bit for bit like its bf16 twin, made here from the same
fp8 tensors; `leanfoem eval` agrees on both; the dequantization agrees with transformers' own. Bad FP8 input and
other stored quantizations get one line and exit 2 from `quantize` and `plan`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from factory import build_checkpoint
from leanfoem.checkpoint_reader import CheckpointReader
from leanfoem.cli import main
from perplexity import eval_cli
from test_bad_input import fails, quantize_args, restore_signal_handlers  # noqa: F401  (an autouse fixture)

BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic",
              "fmt": "e4m3"}
SHARDS = 3


# -- DeepSeek's layout, made here ------------------------------------------------------------------------
def to_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's block quantization: per 128 × 128 block (the last ones padded), scale = amax / 448 and
    fp8 = weight / scale; `weight_scale_inv` is that scale (W = fp8 · weight_scale_inv)."""
    rows, cols = weight.shape
    grid = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(grid[0] * BLOCK, grid[1] * BLOCK)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid[0], BLOCK, grid[1], BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    fp8 = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return fp8, scale


def reference_dequantize(fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The plain reading of the format: the scale grid expanded to 128 × 128 blocks, cut to the weight, the product
    in fp32, rounded once to bf16."""
    rows, cols = fp8.shape
    full = scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (fp8.float() * full).to(torch.bfloat16)


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek stores in fp8: every matrix of the blocks but the routers (norms are vectors)."""
    return ".layers." in name and tensor.dim() == 2 and not name.endswith("gate.weight")


def stored_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def write_checkpoint(model_dir: Path, tensors: dict[str, torch.Tensor], side_files_from: Path, config: dict,
                     shards: int) -> Path:
    """Tensors dealt round-robin over `shards` shards (every block, and most weights and their scales, split)."""
    shutil.copytree(side_files_from, model_dir, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    weight_map = {}
    names = sorted(tensors)
    for k in range(shards):
        shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k::shards]}
        save_file(part, model_dir / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def fp8_and_twin(dense: Path, root: Path) -> tuple[Path, Path]:
    """(fp8 source, its bf16 twin) from a checkpoint: every linear weight of the blocks in DeepSeek's layout; the twin
    holds the reference dequantization of the fp8 weights and no scales. Layer 0 also carries static activation
    scales, which a weight-only output must not take over."""
    config = json.loads((dense / "config.json").read_text())
    fp8_tensors, twin_tensors = {}, {}
    for name, tensor in stored_tensors(dense).items():
        if not is_linear_weight(name, tensor):
            fp8_tensors[name] = twin_tensors[name] = tensor
            continue
        fp8, scale = to_fp8(tensor)
        fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = fp8, scale
        if ".layers.0." in name:
            fp8_tensors[name[: -len(".weight")] + ".activation_scale"] = torch.tensor(0.5)
        twin_tensors[name] = reference_dequantize(fp8, scale)
    fp8_dir = write_checkpoint(root / "fp8", fp8_tensors, dense, {**config, "quantization_config": FP8_CONFIG},
                               SHARDS)
    twin_dir = write_checkpoint(root / "twin", twin_tensors, dense, config, 1)
    return fp8_dir, twin_dir


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("fp8")
    dense = build_checkpoint(root / "dense", tokenizer_dir, layers=2, hidden=256, intermediate=224, heads=4,
                             kv_heads=2)
    return fp8_and_twin(dense, root)


@pytest.fixture
def fp8_model(sources, tmp_path):
    """A private copy of the fp8 source, for tests that damage it."""
    return Path(shutil.copytree(sources[0], tmp_path / "fp8"))


def shard_of(model: Path, name: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][name]


def rewrite(model: Path, name: str, value: torch.Tensor | None) -> None:
    """Replaces (or, with None, removes) one stored tensor, in its shard and in the index."""
    shard = shard_of(model, name)
    tensors = load_file(shard)
    if value is None:
        del tensors[name]
        index = json.loads((model / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = value
    save_file(tensors, shard, metadata={"format": "pt"})


# -- reading --------------------------------------------------------------------------------------------
def test_reader_dequantizes_as_transformers_does(sources):
    """Every fp8 weight comes back as bf16 under its own name, equal to the plain reference and to transformers'
    own dequantization. transformers 5.24 has two: `Fp8Dequantize` (what `from_pretrained(..., dequantize=True)`
    runs; CPU) derives the block from the scale grid, so it agrees on 128-aligned weights but reads padded blocks
    wrongly or refuses them; `_dequantize_fp8_weight` (its backward path) takes the block size, and in fp32 then
    rounded to bf16 agrees on every weight."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
    fp8_dir, twin_dir = sources
    reader = CheckpointReader(fp8_dir)
    stored = stored_tensors(fp8_dir)
    twin = stored_tensors(twin_dir)
    assert reader.names() == sorted(twin), "the scales and activation scales are hidden, nothing else"
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in reader
    aligned = 0
    for name, ours in reader.tensors(reader.names()).items():
        assert ours.dtype == twin[name].dtype and torch.equal(ours, twin[name]), name
        if not is_linear_weight(name, ours):
            continue
        fp8, scale = stored[name], stored[name + "_scale_inv"]
        assert fp8.dtype == torch.float8_e4m3fn
        assert torch.equal(ours, reference_dequantize(fp8, scale)), name
        assert torch.equal(ours, _dequantize_fp8_weight(fp8, scale, [BLOCK, BLOCK], torch.float32).bfloat16()), name
        if fp8.shape[0] % BLOCK == 0 and fp8.shape[1] % BLOCK == 0:
            aligned += 1
            assert torch.equal(ours, Fp8Dequantize(None)._dequantize_one(fp8, scale, torch.bfloat16)), name
    assert aligned == 8  # q, k, v, o of both layers; gate, up (224 rows) and down (224 inputs) are padded


def test_fp8_source_quantizes_and_evaluates_like_its_bf16_twin(sources, tmp_path, calib_file, capsys):
    assert_same_as_twin(*sources, tmp_path, calib_file, capsys)


def assert_same_as_twin(fp8_dir: Path, twin_dir: Path, tmp_path: Path, calib_file: Path, capsys, *extra) -> None:
    """The fp8 source and its twin quantize to the same shards and configs and evaluate to the same perplexity."""
    outs = {}
    for kind, model in (("fp8", fp8_dir), ("twin", twin_dir)):
        outs[kind] = tmp_path / kind
        assert main(quantize_args(model, outs[kind], calib_file, *extra)) == 0
    shards = sorted(p.name for p in outs["twin"].glob("*.safetensors"))
    assert shards == sorted(p.name for p in outs["fp8"].glob("*.safetensors"))
    for shard in shards:
        assert (outs["fp8"] / shard).read_bytes() == (outs["twin"] / shard).read_bytes(), shard
    configs = {kind: json.loads((out / "config.json").read_text()) for kind, out in outs.items()}
    for config in configs.values():  # the inputs' configs differ, so their fingerprints do; nothing else may
        del config["quantization_config"]["meta"]["fingerprint"]
    assert configs["fp8"] == configs["twin"]
    assert configs["fp8"]["quantization_config"]["quant_method"] == "gptq"
    assert "weight_block_size" not in configs["fp8"]["quantization_config"]
    capsys.readouterr()
    perplexities = [eval_cli(model, calib_file, capsys, seqlen=64, windows=3) for model in (fp8_dir, twin_dir)]
    assert perplexities[0] == perplexities[1]


# -- bad fp8 input --------------------------------------------------------------------------------------
WEIGHT = "model.layers.0.mlp.down_proj.weight"  # [256, 224]: a 2 × 2 scale grid, the second column block padded


def nan_fp8(model):
    weight = load_file(shard_of(model, WEIGHT))[WEIGHT].clone()
    weight.view(torch.uint8).view(-1)[7] = 0x7F  # float8_e4m3fn has NaN, no Inf
    return WEIGHT, weight


BAD = {
    "missing scale": (lambda m: (WEIGHT + "_scale_inv", None),
                      f"tensor {WEIGHT} is stored as float8_e4m3fn but its weight_scale_inv is missing"),
    "scale shape": (lambda m: (WEIGHT + "_scale_inv", torch.ones(2, 1)),
                    f"tensor {WEIGHT}_scale_inv has shape [2, 1]; {WEIGHT} [256, 224] in blocks of [128, 128] needs "
                    "[2, 2]"),
    "scale dtype": (lambda m: (WEIGHT + "_scale_inv", torch.ones(2, 2, dtype=torch.uint8)),
                    f"tensor {WEIGHT}_scale_inv is uint8"),
    "NaN scale": (lambda m: (WEIGHT + "_scale_inv", torch.tensor([[1.0, float("nan")], [1.0, 1.0]])),
                  f"tensor {WEIGHT}_scale_inv holds NaN or Inf"),
    "Inf scale": (lambda m: (WEIGHT + "_scale_inv", torch.tensor([[1.0, 1.0], [float("inf"), 1.0]])),
                  f"tensor {WEIGHT}_scale_inv holds NaN or Inf"),
    "NaN weight": (nan_fp8, f"tensor {WEIGHT} holds NaN or Inf values (after fp8 dequantization)"),
    "overflow": (lambda m: (WEIGHT + "_scale_inv", torch.full((2, 2), 1e38)),
                 f"tensor {WEIGHT} holds NaN or Inf values (after fp8 dequantization)"),
    "scale of a bf16 weight": (lambda m: ("model.layers.0.self_attn.q_proj.weight", torch.ones(256, 256,
                                                                                                dtype=torch.bfloat16)),
                               "tensor model.layers.0.self_attn.q_proj.weight has a weight_scale_inv but is a 2-d "
                               "bfloat16 tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_input_is_one_line(fp8_model, tmp_path, calib_file, capsys, case):
    damage, cause = BAD[case]
    rewrite(fp8_model, *damage(fp8_model))
    fails(capsys, quantize_args(fp8_model, tmp_path / "out", calib_file), cause, untouched=[fp8_model])
    assert not (tmp_path / "out" / "config.json").exists()


def test_fp8_weights_without_an_fp8_config_are_refused(fp8_model, tmp_path, calib_file, capsys):
    config = json.loads((fp8_model / "config.json").read_text())
    del config["quantization_config"]
    (fp8_model / "config.json").write_text(json.dumps(config))
    fails(capsys, quantize_args(fp8_model, tmp_path / "out", calib_file),
          "is stored as float8_e4m3fn but config.json declares no fp8 quantization", untouched=[fp8_model])


# -- stored quantizations leanfoem does not read ----------------------------------------------------------
REFUSED = {
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128}, "quant_method 'awq'"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    "compressed-tensors": ({"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors'"),
    "mxfp4": ({"quant_method": "mxfp4"}, "quant_method 'mxfp4'"),
    "per-tensor fp8": ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None},
                       "fp8 with weight_block_size None"),
    "fp8 block of one int": ({"quant_method": "fp8", "weight_block_size": [128]}, "fp8 with weight_block_size [128]"),
    "fp4 experts": ({**FP8_CONFIG, "expert_dtype": "fp4"}, "fp8 with expert_dtype 'fp4'"),
}


def plan_and_quantize_refuse(model: Path, out: Path, capsys, cause: str) -> None:
    """`plan` refuses what `quantize` refuses: the same one line, exit 2, no plan printed."""
    capsys.readouterr()
    assert main(["plan", "--model", str(model)]) == 2
    planned = capsys.readouterr()
    assert main(["quantize", "--model", str(model), "--out", str(out)]) == 2
    quantized = capsys.readouterr()
    assert planned.out == ""
    assert planned.err == quantized.err and planned.err.count("\n") == 1, planned.err
    assert planned.err.startswith("leanfoem: unsupported source quantization: ") and cause in planned.err
    assert not out.exists()


@pytest.mark.parametrize("case", list(REFUSED))
def test_other_stored_quantization_is_refused(fp8_model, tmp_path, capsys, case):
    quantization, cause = REFUSED[case]
    config = json.loads((fp8_model / "config.json").read_text())
    (fp8_model / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    plan_and_quantize_refuse(fp8_model, tmp_path / "out", capsys, cause)


def test_a_gptq_checkpoint_is_refused_as_a_source_and_still_evaluates(sources, tmp_path, calib_file, capsys):
    gptq = tmp_path / "gptq"
    assert main(quantize_args(sources[0], gptq, calib_file)) == 0
    with safe_open(str(next(gptq.glob("model-00001-*.safetensors"))), "pt") as f:
        assert any(k.endswith(".qweight") for k in f.keys())
    plan_and_quantize_refuse(gptq, tmp_path / "again", capsys, "quant_method 'gptq'")
    assert eval_cli(gptq, calib_file, capsys, seqlen=64, windows=3) > 1


def test_fp8_moe_source_quantizes_like_its_bf16_twin(tmp_path, tokenizer_dir, calib_file, capsys):
    """DeepSeek-V3's own layout: every expert's projections, the shared experts and the MLA projections in fp8, the
    routers in full precision; read expert by expert, groups of 3, the same bits as the dequantized twin."""
    dense = build_checkpoint(tmp_path / "dense", tokenizer_dir, family="deepseek_v3")
    (tmp_path / "src").mkdir()
    fp8_dir, twin_dir = fp8_and_twin(dense, tmp_path / "src")
    assert any(".experts.7.down_proj.weight_scale_inv" in n for n in stored_tensors(fp8_dir))
    assert_same_as_twin(fp8_dir, twin_dir, tmp_path, calib_file, capsys, "--expert-group", "3")
