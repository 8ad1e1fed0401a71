"""edge-run BUNDLE --prompt TEXT: generate text from a bundle, streaming tokens as they come;
without --prompt (or with -i): a chat on the terminal (runtime/interactive.py)."""

from __future__ import annotations

import argparse
import sys
import time

from edge.budget import max_threads
from edge.cli_errors import add_debug_flag, bounded_int, check_writable, cli_boundary
from edge.errors import EdgeError
from edge.runtime.lookup import add_lookup_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-run", description="Generate text with an edge bundle.")
    p.add_argument("bundle", nargs="?", help="bundle folder written by edge-export")
    p.add_argument("--prompt", help="prompt text (wrapped in the chat template unless --raw); - reads it from "
                                    "standard input; without --prompt/--prompt-file, a chat")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 text file (for prompts longer "
                                                          "than the command line allows)")
    p.add_argument("-i", "--interactive", action="store_true", help="chat on the terminal (the default without --prompt)")
    p.add_argument("--system", metavar="TEXT", help="chat: the system message")
    p.add_argument("--overflow", choices=("refuse", "drop_oldest"), default="refuse",
                   help="chat: when the context is full, refuse the turn (default) or drop the oldest turns")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_lookup_flag(p)
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image for a vision bundle (repeatable); <image> in the prompt marks where each goes, "
                        "else the images come first")
    p.add_argument("--threads", type=bounded_int(0, max_threads, " (4 per CPU core)"), default=0,
                   help="onnxruntime threads (0 = default)")
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks at load (sizes still checked)")
    p.add_argument("--stats", action="store_true", help="print timing to stderr at the end")
    g = p.add_argument_group("prefill plan and devices")
    g.add_argument("--devices", action="store_true", help="list the accelerators onnxruntime offers here, and exit")
    g.add_argument("--plan", choices=("cpu", "fused", "split"), default=None,
                   help="cpu: one fused-kernel graph for prompt and decode; fused: static-shape chunk graphs; split: "
                        "fused's per-layer subgraphs on a CPU lane and an accelerator lane, out of order (default: "
                        "split where a real accelerator is present, else cpu, else the bundle's default)")
    g.add_argument("--accelerator", default="auto", metavar="NAME|none|auto",
                   help="accelerator lane of the split plan (see --devices); auto: the best real one, else a second "
                        "CPU lane; none: CPU lane only; a missing NAME is an error")
    g.add_argument("--lane-threads", type=bounded_int(1, max_threads, " (4 per CPU core)"), default=1,
                   help="onnxruntime threads of each CPU-backed lane")
    g.add_argument("--trace", metavar="FILE", help="write the prompt prefill's task trace (Chrome trace JSON; "
                   "implies --plan split)")
    g.add_argument("--gantt", metavar="PNG", help="write a Gantt chart of the prompt prefill (needs matplotlib; "
                   "implies --plan split)")
    add_debug_flag(p)
    return p


@cli_boundary("edge-run")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.devices:
        from edge.runtime.lanes import describe_devices

        print(describe_devices())
        return 0
    if not args.bundle:
        parser.error("BUNDLE is required (or --devices)")
    chat = args.interactive or (args.prompt is None and args.prompt_file is None)
    if chat and (args.prompt is not None or args.prompt_file is not None or args.raw or args.image):
        parser.error("-i (chat) takes no --prompt, --prompt-file, --raw or --image")
    if (args.trace or args.gantt) and args.plan is None:
        args.plan = "split"
    if (args.trace or args.gantt) and args.plan != "split":
        parser.error("--trace/--gantt record the split plan's tasks: use --plan split")
    from edge.runtime.prompt_input import read_prompt

    if not chat:
        args.prompt = read_prompt(args.prompt, args.prompt_file)
    for flag, path in (("--trace", args.trace), ("--gantt", args.gantt)):
        if path:
            check_writable(path, flag)  # now, not after the generation
    from edge.runtime.lookup import LookupStats
    from edge.runtime.model import Model
    from edge.runtime.sampling import SamplingParams

    try:
        t0 = time.perf_counter()
        model = Model.load(args.bundle, threads=args.threads, verify_hashes=not args.no_verify, plan=args.plan,
                           accelerator=args.accelerator, lane_threads=args.lane_threads, lookup=args.lookup)
        t_load = time.perf_counter() - t0
        if chat:
            from edge.runtime.interactive import chat_loop

            return chat_loop(model, system=args.system, overflow=args.overflow, stats=args.stats,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed)
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        lookup = LookupStats()
        t1 = time.perf_counter()  # first-token time includes image preprocessing + the vision encoder
        ids, embeds = model.prepare_prompt(args.prompt, raw=args.raw, images=args.image)
        decoder = model.tokenizer.stream_decoder()
        first = None
        n = 0
        for token in model.generate_ids(ids, args.max_new_tokens, params, embeds=embeds, lookup_stats=lookup):
            first = first or time.perf_counter()
            n += 1
            piece = decoder.push(token)
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")  # a trailing partial character, as decode() renders it
        t2 = time.perf_counter()
    except EdgeError as e:
        print(f"edge-run: error: {e}", file=sys.stderr)
        return 1
    if args.stats:
        ttft = (first or t2) - t1
        decode_tps = (n - 1) / (t2 - first) if first and n > 1 else 0.0
        # an int8-GEMM plan on a CPU whose int8 GEMM saturates runs unfused (exact, slower): say so
        plan = f"{model.plan} (int8 unfused: this CPU's int8 GEMM saturates)" if model.int8_unfused else model.plan
        print(f"plan {plan} | load {t_load:.2f}s | prompt {len(ids)} tokens, first token after {ttft * 1e3:.0f} ms "
              f"({len(ids) / ttft:.0f} tok/s) | {n} new tokens, decode {decode_tps:.1f} tok/s", file=sys.stderr)
        if model.decodes_by_lookup(params):
            print(lookup.summary(), file=sys.stderr)
    trace = model.split_prefill.last_trace if model.split_prefill is not None else None
    if trace is not None:
        if args.stats:
            print(f"split plan: {trace.summary()}", file=sys.stderr)
        if args.trace:
            trace.save(args.trace)
        if args.gantt:
            try:
                trace.gantt(args.gantt)
            except RuntimeError as e:
                print(f"edge-run: error: {e}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
