"""`--beta auto` (leanfoem/beta_choice.py): β chosen per layer by held-out output error, deterministic, resumable."""

import json

import torch

from factory import build_checkpoint
from leanfoem import beta_choice
from leanfoem.cli import main
from leanfoem.hessian import HessianAccumulator
from leanfoem.solver import quantize_weight
from test_pipeline import index_of, quantize_cli


def correlated_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs with a few strong directions, like a layer's (an isotropic H makes every β alike)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) * torch.logspace(0, -2, width)[:, None]
    return torch.randn(tokens, width, generator=g) @ mix + 0.3 * torch.randn(width, generator=g)


def accumulate(x: torch.Tensor) -> HessianAccumulator:
    acc = HessianAccumulator(x.shape[1])
    acc.add_batch(x)
    return acc


def test_each_layer_takes_the_beta_of_least_held_out_output_error():
    """The errors logged per β are ‖(W − Q_β)·X_held‖² / ‖W·X_held‖² over the layer's sampled rows (every
    SAMPLE_EVERY-th), computed here from the held-out inputs themselves (not through H, so only summation order
    differs: 1e-4 relative), and each layer takes the grid's argmin."""
    width, sizes = 96, [40, 24]
    x_fit, x_held = correlated_inputs(700, width, 1), correlated_inputs(100, width, 2)
    weight = torch.randn(sum(sizes), width, generator=torch.Generator().manual_seed(3))
    stats = beta_choice.split_statistics(accumulate(x_fit), accumulate(x_held), damp=0.01, desc_act=False,
                                         alpha=0.0)
    h_fit = accumulate(x_fit).scaled()[0]
    results, choices = beta_choice.solve(weight, sizes, stats, bits=3, group_size=32, sym=True, damp=0.01,
                                         desc_act=False, alpha=0.0)
    for layer, (w, choice) in enumerate(zip(weight.split(sizes), choices)):
        w = w[::beta_choice.SAMPLE_EVERY]
        reference = (w @ x_held.T).square().sum().item()
        for beta in beta_choice.GRID:
            q = quantize_weight(w, h_fit, bits=3, group_size=32, damp=0.01, beta=beta).dequantized
            direct = ((w - q) @ x_held.T).square().sum().item() / reference
            assert abs(choice["held_out_error"][str(beta)] - direct) <= 1e-4 * direct, (layer, beta)
        errors = choice["held_out_error"]
        assert choice["beta"] == min(beta_choice.GRID, key=lambda b: (errors[str(b)], b))
    assert [r.codes.shape[1] for r in results] == sizes


def test_the_written_layers_are_solved_with_all_rows_and_the_chosen_beta():
    """After the choice each layer is solved again with the Hessian of every row (fit and held-out): its codes are
    those of a plain FOEM solve at the chosen β on all rows (summation order of H aside: 99.9% equal)."""
    width, sizes = 64, [32, 32]
    x_fit, x_held = correlated_inputs(500, width, 4), correlated_inputs(80, width, 5)
    weight = torch.randn(sum(sizes), width, generator=torch.Generator().manual_seed(6))
    stats = beta_choice.split_statistics(accumulate(x_fit), accumulate(x_held), damp=0.01, desc_act=False,
                                         alpha=0.0)
    results, choices = beta_choice.solve(weight, sizes, stats, bits=4, group_size=32, sym=True, damp=0.01,
                                         desc_act=False, alpha=0.0)
    h_all = accumulate(torch.cat([x_fit, x_held])).scaled()[0]
    for w, result, choice in zip(weight.split(sizes), results, choices):
        plain = quantize_weight(w, h_all, bits=4, group_size=32, damp=0.01, beta=choice["beta"])
        assert (plain.codes == result.codes).float().mean() >= 0.999


