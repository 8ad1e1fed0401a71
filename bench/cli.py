"""edge-bench BUNDLE [BUNDLE ...]: speed and memory of bundles (each prefill plan) beside llama.cpp,
optimum and onnxruntime-genai, measured in one run with the same prompts and thread count."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edge.budget import max_threads
from edge.cli_errors import add_debug_flag, bounded_int, cli_boundary, check_writable
from edge.errors import EdgeError


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from edge.bench.run import PEERS, BenchOptions
    from edge.runtime.lookup import LOOKUP_MAX

    d = BenchOptions()
    p = argparse.ArgumentParser(prog="edge-bench", description=__doc__,
                                epilog="Peers need the bench extra: pip install 'edge[bench]' (llama-cpp-python "
                                       "builds from source); ort-genai makes its own environment in the cache dir "
                                       "(it needs a newer transformers than optimum). A peer that cannot run is "
                                       "reported as skipped.")
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders (edge-export output)")
    p.add_argument("--prompt-tokens", type=_ints, default=d.prompt_tokens, help="prompt lengths, e.g. 128,512,1024")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="decode steps per run (default %(default)s)")
    p.add_argument("--repeat", type=_positive, default=d.repeat, help="timed runs per child process (default %(default)s)")
    p.add_argument("--rounds", type=_positive, default=d.rounds,
                   help="child processes per system and length, interleaved across systems (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed runs per child (default %(default)s)")
    p.add_argument("--threads", type=bounded_int(1, max_threads, " (4 per CPU core)"), default=d.threads,
                   help="threads of every system (default %(default)s)")
    p.add_argument("--compare", type=_names, default=(), help=f"peers, comma-separated: {','.join(PEERS)}")
    p.add_argument("--plans", type=_names, default=None, help="bundle plans to measure (default: every plan a bundle has)")
    p.add_argument("--lookup", type=bounded_int(0, LOOKUP_MAX), default=None, metavar="N",
                   help="CPU plans: also measure greedy prompt lookup decoding with N draft tokens per call, as a row "
                        "of its own (default: the runtime's choice per bundle, 4 for quantized linears; 0 = no such row)")
    p.add_argument("--accelerator", default=d.accelerator, help="split plans: accelerator lane (auto|none|NAME)")
    p.add_argument("--gguf", help="GGUF file for llama.cpp (default: the bundle's source, when it is a GGUF)")
    p.add_argument("--hf", help="source for optimum's export and ORT-GenAI's builder: HF folder or GGUF "
                                "(default: the bundle's source)")
    p.add_argument("--cache-dir", default=d.cache_dir,
                   help="where the peers' exports and ORT-GenAI's environment and models are kept (default %(default)s)")
    p.add_argument("--ort-genai-python", metavar="PYTHON",
                   help="an interpreter with onnxruntime-genai and a transformers its builder imports "
                        "(default: a virtual environment made once in the cache dir)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per child process")
    p.add_argument("--json", dest="json_path", help="write the report as JSON here")
    p.add_argument("--plot", help="write the plot PNG here (+ a Gantt chart per traced split plan beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_debug_flag(p)
    return p


@cli_boundary("edge-bench")
def main(argv: list[str] | None = None) -> int:
    from edge.bench.run import PEERS, BenchOptions, run_bench
    from edge.bench.report import plot, table

    args = build_parser().parse_args(argv)
    unknown = [c for c in args.compare if c not in PEERS]
    if unknown:
        print(f"edge-bench: error: unknown peer(s) {', '.join(unknown)} (known: {', '.join(PEERS)})", file=sys.stderr)
        return 2
    if args.new_tokens < 0 or args.warmup < 0:
        print("edge-bench: error: --new-tokens and --warmup must be >= 0", file=sys.stderr)
        return 2
    for flag, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path:
            check_writable(path, flag, make_parents=True)  # before minutes of measuring
    trace_dir = Path(args.plot).parent if args.plot else Path(tempfile.mkdtemp(prefix="edge-bench-traces-"))
    opts = BenchOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeat=args.repeat,
                        rounds=args.rounds, warmup=args.warmup, threads=args.threads, compare=args.compare,
                        plans=args.plans, lookup=args.lookup, accelerator=args.accelerator, gguf=args.gguf, hf=args.hf,
                        cache_dir=args.cache_dir, ort_genai_python=args.ort_genai_python, timeout_s=args.timeout,
                        trace_dir=str(trace_dir))

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        report = run_bench(args.bundles, opts, log)
    except (EdgeError, ValueError, OSError) as e:
        print(f"edge-bench: error: {e}", file=sys.stderr)
        return 1
    if args.plot:
        try:
            report["meta"]["plots"] = [str(p) for p in plot(report, args.plot)]
        except RuntimeError as e:
            print(f"edge-bench: warning: {e}", file=sys.stderr)
    print(table(report))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=1), encoding="utf-8")
        log(f"wrote {args.json_path}")
    for p in report["meta"].get("plots", []):
        log(f"wrote {p}")
    measured = any(r["status"] == "ok" for s in report["systems"] if s["kind"] == "edge" for r in s["results"])
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
