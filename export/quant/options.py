"""edge-export's quantization flags (kept apart from the general ones in cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.plans import CPU_LINEARS

from edge.export.quant.corpus import user_texts
from edge.export.quant.accuracy import EVAL_TOKENS, EVAL_WINDOW
from edge.export.quant.recipe import CALIB_TOKENS, CALIB_WINDOW, AccuracySpec, CalibrationSpec
from edge.export.quant.plan import DECODE_SCHEMES, PREFILL_SCHEMES, ROUNDINGS, QuantOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("quantization")
    q.add_argument("--quant", choices=("auto",) + PREFILL_SCHEMES, default="auto",
                   help="prefill linears: w8a8 (int8 weights, static int8 activations, float side path for "
                        "outlier channels; calibrates first, a few minutes for SmolLM2-135M on 2 cores), "
                        "w8a8-nooutliers (no side path), fp32 (float bundle, no calibration); auto (default): "
                        "w8a8 for text models, fp32 for vision-language models (calibration is text only: "
                        "the static activation scales would not have seen image tokens)")
    q.add_argument("--decode-weights", choices=DECODE_SCHEMES, default=None,
                   help="decode linears (float activations): int8 (default when --quant is w8a8*: the "
                        "prefill's own int8 tensors), int4 (MatMulNBits blocks), fp32")
    q.add_argument("--outliers", default="auto", metavar="auto|off|K",
                   help="hot channels per linear input: auto (spread a global budget, see --hot-budget), "
                        "off, or at most K per input")
    q.add_argument("--outlier-layers", type=float, default=1.0, metavar="FRACTION",
                   help="keep the side path in this fraction of the linear inputs, most important first "
                        "(importance = largest outlier / scale); the others clip (default 1.0)")
    q.add_argument("--hot-budget", type=float, default=0.005, metavar="FRACTION",
                   help="auto: hot channels at most this fraction of all linear input channels (0.005)")
    q.add_argument("--smooth", default="auto", metavar="auto|off|ALPHA",
                   help="SmoothQuant migration folded into the norms / up_proj: strength searched per "
                        "input (auto), off, or a fixed alpha")
    q.add_argument("--act16", default=",".join(QuantOptions.act16), metavar="auto|KINDS|none",
                   help="linears whose input gets 16-bit activations (two int8 passes, hi + lo): 'auto' (the "
                        "inputs where the second pass lowers the estimated error most per multiply-add, up to "
                        "--act16-budget), comma-separated kinds (q_proj = q/k/v, o_proj, gate_proj = gate/up, "
                        f"down_proj) or 'none' (default {','.join(QuantOptions.act16)})")
    q.add_argument("--act16-budget", type=float, default=QuantOptions.act16_budget, metavar="FRACTION",
                   help="--act16 auto: second passes for at most this fraction of the prefill linears' "
                        f"multiply-adds ({QuantOptions.act16_budget})")
    q.add_argument("--float-linears", type=int, default=0, metavar="N",
                   help="keep the N linear inputs with the largest estimated error in float (default 0)")
    q.add_argument("--weight-rounding", choices=ROUNDINGS, default=QuantOptions.rounding,
                   help="int8 weights of the static W8A8 plans: gptq (each rounding error compensated through "
                        "the calibration inputs' second moments, every domain weighted alike; ~1 min more) or "
                        f"nearest (default {QuantOptions.rounding})")
    q.add_argument("--block", type=int, default=32, help="int4 block size (power of two >= 16, default 32)")
    q.add_argument("--calib", type=Path, nargs="+", default=None, metavar="PATH",
                   help="calibration text: UTF-8 files, .jsonl chats ({\"messages\": [...]} per line, rendered in "
                        "the model's template) or folders of them (default: edge's multi-domain corpus, "
                        "docs/quantization.md)")
    q.add_argument("--calib-tokens", type=int, default=CALIB_TOKENS, help=f"calibration tokens ({CALIB_TOKENS})")
    q.add_argument("--calib-window", type=int, default=CALIB_WINDOW,
                   help=f"calibration window, each a fresh context ({CALIB_WINDOW})")
    q.add_argument("--cpu-weights", choices=CPU_LINEARS, default=None,
                   help="the CPU plan's linears: int8 / int4 = MatMulNBits blocks of 32 with int8 compute "
                        "(activations quantized per block at run time; a GGUF source's Q4_1 / Q8_0 blocks as "
                        "stored, int4 with Q4_1's block offsets rounded into extra 4-bit input rows, int4exact "
                        "with them exact in a float MatMul, slower); int8dyn = the residual stream rotated (a "
                        "randomized Hadamard folded into the weights) so that q|k|v and gate|up run onnxruntime's int8 GEMM with one dynamic "
                        "activation scale per call (faster prompts, less memory), o / down / head as int8; "
                        "fp32 (default: int8dyn unless --quant fp32)")
    q.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS,
                   help=f"held-out tokens for the accuracy report ({EVAL_TOKENS})")
    q.add_argument("--no-accuracy-report", action="store_true",
                   help="skip the held-out perplexity measurement at export")


def resolve_scheme(quant: str, multimodal: bool) -> str:
    """--quant auto: w8a8 for text models; fp32 for vision-language ones, whose image tokens the
    text-only calibration never sees."""
    return quant if quant != "auto" else ("fp32" if multimodal else "w8a8")


def weights_for(scheme: str) -> str:
    """The default int8/fp32 weights of the decode and vision linears: int8 unless the prefill is
    float (``scheme`` resolved, see resolve_scheme)."""
    return "fp32" if scheme == "fp32" else "int8"


def cpu_weights_for(scheme: str) -> str:
    """The CPU plan's default linears: int8dyn (the fastest prompts and least memory of the
    kinds within the accuracy bound, docs/cpu_plan.md) unless the prefill is float."""
    return "fp32" if scheme == "fp32" else QuantOptions.cpu


def from_args(args: argparse.Namespace) -> tuple[QuantOptions, CalibrationSpec, AccuracySpec]:
    """Raises ValueError (bad value) or EdgeError (unreadable calibration file). ``args.quant``
    must be resolved (resolve_scheme) first."""
    decode = args.decode_weights or weights_for(args.quant)
    cpu = args.cpu_weights or cpu_weights_for(args.quant)
    act16 = () if args.act16.strip() in ("", "none") else tuple(k.strip() for k in args.act16.split(",") if k.strip())
    quant = QuantOptions(prefill=args.quant, decode=decode, outliers=args.outliers, outlier_layers=args.outlier_layers,
                         hot_budget=args.hot_budget, smooth=args.smooth, act16=act16, act16_budget=args.act16_budget,
                         float_groups=args.float_linears, rounding=args.weight_rounding,
                         block=args.block, cpu=cpu)
    if args.calib_tokens < 1 or args.calib_window < 2 or args.eval_tokens < 1:
        raise ValueError("--calib-tokens, --calib-window and --eval-tokens must be positive")
    texts, label = None, CalibrationSpec.label
    if args.calib:
        texts, label = tuple(user_texts(args.calib)), " ".join(map(str, args.calib))
    calib = CalibrationSpec(texts=texts, tokens=args.calib_tokens, window=args.calib_window, label=label)
    return quant, calib, AccuracySpec(enabled=not args.no_accuracy_report, tokens=args.eval_tokens, window=EVAL_WINDOW)