def test_a_tie_goes_to_the_smaller_beta():
    """A layer whose every weight already lies on the grid quantizes exactly at any β: all errors are 0 and β = 0
    (plain GPTQ) is chosen, not whichever came last."""
    width = 32
    codes = torch.randint(0, 16, (16, width), generator=torch.Generator().manual_seed(7))
    codes[:, 0], codes[:, 1] = 0, 15  # each row spans the grid: its asymmetric step is then exactly 1/64, zero 8
    weight = (codes.float() - 8) / 64
    x = correlated_inputs(200, width, 8)
    stats = beta_choice.split_statistics(accumulate(x[:160]), accumulate(x[160:]), damp=0.01, desc_act=False,
                                         alpha=0.0)
    _, choices = beta_choice.solve(weight, [16], stats, bits=4, group_size=width, sym=False, damp=0.01,
                                   desc_act=False, alpha=0.0)
    assert set(choices[0]["held_out_error"].values()) == {0.0} and choices[0]["beta"] == 0.0


def module_records(out):
    events = [json.loads(line) for line in (out / "quantize_log.jsonl").read_text().splitlines()]
    return {e["module"]: e for e in events if e["event"] == "module"}


def shard_bytes(out):
    return {name: (out / name).read_bytes() for name in sorted(set(index_of(out).values()))}


def test_beta_auto_end_to_end_logs_each_choice_and_repeats_its_bits(tmp_path, calib_file, tokenizer_dir):
    """A real checkpoint quantized with --beta auto: every module logs a β from the grid with the errors it was chosen
    by, the checkpoint records "auto", and a second run gives the same bytes (the choice is deterministic, which is
    what a resumed run relies on: it redoes the interrupted block's choices)."""
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="llama")
    first, second = tmp_path / "a", tmp_path / "b"
    quantize_cli(source, first, calib_file, "--beta", "auto")
    quantize_cli(source, second, calib_file, "--beta", "auto")
    records = module_records(first)
    linears = {n[: -len(".weight")] for n in index_of(source) if ".layers." in n and n.endswith("_proj.weight")}
    assert set(records) == linears
    for record in records.values():
        assert record["beta"] in beta_choice.GRID
        assert set(record["held_out_error"]) == {str(b) for b in beta_choice.GRID}
        assert record["held_out_error"][str(record["beta"])] == min(record["held_out_error"].values())
    meta = json.loads((first / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["foem"]["beta"] == "auto"
    assert shard_bytes(first) == shard_bytes(second)


def test_beta_auto_bad_inputs_are_one_line_refusals(tmp_path, calib_file, tokenizer_dir, capsys):
    source = build_checkpoint(tmp_path / "src", tokenizer_dir, family="llama", layers=1)
    moe = build_checkpoint(tmp_path / "moe", tokenizer_dir, family="mixtral", layers=1)
    cases = [(source, ["--method", "gptq"], "--method foem"),
             (source, ["--nsamples", "1"], "--nsamples 2"),
             (moe, [], "mixture-of-experts")]
    for model, extra, message in cases:
        capsys.readouterr()
        out = tmp_path / "out"
        code = main(["quantize", "--model", str(model), "--out", str(out), "--calib", str(calib_file),
                     "--nsamples", "4", "--seqlen", "32", "--quiet", "--beta", "auto", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (out / "config.json").exists()
        assert main(["plan", "--model", str(model), "--beta", "auto", *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines() == err


def test_the_planner_counts_the_held_out_statistics():
    """On the CPU both extra Hessians sit beside the factorisation; on a GPU they wait in host memory, so the card's
    peak stays the fixed-β run's (the down_proj factorisation) and the host's block work grows by them."""
    from test_planner import LLAMA_33_70B
    from leanfoem.planner import plan
    width = LLAMA_33_70B["intermediate_size"]
    for device in ("cpu", "cuda"):
        fixed = plan(LLAMA_33_70B, device=device, nsamples=128, seqlen=2048, batch_tokens=4096)
        auto = plan(LLAMA_33_70B, device=device, nsamples=128, seqlen=2048, batch_tokens=4096, beta="auto")
        if device == "cpu":
            assert auto.device_peak_bytes - fixed.device_peak_bytes >= 2 * width ** 2 * 4
        else:
            assert auto.device_peak_bytes == fixed.device_peak_bytes
            assert auto.host_phases["block work"] - fixed.host_phases["block work"] == 2 * width ** 2 * 4
