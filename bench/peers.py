"""The runtimes edge-bench compares against, each measured in its own child process with the
protocol of ``edge.bench`` (same token ids, same thread count, greedy, empty cache per run):

- ``llama.cpp``: llama-cpp-python on the GGUF file itself (its own quantized kernels);
- ``optimum``: ORTModelForCausalLM on the float ONNX model that optimum exports from a Hugging Face
  folder of the same weights (written from the GGUF by ``edge.export.sources.hf_writer`` when the source
  is a GGUF). The export is made once by ``--prepare`` in a separate child and kept in the cache
  dir, keyed by the source's checksum and the versions of optimum, transformers and torch.
- ``ort-genai``: onnxruntime-genai's own runtime (``og.Generator``) on the ONNX models its OWN model
  builder makes from the same HF folder, ``-p int8`` and ``-p int4`` (``-e cpu``, its defaults
  otherwise: see ``ORT_GENAI_EXTRA_OPTIONS``). See "ORT-GenAI" below for its environment.

Run by edge-bench (``edge.bench.run``) as ``python -m edge.bench.peers --prepare|--worker SPEC``.
Nothing here is imported by the runtime; the peers' packages are the ``bench`` extra.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.bench.ort_genai import ORT_GENAI_VERSION, measure_ort_genai, prepare_ort_genai  # noqa: F401
from edge.bench.peer_common import _need, _source_key, _version, hf_folder  # noqa: F401
from edge.bench.worker import Skip, folder_size, lookup_config, rss_mib, time_generation, worker_main


# ------------------------------------------------------------------------------------------ llama.cpp
def prepare_llama_cpp(spec: dict) -> dict:
    _need("llama_cpp", "llama-cpp-python")
    gguf = Path(spec["gguf"])
    if not gguf.is_file():
        raise Skip(f"GGUF file {gguf} not found")
    return {"params": {"gguf": str(gguf)}, "size_bytes": gguf.stat().st_size, "files": f"GGUF file {gguf}",
            "version": f"llama-cpp-python {_version('llama-cpp-python')}"}


def logits_row(llm, n_vocab: int, row: int = -1):
    """Row ``row`` of the logits of llama.cpp's last batch, as a view (eval() keeps no logits
    unless logits_all: read from the context)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(row), shape=(n_vocab,))


def measure_llama_cpp(spec: dict) -> dict:
    llama_cpp = _need("llama_cpp", "llama-cpp-python")
    ids = spec["prompt_ids"]
    threads = int(spec["threads"])
    n_ctx = int(spec.get("n_ctx") or 2048)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    load_s = time.perf_counter() - t0
    if llm.n_vocab() < max(ids) + 1:
        raise Skip(f"the GGUF's vocabulary ({llm.n_vocab()}) does not cover the prompt's token ids")
    rss_loaded = rss_mib()

    def reset():
        llm.reset()

    n_vocab = llm.n_vocab()

    def prefill(tokens):
        llm.eval(tokens)
        return logits_row(llm, n_vocab)

    def decode(tok):
        llm.eval([tok])
        return logits_row(llm, n_vocab)

    lookup = int(spec.get("lookup") or 0)
    generate, stats = None, None
    if lookup:  # edge's own lookup loop (same drafts, same acceptance) over llama.cpp's batched decode
        from edge.runtime.lookup import LookupStats, lookup_decode

        stats, target = LookupStats(), LlamaCppLookupTarget(llm, n_ctx, decode)

        def generate(logits, n):
            return list(lookup_decode(target, logits, target, ids, n + 1, (), lookup, stats))

    out = time_generation(prefill, decode, reset, ids, spec["new_tokens"], spec["repeat"], spec["warmup"], generate)
    out.update(load_s=load_s, rss_after_load_mib=rss_loaded,
               config={"n_ctx": n_ctx, "n_batch": llm.n_batch, "n_threads": threads, "n_threads_batch": threads},
               version=f"llama-cpp-python {_version('llama-cpp-python')}")
    if stats is not None:
        out["config"]["lookup"] = lookup_config(stats, lookup, spec["warmup"] + spec["repeat"])
    return out


