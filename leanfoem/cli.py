"""The `leanfoem` command line: `quantize` (and, as they land, `eval`, `plan`).

What must stay true: every error a user can cause ends in one line on stderr naming the cause and a
non-zero exit code (2 for bad input, 130 when interrupted); `--debug` shows the traceback as well. A fatal
signal from native code prints the Python stack where it happened (faulthandler).
SIGINT/SIGTERM stop the run at the next safe point and print how to resume.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import logging
import signal
import sys

from . import __version__

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _group_size(text: str) -> int:
    value = int(text)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"must be -1 (per row) or a positive integer, not {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], not {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _beta(text: str) -> float | str:
    """A number >= 0, or "auto" (chosen per layer from a grid by held-out error, beta_choice.py)."""
    return text if text == "auto" else _non_negative(text)


def add_quantize_parser(sub) -> None:
    from .solver import DEFAULT_DAMP
    p = sub.add_parser("quantize", help="quantize a checkpoint into a GPTQ checkpoint, one block at a time",
                       description="Quantize a Hugging Face causal LM (safetensors) into a standard GPTQ "
                                   "checkpoint. Run the same command again to resume an interrupted run.")
    p.add_argument("--model", required=True, help="model directory, 'demo', or a Hugging Face repo id")
    p.add_argument("--out", required=True, help="output directory (new or empty, or an unfinished run)")
    p.add_argument("--method", choices=["foem", "gptq", "gptaq", "rtn"], default="foem")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4)
    p.add_argument("--group-size", type=_group_size, default=128, help="columns per group; -1 = per row")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing diag(H)")
    p.add_argument("--alpha", type=_non_negative, default=0.0, help="GPTAQ term weight (0 = off)")
    p.add_argument("--beta", type=_beta, default=0.2,
                   help="FOEM first-order term weight (default %(default)s), or auto: chosen per layer from "
                        "{0, 0.05, 0.1, 0.2, 0.3} by the output error on held-out calibration rows (1 in 8)")
    p.add_argument("--damp", type=_fraction, default=DEFAULT_DAMP,
                   help="damping, fraction of mean(diag H) (default %(default)s, chosen by KL divergence: "
                        "docs/BENCHMARKS.md)")
    p.add_argument("--calib", default=None, metavar="SOURCE",
                   help="a .txt or .jsonl file, or c4 / wikitext2 (online); default: the bundled text")
    p.add_argument("--nsamples", type=_positive_int, default=128)
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per sample (capped by the model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_dtype_argument(p)
    p.add_argument("--checkpoint-format", choices=["gptq", "gptq_v2"], default="gptq")
    p.add_argument("--batch-tokens", type=_positive_int, default=None,
                   help="tokens per forward batch (default: the largest the planner finds to fit)")
    p.add_argument("--expert-calibration", choices=["all", "routed"], default="all",
                   help="mixture-of-experts: each expert's statistics from all calibration tokens (default) or only "
                        "from the tokens routed to it")
    p.add_argument("--expert-group", type=_positive_int, default=None,
                   help="mixture-of-experts: experts read and solved together (default: the planner's choice)")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run in --out and start over")
    p.add_argument("--keep-work", action="store_true", help="keep the work files (OUT/.leanfoem) at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    p.set_defaults(handler=run_quantize)


def _add_dtype_argument(p) -> None:
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="forward dtype (Hessians stay fp32); auto: bf16 on a CPU with native bf16 matmuls that a "
                        "short probe finds faster, else fp32; on a GPU the checkpoint's half type")


def run_quantize(args) -> int:
    from .distributed import launched
    from .pipeline import QuantizeOptions, quantize
    fields = QuantizeOptions.__dataclass_fields__
    options = QuantizeOptions(**{k: v for k, v in vars(args).items() if k in fields})
    with launched(options.device) as ranks:  # under torchrun: this process's rank of the job; else one process
        out = quantize(options, ranks)
    if not options.quiet:
        print(f"done: {out}")
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint (full precision or GPTQ), one block at a time",
                       description="Perplexity over consecutive non-overlapping windows of a text, streamed "
                                   "block by block like quantization.")
    p.add_argument("--model", required=True, help="model directory, 'demo', or a Hugging Face repo id")
    p.add_argument("--reference", default=None, metavar="FP_MODEL",
                   help="the full-precision model: also report KL(P_ref || P_model) per token, top-1 agreement and "
                        "the correct token's probability shift")
    p.add_argument("--text", default=None, help="a text file, or wikitext2 / c4 (online); default: the bundled text")
    p.add_argument("--seqlen", type=_positive_int, default=2048)
    p.add_argument("--windows", type=_positive_int, default=None, help="score only the first N windows")
    p.add_argument("--device", default="auto")
    p.add_argument("--expert-group", type=_positive_int, default=None, metavar="N",
                   help="mixture-of-experts: experts read, dequantized and applied together (default: as many as fit "
                        "in half the free memory: the card's, or host RAM on the CPU); the figures do not depend on it")
    p.add_argument("--json", action="store_true", help="last line of stdout: a JSON object")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    from .evaluation import default_eval_text, evaluate_perplexity, format_result, load_text
    text = load_text(args.text or default_eval_text())
    if args.reference is not None:
        import json
        from .divergence import evaluate_divergence, format_divergence
        result = evaluate_divergence(args.model, args.reference, text, seqlen=args.seqlen, windows=args.windows,
                                     device=args.device, expert_group=args.expert_group)
        print(format_divergence(result))
        if args.json:
            print(json.dumps(result))
        return 0
    result = evaluate_perplexity(args.model, text, seqlen=args.seqlen, windows=args.windows, device=args.device,
                                 expert_group=args.expert_group)
    print(format_result(result, args.json))
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory and disk budget of a quantization run, from config.json alone",
                       description="Forecast peak device memory, peak host memory and disk of `leanfoem quantize` "
                                   "for this model and these settings, and the batch size it would use. "
                                   "Reads config.json only (no weights).")
    p.add_argument("--model", required=True, help="model directory, its config.json, 'demo', or a hub repo id")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="device budget, e.g. 24GiB (default: the card's)")
    p.add_argument("--host-memory", default=None, metavar="SIZE", help="host budget, e.g. 32GiB (default: this "
                                                                         "machine's RAM)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda when --gpu-memory is given)")
    p.add_argument("--method", choices=["foem", "gptq", "gptaq", "rtn"], default="foem")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4)
    p.add_argument("--group-size", type=_group_size, default=128)
    p.add_argument("--alpha", type=_non_negative, default=0.0)
    p.add_argument("--beta", type=_beta, default=0.2, help="a number, or auto")
    p.add_argument("--nsamples", type=_positive_int, default=128)
    p.add_argument("--seqlen", type=_positive_int, default=2048)
    p.add_argument("--batch-tokens", type=_positive_int, default=None,
                   help="check this forward batch (default: choose the largest that fits)")
    p.add_argument("--calib", default=None, metavar="FILE", help="calibration text (its size matters for small models)")
    p.add_argument("--expert-calibration", choices=["all", "routed"], default="all",
                   help="mixture-of-experts: each expert's statistics from all calibration tokens (default) or from "
                        "the tokens routed to it")
    p.add_argument("--expert-group", type=_positive_int, default=None, metavar="N",
                   help="mixture-of-experts: check groups of N experts (default: the largest that fits)")
    _add_dtype_argument(p)
    p.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                   help="processes of a torchrun job (--nproc-per-node x --nnodes): per-rank memory")
    p.add_argument("--json", action="store_true", help="last line of stdout: a JSON object")
    p.set_defaults(handler=run_plan)


def run_plan(args) -> int:
    import json
    import os
    from .architectures import architecture_for, check_terms_supported
    from .beta_choice import check_applies as check_beta_auto
    from .distributed import check_supported
    from .planner import budgets_for, format_plan, load_config, plan
    from .source_formats import without_stored_quantization
    kind, gpu, host = budgets_for(args.device, args.gpu_memory, args.host_memory)
    calib_bytes = os.path.getsize(args.calib) if args.calib and os.path.isfile(args.calib) else None
    stored = load_config(args.model)  # an FP8 source's quantization_config stays in what is planned: it reads fp8
    config = without_stored_quantization(stored)  # refused as `quantize` refuses it
    architecture_for(config)  # a plan for a model that `quantize` refuses would be a promise it breaks
    check_terms_supported(config, 0.0 if args.method in ("gptq", "rtn") else args.alpha, args.beta == "auto")
    if args.beta == "auto":
        check_beta_auto(args.method, args.nsamples)
    check_supported(args.nproc, beta_auto=args.beta == "auto")  # as `quantize` under torchrun does
    dtype = None if kind == "cuda" and args.dtype == "auto" else _resolved_dtype(args.dtype)
    result = plan(stored, device=kind, gpu_memory=gpu, host_memory=host, nsamples=args.nsamples,
                  seqlen=args.seqlen, bits=args.bits, group_size=args.group_size, method=args.method,
                  alpha=args.alpha, beta=args.beta, batch_tokens=args.batch_tokens, calib_bytes=calib_bytes,
                  compute_dtype=dtype, expert_calibration=args.expert_calibration, expert_group=args.expert_group,
                  nproc=args.nproc)
    print(format_plan(result, args.model))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


def _resolved_dtype(requested: str) -> str:
    """The dtype `quantize --dtype requested` computes in (auto: as it would choose on this machine's CPU)."""
    import torch
    from .dtype_choice import choose
    return choose(requested, torch.device("cpu"), torch.float32).name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leanfoem",
        description="Quantize LLMs with FOEM/GPTQ one decoder block at a time into standard GPTQ checkpoints.")
    parser.add_argument("--version", action="version", version=f"leanfoem {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_quantize_parser(sub)
    add_eval_parser(sub)
    add_plan_parser(sub)
    return parser


def _user_error_types() -> tuple[type, ...]:
    from .architectures import UnsupportedArchitecture
    from .calibration import CalibrationError
    from .checkpoint_reader import CheckpointError
    from .hessian import FactorizationError
    from .journal import ResumeRefused
    from .pipeline import OutputError
    return (UnsupportedArchitecture, CalibrationError, CheckpointError, FactorizationError, ResumeRefused,
            OutputError, ValueError)


def _safetensors_error() -> type:
    from safetensors import SafetensorError
    return SafetensorError


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    from .distributed import end_aborted_rank
    end_aborted_rank(code)  # a rank of a failed torchrun job ends here (its message is out)
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.WARNING, format="leanfoem: %(message)s")
    # A crash in native code (BLAS, LAPACK, a kernel) kills the process with a signal and no Python error: this
    # prints where it happened. The journal makes the same command resume at the block that was running.
    faulthandler.enable(file=sys.__stderr__)  # the process's own stderr, also when a caller swapped sys.stderr
    try:  # the handlers below need the pipeline imported: a signal while it loads must not find it half-made
        from .pipeline import Interrupted, StopSignal
    except KeyboardInterrupt:
        print("leanfoem: interrupted before it started; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED

    def on_signal(signum, frame):
        StopSignal.requested = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    from .distributed import RankLost
    try:
        return args.handler(args)
    except RankLost as exc:
        print(f"leanfoem: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Interrupted:
        print("leanfoem: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if args.debug:
            raise
        if exc.errno == errno.ENOSPC:
            where = exc.filename2 or exc.filename or "output"  # shutil.copyfile names its source first
            print(f"leanfoem: no space left on device ({where}); free some space and run the "
                  "same command again to resume", file=sys.stderr)
        else:
            print(f"leanfoem: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except _safetensors_error() as exc:  # its Rust writer reports I/O errors (full disk) as this, not as OSError
        if args.debug:
            raise
        text = (str(exc).splitlines() or [""])[0]
        if "os error 28" in text:
            print("leanfoem: no space left on device (writing a shard); free some space and run the same "
                  "command again to resume", file=sys.stderr)
        else:
            print(f"leanfoem: safetensors: {text}", file=sys.stderr)
        return EXIT_FAILED
    except _user_error_types() as exc:
        if args.debug:
            raise
        print("leanfoem: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever the message
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
