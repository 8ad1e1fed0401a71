"""edge-eval BUNDLE --perplexity: accuracy of a bundle on real text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.budget import MAX_CONTEXT, max_threads
from edge.cli_errors import add_debug_flag, bounded_int, cli_boundary
from edge.errors import EdgeError
from edge.progress import Progress
from edge.runtime.perplexity import EVAL_TEXTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-eval", description="Measure a bundle's accuracy.")
    p.add_argument("bundle")
    p.add_argument("--perplexity", action="store_true", required=True, help="perplexity over a text")
    texts = p.add_mutually_exclusive_group()
    texts.add_argument("--text", type=Path, default=None,
                       help="UTF-8 text file (default: Python's pydoc_data.topics text)")
    texts.add_argument("--eval-text", choices=tuple(EVAL_TEXTS), default=None,
                       help="one of the texts edge-export's accuracy report measured, e.g. licenses (GPL-3 + "
                            "Apache-2.0 + MPL-2.0) or changelog (dpkg's): use --tokens as recorded in the "
                            "manifest, 8192 by default; prints the recorded figure beside")
    texts.add_argument("--heldout", dest="eval_text", action="store_const", const="pydoc-heldout",
                       help="= --eval-text pydoc-heldout (the second half of the default text)")
    texts.add_argument("--licenses", dest="eval_text", action="store_const", const="licenses",
                       help="= --eval-text licenses")
    p.add_argument("--plan", choices=("cpu", "fused", "split"), default=None,
                   help="the prefill plan to measure (default: the one the runtime picks here)")
    p.add_argument("--tokens", type=bounded_int(1), default=4096, help="tokens to predict (>= 1)")
    p.add_argument("--window", type=bounded_int(2, MAX_CONTEXT), default=1024,
                   help="window (fresh context) length in tokens (>= 2; at most the bundle's context)")
    p.add_argument("--threads", type=bounded_int(0, max_threads, " (4 per CPU core)"), default=0,
                   help="onnxruntime threads (0 = default)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (key 'perplexity')")
    add_debug_flag(p)
    return p


@cli_boundary("edge-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edge.runtime.model import Model
    from edge.runtime.perplexity import bundle_perplexity, default_text

    progress = Progress(enabled=not args.json)
    if args.text is None:
        text = EVAL_TEXTS[args.eval_text][1]() if args.eval_text else default_text()
    else:
        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeError(f"{args.text}: cannot read as UTF-8 text ({e})") from None
    model = Model.load(args.bundle, threads=args.threads, plan=args.plan)
    result = bundle_perplexity(model, text, tokens=args.tokens, window=args.window,
                               progress=lambda d, t: progress.bar(d, t, "windows"))
    recorded = _recorded(model, args.eval_text) if args.eval_text else None
    if args.json:
        print(json.dumps({"bundle": str(args.bundle), "plan": model.plan, **result.to_dict(),
                          **({"recorded_at_export": recorded} if recorded else {})}))
    else:
        print(f"perplexity {result.perplexity:.3f} ({model.plan} plan) over {result.tokens} tokens "
              f"({result.windows} windows of {result.window})")
        if recorded:
            print(f"recorded at export: {recorded.get('quantized')} over {recorded.get('tokens')} tokens "
                  f"(float model {recorded.get('float')}, {recorded.get('change_percent'):+}%)")
    return 0


def _recorded(model, text: str) -> dict | None:
    """What the export measured on ``text`` for this plan's linears (the split plan runs the fused
    plan's quantized linears, so it reads the fused record)."""
    acc = model.bundle.manifest.quantization.get("accuracy") or {}
    r = (acc.get("cpu" if model.plan == "cpu" else "fused") or {}).get(text)
    return r if r and "quantized" in r else None


if __name__ == "__main__":
    sys.exit(main())
