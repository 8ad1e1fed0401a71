"""edge-export MODEL -o BUNDLE: export a model to an edge bundle."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from edge.budget import MAX_CONTEXT
from edge.cli_errors import add_debug_flag, bounded_int, cli_boundary
from edge.config import KV_CACHES, ExportOptions
from edge.errors import EdgeError
from edge.progress import Progress
from edge.vision import VISION_WEIGHTS

from edge.export.quant import options as quant_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-export",
        description="Export a Hugging Face folder, a GGUF file or a built-in alias (smollm2-135m) to an edge bundle.")
    p.add_argument("model", help="HF model folder, .gguf file, or alias (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write (replaced atomically)")
    p.add_argument("--chunk", type=bounded_int(1, MAX_CONTEXT), default=ExportOptions.chunk_length,
                   help="prefill chunk length (tokens)")
    p.add_argument("--context", type=bounded_int(1, MAX_CONTEXT), default=ExportOptions.max_context,
                   help=f"max context (KV cache positions; at most the model's max_position_embeddings and "
                        f"{MAX_CONTEXT})")
    p.add_argument("--plans", default="cpu,fused,split",
                   help="plans to emit, comma-separated: cpu (one fused-kernel graph for prompt and decode, "
                        "for boards without an accelerator; --plans cpu alone makes the smallest bundle), fused "
                        "(static-shape chunk graphs, W8A8) and split (fused's per-layer subgraphs for a CPU + "
                        "accelerator pair; needs fused). The runtime picks cpu without an accelerator")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="auto",
                   help="the CPU plan's KV cache: fp32, fp16 (half the memory; accuracy in docs/cpu_plan.md) or "
                        "auto (default): fp16 with quantized CPU linears, fp32 for a float bundle")
    p.add_argument("--vision-weights", choices=VISION_WEIGHTS, default=None,
                   help="vision-language models: the vision graph's linears, int8 (weights per output channel, run "
                        "by onnxruntime as 8-bit MatMulNBits; default when --quant is w8a8*) or fp32 (default "
                        "otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_debug_flag(p)
    quant_options.add_arguments(p)
    return p


def _multimodal(model: str) -> bool:
    from edge.export.families import family_for
    from edge.export.sources import peek_architecture

    arch = peek_architecture(model)
    try:
        return arch is not None and family_for(arch).vision is not None
    except EdgeError:
        return False  # unsupported: export_model says so


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager, ``kill``, a CI timeout) unwinds the export like Ctrl-C does, so
    the atomic writer removes its working folder and a half-done swap puts the old bundle back;
    left to the default action, the process would die with its hidden folder still there."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt("terminated (SIGTERM)")

    if threading.current_thread() is not threading.main_thread():  # handlers live on the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@cli_boundary("edge-export")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edge.cli_errors import UsageError
    from edge.export.pipeline import calibrates, export_model, measures, steps

    args.quant = quant_options.resolve_scheme(args.quant, _multimodal(args.model))
    try:
        options = ExportOptions(chunk_length=args.chunk, max_context=args.context,
                                plans=tuple(p.strip() for p in args.plans.split(",") if p.strip()),
                                vision_weights=args.vision_weights or quant_options.weights_for(args.quant),
                                kv_cache=args.kv_cache)
        quant, calib, accuracy = quant_options.from_args(args)
    except (ValueError, EdgeError) as e:
        raise UsageError(str(e)) from None
    progress = Progress(total_steps=steps(calibrates(quant, options), measured=measures(quant, accuracy, options)),
                        enabled=not args.quiet)
    try:
        with _sigterm_as_interrupt():
            manifest = export_model(args.model, args.output, options, progress, quant=quant, calibration=calib,
                                    accuracy=accuracy)
    except KeyboardInterrupt as e:  # write_atomically removed its working folder; the target was not touched
        raise KeyboardInterrupt(f"{str(e) or 'interrupted (Ctrl-C)'}; {args.output} is unchanged (no bundle was "
                                "written)") from None
    if not args.quiet:
        size = sum(r["size"] for r in manifest.files.values())
        print(f"wrote {args.output}: {len(manifest.graphs)} graphs, {size / 1e6:.1f} MB, "
              f"in {progress.elapsed():.1f}s", file=sys.stderr)
        acc = manifest.quantization.get("accuracy") or {}
        kinds = {"fused": f"{manifest.quantization.get('prefill')} (fused/split plans)",
                 "cpu": f"{manifest.plans.cpu.linears if manifest.plans.cpu else ''} (cpu plan)"}
        for plan, label in kinds.items():
            for text, r in acc.get(plan, {}).items():
                print(f"perplexity, {label}, {text}: " + (f"skipped ({r['skipped']})" if "skipped" in r else
                      f"float {r['float']:.3f}, quantized {r['quantized']:.3f} ({r['change_percent']:+.2f}%)"),
                      file=sys.stderr)
        if dec := acc.get("decode_weights"):
            print(f"perplexity, decode weights {dec['scheme']}, {dec['text']}: {dec['perplexity']:.3f} "
                  f"({dec['change_percent']:+.2f}%)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
