"""edge-export MODEL -o BUNDLE: export a model to an edge bundle."""

from __future__ import annotations

import argparse
import sys

from edge.config import ExportOptions
from edge.errors import EdgeError
from edge.progress import Progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-export",
        description="Export a Hugging Face folder, a GGUF file or a built-in alias (smollm2-135m) to an edge bundle.")
    p.add_argument("model", help="HF model folder, .gguf file, or alias (smollm2-135m)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write (replaced atomically)")
    p.add_argument("--chunk", type=int, default=ExportOptions.chunk_length, help="prefill chunk length (tokens)")
    p.add_argument("--context", type=int, default=ExportOptions.max_context, help="max context (KV cache positions)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import export_model

    try:
        options = ExportOptions(chunk_length=args.chunk, max_context=args.context)
    except ValueError as e:
        print(f"edge-export: error: {e}", file=sys.stderr)
        return 2
    progress = Progress(total_steps=3, enabled=not args.quiet)
    try:
        manifest = export_model(args.model, args.output, options, progress)
    except (EdgeError, FileExistsError) as e:
        print(f"edge-export: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        size = sum(r["size"] for r in manifest.files.values())
        print(f"wrote {args.output}: {len(manifest.graphs)} graphs, {size / 1e6:.1f} MB, "
              f"in {progress.elapsed():.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
