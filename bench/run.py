"""edge-bench core: our bundles (every prefill plan they hold) and the peers, measured the same way.

Runs on a board too: numpy + onnxruntime + stdlib here. Every (system, prompt length) is measured
in its own child process (``edge.bench`` has the protocol), so peak memory is that system's alone
and a crashing or missing peer costs only its own row. The peers (llama.cpp through
llama-cpp-python, optimum's ORTModelForCausalLM, onnxruntime-genai int8 and int4) live in
``edge.bench.peers`` and are started as child processes, never imported here (ORT-GenAI's with the
python of its own environment: ``System.params["python"]``); a missing one is reported as skipped
with the reason.

Prompts: the first N tokens of ``edge.runtime.perplexity.default_text()`` (real English prose and code)
under the first bundle's tokenizer; every system gets the same token ids (the peers must have the
same vocabulary: checked by size in their workers).
"""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

import edge
from edge.bench.worker import SCHEMA, Skip, folder_size, lookup_config, rss_mib, time_generation, worker_main

PEERS = ("llama.cpp", "optimum", "ort-genai")
PEER_MODULE = "edge.bench.peers"
IMPORT_ROOT = Path(edge.__file__).resolve().parents[1]  # the folder holding the edge package (checkout or site-packages)


@dataclass
class System:
    name: str                   # unique label in tables, plots and JSON
    kind: str                   # "edge" | "llama.cpp" | "optimum" | "ort-genai"
    module: str                 # worker module
    params: dict[str, Any]
    size_bytes: int | None = None
    files: str | None = None    # what the size counts
    skip: str | None = None     # known before running: reason
    skip_status: str = "skipped"  # or "failed" (set-up broke)
    version: str | None = None
    runs: dict[int, list[dict]] = field(default_factory=dict)  # prompt tokens -> child results


@dataclass
class BenchOptions:
    prompt_tokens: tuple[int, ...] = (128, 512)
    new_tokens: int = 64
    repeat: int = 3
    rounds: int = 1             # children per (system, length), interleaved across systems
    warmup: int = 1
    threads: int = 2
    compare: tuple[str, ...] = ()
    plans: tuple[str, ...] | None = None  # None = every plan each bundle has
    accelerator: str = "auto"   # split plans: the accelerator lane (edge.runtime.lanes)
    gguf: str | None = None
    hf: str | None = None
    cache_dir: str = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-bench")
    ort_genai_python: str | None = None  # an interpreter with onnxruntime-genai (default: its venv in cache_dir)
    timeout_s: float = 900.0
    lookup: int | None = None  # CPU plans: a second row with prompt lookup decoding (None: the runtime's default)
    trace_dir: str | None = None  # where split plans leave their prefill traces (Chrome JSON)


# ------------------------------------------------------------------------------------------ prompts
def prompt_ids(tokenizer_json: Path, n_max: int) -> list[int]:
    """The first ``n_max`` token ids of the default text."""
    from edge.runtime.perplexity import default_text
    from edge.runtime.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_json, None)
    text = default_text()
    chars = 8 * n_max + 64
    while True:
        ids = tok.encode(text[:chars])
        if len(ids) > n_max or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_max:
        raise ValueError(f"the default text gives only {len(ids)} tokens, fewer than {n_max}")
    return list(ids[:n_max])


# ------------------------------------------------------------------------------------------ systems
def edge_systems(bundle: str, opts: BenchOptions) -> tuple[list[System], Any]:
    """Each plan of the bundle; a CPU plan also with prompt lookup decoding (a row of its own: its
    speed depends on how much the text repeats itself, the one-token row's does not)."""
    from edge.runtime.bundle import open_bundle
    from edge.runtime.lookup import default_lookup

    b = open_bundle(Path(bundle), verify_hashes=False)
    m = b.manifest
    stem = Path(bundle).resolve().name
    size = folder_size(b.path)
    systems = []
    for plan in m.plans.names:
        if opts.plans is not None and plan not in opts.plans:
            continue
        s = System(f"edge {stem} {plan}", "edge", "edge.bench.run",
                   {"bundle": str(b.path), "plan": plan, "accelerator": opts.accelerator,
                    "max_context": m.max_context, "quantization": m.quantization},
                   size, f"bundle folder {b.path}")
        if plan not in ("cpu", "fused", "split"):
            s.skip = f"plan {plan!r} is recorded in the bundle but this runtime cannot run it"
        systems.append(s)
        lookup = default_lookup(m.plans.cpu.linears) if opts.lookup is None and plan == "cpu" else opts.lookup
        if plan == "cpu" and lookup:
            systems.append(lookup_twin(s, lookup))
    return systems, m


