"""onnxruntime-genai as an edge-bench peer (its own model builder and runtime, in its own venv)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge.bench.peer_common import _need, _source_key, _version, hf_folder  # noqa: F401
from edge.bench.worker import Skip, folder_size, rss_mib, time_generation  # noqa: F401


# ------------------------------------------------------------------------------------------ ORT-GenAI
# Environment. onnxruntime-genai 0.18.0 (the newest release; PyPI wheels for CPython 3.11 on
# manylinux_2_28 x86_64 and aarch64; it needs onnxruntime >= 1.31) builds with its own model
# builder, which imports classes transformers 4.57.6 lacks (Qwen3_5ForConditionalGeneration,
# Lfm2VlForConditionalGeneration, ... in builders/base.py), while optimum-onnx 0.1.0 needs
# transformers < 4.58: the two cannot share one environment. An older release was tried first:
# 0.15.2's builder does import under 4.57.6, but its `-p int8` model of a tied-embedding model
# (SmolLM2) is invalid (the embedding's Reshape reads an `lm_head.MatMul.weight_Q4` that does not
# exist; og.Model refuses to load it), and 0.16/0.17 import the same new classes as 0.18. So
# edge-bench makes ORT-GenAI its own virtual environment, once, in the cache dir: torch first (the
# local CPU wheel; any other resolution pulls GB of CUDA builds), then the pins below, with the
# onnxruntime of the environment edge-bench runs in (the same MLAS kernels as edge's). The builder
# and the measuring child run with that environment's python; the prepare child (this
# environment) writes the HF folder with edge's GGUF reader and HF writer, as for optimum
# (transformers' own GGUF conversion of SmolLM2's tokenizer is wrong). `--ort-genai-python PY`
# uses an existing interpreter instead.
ORT_GENAI_VERSION = "0.18.0"
ORT_GENAI_TORCH = "torch==2.13.0"
ORT_GENAI_PACKAGES = (f"onnxruntime-genai=={ORT_GENAI_VERSION}", "transformers==5.24.0", "onnx-ir==1.1.0",
                      "onnx==1.23.2")
ORT_GENAI_PRECISIONS = ("int8", "int4")
# The builder's defaults otherwise (`-e cpu`: MatMulNBits, block 32, symmetric, GroupQueryAttention
# with past/present sharing one buffer). accuracy_level=4 (int8 compute) is already its CPU default;
# named so a change of default does not change what is measured. Not set: prune_lm_head (the
# prompt's logits are computed for every position, as the builder makes it by default).
ORT_GENAI_EXTRA_OPTIONS = ("accuracy_level=4",)


def _run_logged(cmd: list[str], log: Path, what: str, timeout: float | None = None,
                env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` with its output in ``log``; Skip with the log's tail when it fails."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Skip(f"{what}: {e}") from None
    if r.returncode != 0:
        tail = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()][-4:]
        raise Skip(f"{what} exited {r.returncode} (log {log}): " + " | ".join(t[:300] for t in tail))


def _ort_version() -> str | None:
    return _version("onnxruntime")


def ort_genai_venv_dir(cache: Path) -> tuple[Path, list[str]]:
    """Where ORT-GenAI's environment lives under ``cache`` (named by this python's version, the
    machine and the pins) and the pins: torch first, then the others."""
    ort = _ort_version()
    pins = [ORT_GENAI_TORCH, *ORT_GENAI_PACKAGES, *([f"onnxruntime=={ort}"] if ort else [])]
    tag = hashlib.sha256(" ".join([sys.version.split()[0], os.uname().machine, *pins]).encode()).hexdigest()[:8]
    return cache / f"venv-ort-genai-{ORT_GENAI_VERSION}-{tag}", pins


def ort_genai_venv(cache: Path, make: bool = True) -> Path:
    """The python of ORT-GenAI's own environment under ``cache``, made once (a minute, ~1.3 GB)
    unless ``make`` is false (then Skip when it is not there)."""
    venv, pins = ort_genai_venv_dir(cache)
    tag = venv.name.rsplit("-", 1)[-1]
    python = venv / "bin" / "python"
    if (venv / "edge-bench.json").is_file() and python.exists():
        return python
    if not make:
        raise Skip(f"ORT-GenAI's environment {venv} is not made yet")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-venv-ort-genai-{tag}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log = cache / f"venv-ort-genai-{tag}.log"
    log.write_text("", encoding="utf-8")
    _run_logged([sys.executable, "-m", "venv", str(tmp)], log, "making ORT-GenAI's virtual environment")
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    _run_logged(pip + [ORT_GENAI_TORCH], log, f"pip install {ORT_GENAI_TORCH} (ORT-GenAI's environment)")
    _run_logged(pip + pins[1:], log, f"pip install {' '.join(pins[1:])} (ORT-GenAI's environment)")
    (tmp / "edge-bench.json").write_text(json.dumps({"packages": pins, "python": sys.version.split()[0]}),
                                         encoding="utf-8")
    log.rename(tmp / "pip.log")
    shutil.rmtree(venv, ignore_errors=True)
    tmp.rename(venv)  # a venv's python finds its site-packages next to pyvenv.cfg: renaming keeps it working
    return python


def _probe_ort_genai(python: str) -> dict:
    """The versions an interpreter has; Skip if it cannot import onnxruntime-genai or its builder."""
    probe = ("import json, onnxruntime, onnxruntime_genai, transformers;"
             "import onnxruntime_genai.models.builder;"
             "print(json.dumps({'onnxruntime_genai': onnxruntime_genai.__version__, "
             "'onnxruntime': onnxruntime.__version__, 'transformers': transformers.__version__}))")
    try:
        r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Skip(f"ORT-GenAI's python {python} cannot run: {e}") from None
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Skip(f"onnxruntime-genai or its model builder does not import in {python}: {last[0][:300]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ort_genai_version(v: dict) -> str:
    return (f"onnxruntime-genai {v.get('onnxruntime_genai')}, onnxruntime {v.get('onnxruntime')}"
            + (f", builder with transformers {v['transformers']}" if v.get("transformers") else ""))


def prepare_ort_genai(spec: dict) -> dict:
    """ORT-GenAI's model for ``spec["precision"]`` (int8 | int4), built by its own model builder
    from the HF folder of the source, once, in the cache dir (keyed by the source's checksum, the
    precision, the builder's options and the versions). ``spec["cached_only"]``: Skip instead of
    making what is not in the cache yet (the tests)."""
    precision = spec.get("precision", "int8")
    if precision not in ORT_GENAI_PRECISIONS:
        raise Skip(f"ORT-GenAI precision {precision!r} is not one of {', '.join(ORT_GENAI_PRECISIONS)}")
    source = Path(spec["source"])
    if not source.exists():
        raise Skip(f"no source model {source} for ORT-GenAI's builder; pass --hf FOLDER")
    cache = Path(spec["cache_dir"]).expanduser()
    cached_only = bool(spec.get("cached_only"))
    python = spec.get("python") or str(ort_genai_venv(cache, make=not cached_only))
    versions = _probe_ort_genai(python)
    key = _source_key(source, (precision, *ORT_GENAI_EXTRA_OPTIONS,
                               *(f"{k}={v}" for k, v in sorted(versions.items()))))
    out = cache / f"ort-genai-{precision}-{source.stem}-{key}"
    if not (out / "edge-bench.json").is_file():
        if cached_only:
            raise Skip(f"ORT-GenAI's {precision} model {out} is not built yet")
        hf = hf_folder(source, cache, _source_key(source, ()))
        tmp = cache / f".tmp-ort-genai-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log = tmp / "builder.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        for var in ("PYTHONPATH", "PYTHONHOME"):  # the builder imports its own packages only
            env.pop(var, None)
        t0 = time.perf_counter()
        _run_logged([python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp / "model"),
                     "-p", precision, "-e", "cpu", "-c", str(tmp / "builder-cache"),
                     "--extra_options", *ORT_GENAI_EXTRA_OPTIONS],
                    log, f"ORT-GenAI's model builder (-p {precision})", env=env)
        shutil.rmtree(tmp / "builder-cache", ignore_errors=True)
        if not (tmp / "model" / "genai_config.json").is_file():
            raise Skip(f"ORT-GenAI's model builder wrote no genai_config.json (log {log})")
        (tmp / "edge-bench.json").write_text(json.dumps({
            "source": str(source), "hf_folder": str(hf), "precision": precision, "python": python,
            "extra_options": list(ORT_GENAI_EXTRA_OPTIONS), "versions": versions,
            "build_s": time.perf_counter() - t0}), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    model = out / "model"
    return {"params": {"model_dir": str(model), "python": python},
            "size_bytes": folder_size(model), "files": f"ORT-GenAI model folder {model}",
            "version": _ort_genai_version(versions)}


LOOKUP_NGRAM_SIZE = 3


def measure_ort_genai(spec: dict) -> dict:
    """og.Generator on ``spec["model_dir"]``, run by ORT-GenAI's python. The prompt's ids go in with
    ``append_tokens`` and every next token is the argmax of ``get_logits()`` (as for the other
    systems); the config overlay sets the threads, the context (``search.max_length``: its KV buffer,
    one per generation, is sized by it) and an end-of-text id that is not the model's, so nothing
    stops generation early."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise Skip(f"onnxruntime-genai does not import in {sys.executable} ({e})") from None
    import numpy as np

    threads = int(spec["threads"])
    ids = spec["prompt_ids"]
    n_ctx = int(spec.get("n_ctx") or 2048)
    if len(ids) + int(spec["new_tokens"]) > n_ctx:
        raise Skip(f"{len(ids)} + {spec['new_tokens']} tokens exceed the context {n_ctx}")
    folder = Path(spec["model_dir"])
    base = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    vocab = int(base["model"]["vocab_size"])
    if vocab < max(ids) + 1:
        raise Skip(f"the model's vocabulary ({vocab}) does not cover the prompt's token ids")
    eos = base["model"].get("eos_token_id")
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    never = next(i for i in range(vocab - 1, -1, -1) if i not in eos_ids)  # the generator checks the range
    overlay = {"model": {"eos_token_id": never,
                         "decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}},
               "search": {"max_length": n_ctx, "do_sample": False}}
    t0 = time.perf_counter()
    config = og.Config(str(folder))
    config.clear_providers()  # CPU
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    lookup = int(spec.get("lookup") or 0)
    if lookup:  # its own n-gram speculative decoding; ngram_size 3 = a 2-token suffix, edge's shortest
        params.set_speculative_options(ngram_size=LOOKUP_NGRAM_SIZE, max_draft_tokens=lookup)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mib()
    state: dict[str, Any] = {}

    def reset():
        state.clear()  # the previous generator (and its KV buffer) goes first
        state["gen"] = og.Generator(model, params)

    def step(tokens):
        gen = state["gen"]
        gen.append_tokens(np.asarray(tokens, dtype=np.int32))
        if gen.is_done():
            raise RuntimeError(f"ORT-GenAI's generator stopped after {gen.token_count()} tokens")
        return gen.get_logits()

    def generate(logits, n):  # the generator's own greedy loop, which drafts and verifies inside
        gen, out = state["gen"], []
        while len(out) < n + 1:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        state["stats"] = gen.get_speculative_stats()
        return out

    out = time_generation(step, lambda tok: step([tok]), reset, ids, spec["new_tokens"], spec["repeat"],
                          spec["warmup"], generate if lookup else None)
    search = params.get_search_options()
    out.update(load_s=load_s, rss_after_load_mib=rss_loaded,
               version=_ort_genai_version({"onnxruntime_genai": og.__version__, "onnxruntime": _ort_version()}),
               config={"precision": spec.get("precision"), "intra_op_num_threads": threads,
                       "max_length": int(search.get("max_length", n_ctx)),
                       "past_present_share_buffer": bool(search.get("past_present_share_buffer")),
                       "eos_token_id": never, "builder_extra_options": list(ORT_GENAI_EXTRA_OPTIONS)})
    if lookup:
        st = state.get("stats") or {}
        out["config"]["lookup"] = {"speculative_options": params.get_speculative_options(),
                                   **{k: st.get(k) for k in ("rounds", "draft_tokens_proposed", "draft_tokens_accepted",
                                                            "target_forward_passes")}, "of": "the last run"}
    return out