class LlamaCppLookupTarget:
    """What ``edge.runtime.lookup.lookup_decode`` calls, on a llama-cpp-python ``Llama``: it is both
    the model (``run`` decodes a token and its draft in one llama.cpp batch with logits for every
    row, ``decode_step`` one token: the one-token row's ``decode``) and the cache (``length`` = the
    context's tokens; lowering it drops the rows after it before the next batch, as ``Llama.eval``
    does)."""

    def __init__(self, llm, n_ctx: int, decode):
        self.llm, self.max_context, self.cpu, self._decode = llm, n_ctx, self, decode
        self.n_vocab = llm.n_vocab()

    @property
    def length(self) -> int:
        return self.llm.n_tokens

    @length.setter
    def length(self, n: int) -> None:
        self.llm.n_tokens = n

    def embed(self, ids):
        return list(ids)

    def run(self, tokens, cache, rows):
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
        llm._batch.set_batch(batch=tokens, n_past=llm.n_tokens, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[llm.n_tokens:llm.n_tokens + len(tokens)] = tokens
        llm.n_tokens += len(tokens)
        return np.stack([logits_row(llm, self.n_vocab, int(i)) for i in rows])  # np.stack copies

    def decode_step(self, token, cache):
        return self._decode(token)


# ------------------------------------------------------------------------------------------ optimum
def prepare_optimum(spec: dict) -> dict:
    _need("optimum.onnxruntime", "optimum-onnx")
    from optimum.exporters.onnx import main_export

    source = Path(spec["source"])
    cache = Path(spec["cache_dir"]).expanduser()
    key = _source_key(source)
    out = cache / f"optimum-{source.stem}-{key}"
    done = out / "edge-bench.json"
    if not done.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        hf = hf_folder(source, cache, _source_key(source, ()))
        tmp = cache / f".tmp-optimum-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        main_export(str(hf), output=str(tmp), task="text-generation-with-past", device="cpu")
        (tmp / "edge-bench.json").write_text(json.dumps({"source": str(source), "hf_folder": str(hf),
                                                        "export_s": time.perf_counter() - t0}), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    onnx_bytes = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".onnx_data") or p.name.endswith(".onnx.data"))
    return {"params": {"onnx_dir": str(out)}, "size_bytes": onnx_bytes or folder_size(out),
            "files": f"optimum export {out} (ONNX files)", "version": _optimum_version()}


def _optimum_version() -> str:
    return (f"optimum {_version('optimum')}, optimum-onnx {_version('optimum-onnx')}, "
            f"transformers {_version('transformers')}, onnxruntime {_version('onnxruntime')}")


def measure_optimum(spec: dict) -> dict:
    _need("optimum.onnxruntime", "optimum-onnx")
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(spec["onnx_dir"], session_options=so, use_cache=True,
                                                use_io_binding=False)
    load_s = time.perf_counter() - t0
    if model.config.vocab_size < max(spec["prompt_ids"]) + 1:
        raise Skip(f"the model's vocabulary ({model.config.vocab_size}) does not cover the prompt's token ids")
    rss_loaded = rss_mib()
    state: dict[str, Any] = {}

    def reset():
        state.clear()

    @torch.inference_mode()
    def prefill(tokens):
        ids = torch.tensor([tokens], dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        state["pkv"], state["n"] = out.past_key_values, ids.shape[1]
        return out.logits[0, -1].numpy()

    @torch.inference_mode()
    def decode(tok):
        state["n"] += 1
        out = model(input_ids=torch.tensor([[tok]], dtype=torch.long),
                    attention_mask=torch.ones((1, state["n"]), dtype=torch.long),
                    past_key_values=state["pkv"], use_cache=True)
        state["pkv"] = out.past_key_values
        return out.logits[0, -1].numpy()

    out = time_generation(prefill, decode, reset, spec["prompt_ids"], spec["new_tokens"], spec["repeat"],
                          spec["warmup"])
    out.update(load_s=load_s, rss_after_load_mib=rss_loaded, version=_optimum_version(),
               config={"intra_op_num_threads": threads, "use_io_binding": False, "dtype": "float32"})
    return out


PREPARE = {"llama.cpp": prepare_llama_cpp, "optimum": prepare_optimum, "ort-genai": prepare_ort_genai}
MEASURE = {"llama.cpp": measure_llama_cpp, "optimum": measure_optimum, "ort-genai": measure_ort_genai}


def main(argv: list[str] | None = None) -> int:
    return worker_main(lambda s: MEASURE[s["kind"]](s), argv, prepare=lambda s: PREPARE[s["kind"]](s))


if __name__ == "__main__":
    sys.exit(main())