def lookup_twin(s: System, draft_tokens: int) -> System:
    """``s`` once more with prompt lookup decoding of ``draft_tokens`` (its own row, nothing measured yet)."""
    return replace(s, name=f"{s.name} +lookup{draft_tokens}", params={**s.params, "lookup": draft_tokens}, runs={})


def peer_systems(manifest: Any, opts: BenchOptions) -> list[System]:
    from edge.runtime.lookup import LOOKUP_TOKENS

    lookup = LOOKUP_TOKENS if opts.lookup is None else opts.lookup  # the peers' own lookup rows
    src = manifest.source if manifest is not None else {}
    src_path = src.get("path") if isinstance(src, dict) else None
    out = []
    for peer in opts.compare:
        if peer == "llama.cpp":
            gguf = opts.gguf or (src_path if src.get("kind") == "gguf" else None)
            s = System("llama.cpp", peer, PEER_MODULE, {"gguf": gguf})
            if not gguf:
                s.skip = f"no GGUF file: the bundle was exported from a {src.get('kind', 'unknown')} source; pass --gguf FILE"
            elif not Path(gguf).is_file():
                s.skip = f"GGUF file {gguf} not found (pass --gguf FILE)"
            else:
                s.size_bytes, s.files = folder_size(gguf), f"GGUF file {gguf}"
                s.name = f"llama.cpp {Path(gguf).stem.rsplit('.', 1)[-1]}" if "." in Path(gguf).stem else "llama.cpp"
            if lookup:  # the same prompt lookup decoding on llama.cpp's kernels: its own row
                out.append(s)
                s = lookup_twin(s, lookup)
        elif peer == "optimum":
            source = opts.hf or src_path
            s = System("optimum fp32", peer, PEER_MODULE, {"source": source, "cache_dir": opts.cache_dir})
            if not source or not Path(source).exists():
                s.skip = f"no source model ({source!r}) for optimum's export; pass --hf FOLDER"
        elif peer == "ort-genai":  # two systems: its builder's int8 and int4 models
            source = opts.hf or src_path
            for precision in ("int8", "int4"):
                s = System(f"ort-genai {precision}", peer, PEER_MODULE,
                           {"source": source, "cache_dir": opts.cache_dir, "precision": precision,
                            **({"python": opts.ort_genai_python} if opts.ort_genai_python else {})})
                if not source or not Path(source).exists():
                    s.skip = f"no source model ({source!r}) for ORT-GenAI's model builder; pass --hf FOLDER"
                out.append(s)
                if lookup:  # its own n-gram speculative decoding
                    out.append(lookup_twin(s, lookup))
            continue
        else:
            raise ValueError(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------ children
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(IMPORT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(var, None)
    return env


def run_child(system: System, ids: list[int], opts: BenchOptions, log: Callable[[str], None],
              action: str = "--worker") -> dict:
    """One child process: ``--worker`` measures ``system`` on ``ids``; ``--prepare`` sets a peer up."""
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        spec = {**system.params, "kind": system.kind, "prompt_ids": ids, "new_tokens": opts.new_tokens,
                "repeat": opts.repeat, "warmup": opts.warmup, "threads": opts.threads,
                "result": os.path.join(tmp, "result.json"), "trace": None}
        if system.kind == "edge" and system.params["plan"] == "split" and opts.trace_dir:
            safe = system.name.replace(" ", "_").replace("/", "_")
            spec["trace"] = str(Path(opts.trace_dir) / f"trace_{safe}_{len(ids)}.json")
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        t0 = time.perf_counter()
        try:
            # a peer with its own environment measures with its python; set-up runs in this one
            python = system.params.get("python") if action == "--worker" else None
            r = subprocess.run([python or sys.executable, "-m", system.module, action, spec_path], env=_child_env(),
                               capture_output=True, text=True, timeout=opts.timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {opts.timeout_s:.0f} s"}
        try:
            with open(spec["result"], encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, ValueError):
            tail = (r.stderr or r.stdout or "").strip().splitlines()[-3:]
            result = {"status": "failed", "reason": f"worker exited {r.returncode} without a result: " + " | ".join(tail)}
        if result["status"] == "failed" and r.stderr:
            result["stderr_tail"] = r.stderr[-1500:]
        what = f"{len(ids):>5} tok" if action == "--worker" else "prepare "
        log(f"  {system.name:<34} {what}  {result['status']:<7} ({time.perf_counter() - t0:.1f} s)"
            + (f": {result.get('reason')}" if result["status"] != "ok" else ""))
        return result


def run_bench(bundles: list[str], opts: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Measure every bundle (each plan) and the peers; the report dict (see edge.bench.report)."""
    from edge.bench.report import summarize

    if not bundles:
        raise ValueError("give at least one bundle")
    systems, first_manifest = [], None
    for b in bundles:
        s, m = edge_systems(b, opts)
        first_manifest = first_manifest or (m, b)
        systems += s
    m0, b0 = first_manifest
    systems += peer_systems(m0, opts)
    tok_file = Path(b0) / m0.tokenizer["file"]
    all_ids = prompt_ids(tok_file, max(opts.prompt_tokens))
    for s in systems:
        if s.kind in PEERS and not s.skip:
            res = run_child(s, [], opts, log, action="--prepare")
            if res["status"] != "ok":
                s.skip, s.skip_status = res.get("reason") or "no reason given", res["status"]
                continue
            s.params.update(res.get("params", {}))
            s.size_bytes, s.files, s.version = res.get("size_bytes"), res.get("files"), res.get("version")
            s.params.setdefault("n_ctx", m0.max_context)
    load = {"start": _loadavg()}
    t_start = time.time()
    for rnd in range(opts.rounds):
        log(f"round {rnd + 1}/{opts.rounds}")
        for n in opts.prompt_tokens:
            ids = all_ids[:n]
            for s in systems:
                if s.skip:
                    continue
                ctx = s.params.get("max_context")
                if ctx is not None and n + opts.new_tokens > ctx:
                    res = {"status": "skipped", "reason": f"{n} + {opts.new_tokens} tokens exceed the bundle's context {ctx}"}
                else:
                    res = run_child(s, ids, opts, log)
                s.runs.setdefault(n, []).append(res)
    load["end"] = _loadavg()
    meta = {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.time() - t_start, 1),
        "machine": machine_info(),
        "load_average": load,
        "onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "threads": opts.threads, "prompt_tokens": list(opts.prompt_tokens), "new_tokens": opts.new_tokens,
        "repeat": opts.repeat, "rounds": opts.rounds, "warmup": opts.warmup,
        "prompt_source": "edge.runtime.perplexity.default_text() (pydoc topics), first N tokens, tokenizer of "
                         f"{Path(b0).name}",
        "timing": "TTFT = token ids in -> first greedy token (embed + prefill + argmax); prefill tok/s = N / TTFT; "
                  "decode tok/s = new_tokens greedy steps / their time; peak RSS = child's VmHWM; "
                  "medians over rounds x repeat runs, min/max beside them",
    }
    return summarize(systems, meta, opts)


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine makes the figures noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "memory_gib": mem and round(mem, 1),
            "system": f"{platform.system()} {platform.release()}"}


# ------------------------------------------------------------------------------------------ edge worker
def measure_edge(spec: dict) -> dict:
    from edge.runtime.model import Model

    threads = int(spec["threads"])
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"plan": spec["plan"]}
    if spec["plan"] == "split":
        # split: two lanes sharing the same cores, so each gets half (at least one thread)
        kwargs.update(accelerator=spec.get("accelerator", "auto"), lane_threads=max(1, threads // 2))
    if "plan" not in inspect.signature(Model.__init__).parameters:
        raise Skip(f"this runtime's Model cannot select plan {spec['plan']!r}")
    lookup = int(spec.get("lookup") or 0)
    if lookup:
        if "lookup" not in inspect.signature(Model.__init__).parameters:
            raise Skip("this runtime has no prompt lookup decoding")
        kwargs["lookup"] = lookup
    model = Model.load(spec["bundle"], threads=threads, verify_hashes=False, **kwargs)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mib()
    state: dict[str, Any] = {}
    generate, stats = None, None
    if lookup:
        from edge.runtime.lookup import LookupStats, lookup_decode

        stats = LookupStats()

        def generate(logits, n):
            return list(lookup_decode(model, logits, state["cache"], spec["prompt_ids"], n + 1, (), lookup, stats))

    def reset():
        state["cache"] = model.new_cache()

    def prefill(ids):
        return model.prefill(model.embed(ids), state["cache"])

    def decode(tok):
        return model.decode_step(tok, state["cache"])

    out = time_generation(prefill, decode, reset, spec["prompt_ids"], spec["new_tokens"], spec["repeat"],
                          spec["warmup"], generate)
    split = getattr(model, "split_prefill", None)
    trace = getattr(split, "last_trace", None)
    if trace is not None and spec.get("trace"):
        trace.save(spec["trace"])
        out["trace"] = spec["trace"]
        out["trace_stats"] = trace.stats()
    lanes = getattr(split, "lanes", None)
    out["config"] = {"plan": spec["plan"], "threads": threads, **({"lanes": {k: f"{v.device.provider} x{v.threads}"
                                                                            for k, v in lanes.items()}} if lanes else {})}
    if stats is not None:  # over warm-up and timed runs
        out["config"]["lookup"] = lookup_config(stats, lookup, spec["warmup"] + spec["repeat"])
    out.update(load_s=load_s, rss_after_load_mib=rss_loaded, version=f"onnxruntime {ort.__version__}")
    return out


if __name__ == "__main__":
    sys.exit(worker_main(measure_edge))
