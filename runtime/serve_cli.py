"""edge-serve BUNDLE: an OpenAI-compatible HTTP server (runtime/server.py; needs ``edge[serve]``)."""

from __future__ import annotations

import argparse
import os
import sys

from edge.cli_errors import add_debug_flag, cli_boundary
from edge.errors import EdgeError
from edge.runtime.lookup import add_lookup_flag

API_KEY_ENV = "EDGE_API_KEY"


def _positive(kind: type, lo: float):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-serve", description="Serve an edge bundle over an OpenAI-compatible HTTP API.")
    p.add_argument("bundle", help="bundle folder written by edge-export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive(int, 0), default=8080, help="port (0 = any free port; default 8080)")
    p.add_argument("--parallel", type=_positive(int, 1), default=1,
                   help="answers generated at once (slots), each with its own KV cache (default 1)")
    p.add_argument("--queue", type=_positive(int, 0), default=16,
                   help="requests that may wait for a free slot; more get 429 (default 16)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})")
    p.add_argument("--max-tokens-limit", type=_positive(int, 1), default=None, metavar="N",
                   help="refuse requests asking for more than N new tokens (400; default: the bundle's context)")
    p.add_argument("--max-body-bytes", type=_positive(int, 1), default=8 << 20, metavar="N",
                   help="refuse request bodies larger than N bytes (413; default 8 MiB)")
    p.add_argument("--drain-timeout", type=_positive(float, 0), default=10.0, metavar="S",
                   help="at SIGTERM/Ctrl-C, seconds answers in flight get before they are cancelled (default 10)")
    p.add_argument("--overflow", choices=("refuse", "drop_oldest"), default="refuse",
                   help="a conversation longer than the context: refuse it (400, default) or drop its oldest turns")
    p.add_argument("--model-name", metavar="ID", default=None, help="model id to serve as (default: the bundle's folder name)")
    p.add_argument("--threads", type=_positive(int, 0), default=0, help="onnxruntime threads per session (0 = default)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks at load (sizes still checked)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    p.add_argument("--plan", choices=("cpu", "fused", "split"), default=None,
                   help="the prefill plan (default: the one the runtime picks for the devices here)")
    add_lookup_flag(p)
    add_debug_flag(p)
    return p


@cli_boundary("edge-serve")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from edge.runtime.server import ServeConfig, serve
    except ImportError as e:
        print(f"edge-serve: error: the server needs the serve extra ({e.name or e} is missing): "
              f"pip install 'edge[serve]'", file=sys.stderr)
        return 1
    from edge.runtime.model import Model

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"edge-serve: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    try:
        model = Model.load(args.bundle, threads=args.threads, verify_hashes=not args.no_verify, plan=args.plan,
                           lookup=args.lookup)
        cfg = ServeConfig(host=args.host, port=args.port, parallel=args.parallel, queue=args.queue, api_key=api_key,
                          max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                          drain_timeout=args.drain_timeout, overflow=args.overflow, model_name=args.model_name,
                          log_requests=not args.quiet)
    except EdgeError as e:
        print(f"edge-serve: error: {e}", file=sys.stderr)
        return 1
    return serve(model, cfg)


if __name__ == "__main__":
    sys.exit(main())
