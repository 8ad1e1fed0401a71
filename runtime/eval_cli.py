"""edge-eval BUNDLE --perplexity: accuracy of a bundle on real text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.budget import MAX_CONTEXT, max_threads
from edge.cli_errors import UsageError, add_debug_flag, bounded_int, cli_boundary
from edge.errors import EdgeError
from edge.progress import Progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-eval", description="Measure a bundle's accuracy.")
    p.add_argument("bundle")
    p.add_argument("--perplexity", action="store_true", required=True, help="perplexity over a text")
    p.add_argument("--text", type=Path, default=None,
                   help="UTF-8 text file (default: Python's pydoc_data.topics text)")
    p.add_argument("--heldout", action="store_true",
                   help="the held-out second half of the default text: what edge-export's accuracy report "
                        "measured (use --tokens as recorded in the manifest, 8192 by default)")
    p.add_argument("--licenses", action="store_true",
                   help="the license texts of the export's accuracy report (GPL-3 + Apache-2.0 + MPL-2.0 from "
                        "/usr/share/common-licenses): a domain the calibration never saw")
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
    from edge.runtime.perplexity import bundle_perplexity, default_text, heldout_text, license_text

    progress = Progress(enabled=not args.json)
    if args.heldout + args.licenses + (args.text is not None) > 1:
        raise UsageError("--heldout, --licenses and --text name different texts; give one")
    if args.text is None:
        text = heldout_text() if args.heldout else license_text() if args.licenses else default_text()
    else:
        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeError(f"{args.text}: cannot read as UTF-8 text ({e})") from None
    model = Model.load(args.bundle, threads=args.threads, plan=args.plan)
    result = bundle_perplexity(model, text, tokens=args.tokens, window=args.window,
                               progress=lambda d, t: progress.bar(d, t, "windows"))
    recorded = _recorded(model, "licenses" if args.licenses else "pydoc-heldout") if args.heldout or args.licenses else None
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
    """What the export measured for this plan on ``text`` (the cpu plan records every text, the
    fused plan the held-out pydoc text)."""
    acc = model.bundle.manifest.quantization.get("accuracy") or {}
    if model.plan == "cpu":
        return (acc.get("cpu") or {}).get(text)
    return acc if text == "pydoc-heldout" and "float" in acc else None


if __name__ == "__main__":
    sys.exit(main())
