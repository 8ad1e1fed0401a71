"""edge-run BUNDLE --prompt TEXT: generate text from a bundle, streaming tokens as they come."""

from __future__ import annotations

import argparse
import sys
import time

from edge.errors import EdgeError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-run", description="Generate text with an edge bundle.")
    p.add_argument("bundle", help="bundle folder written by edge-export")
    p.add_argument("--prompt", required=True, help="prompt text (wrapped in the chat template unless --raw)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = default)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks at load (sizes still checked)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .model import Model
    from .sampling import SamplingParams

    try:
        t0 = time.perf_counter()
        model = Model.load(args.bundle, threads=args.threads, verify_hashes=not args.no_verify)
        t_load = time.perf_counter() - t0
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        ids = model.encode_prompt(args.prompt, raw=args.raw)
        decoder = model.tokenizer.stream_decoder()
        t1 = time.perf_counter()
        first = None
        n = 0
        for token in model.generate_ids(ids, args.max_new_tokens, params):
            first = first or time.perf_counter()
            n += 1
            piece = decoder.push(token)
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        t2 = time.perf_counter()
    except EdgeError as e:
        print(f"edge-run: error: {e}", file=sys.stderr)
        return 1
    if args.stats:
        ttft = (first or t2) - t1
        decode_tps = (n - 1) / (t2 - first) if first and n > 1 else 0.0
        print(f"load {t_load:.2f}s | prompt {len(ids)} tokens, first token after {ttft * 1e3:.0f} ms "
              f"({len(ids) / ttft:.0f} tok/s) | {n} new tokens, decode {decode_tps:.1f} tok/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
