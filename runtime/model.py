"""The Python API: ``Model.load(bundle).generate(prompt)`` / ``.stream(prompt)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnxruntime as ort

from edge.budget import check_threads
from edge.errors import BundleError, PromptError

from edge.runtime.bundle import Bundle, check_session_io, open_bundle
from edge.runtime.kv_cache import KVCache
from edge.runtime.sampling import Sampler, SamplingParams
from edge.runtime.shared_weights import SharedWeights, trim_heap
from edge.runtime.tokenizer import Tokenizer, check_text


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = check_threads(threads, "threads")  # 0 = onnxruntime's default
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class Model:
    def __init__(self, bundle: Bundle, threads: int = 0, plan: str | None = None, accelerator: str = "auto",
                 lane_threads: int = 1, share_weights: bool = True):
        """``plan``: prefill plan, "fused" (one graph per chunk) or "split" (per-layer subgraphs on a
        CPU lane and an accelerator lane, out of order); None = the bundle's default (fused).
        ``accelerator`` (split only): "auto" | "none" | a name from edge.runtime.lanes.list_devices();
        ``lane_threads``: onnxruntime threads of each CPU-backed lane. ``share_weights``: the embed,
        prefill and decode sessions read one memory map of the weights (runtime/shared_weights.py)
        instead of a copy each."""
        self.bundle = bundle
        m = bundle.manifest
        self.plan = plan or m.plans.default
        if self.plan not in m.plans.names:
            raise BundleError(f"{bundle.path}: no prefill plan {self.plan!r} in this bundle (has {', '.join(m.plans.names)})")
        self.config, self.chunk_length, self.max_context = m.model, m.chunk_length, m.max_context
        self.tokenizer = Tokenizer(bundle.file(m.tokenizer["file"]), m.tokenizer.get("chat_template"),
                                   manifest={"model": m.model.to_dict(), "tokenizer": m.tokenizer})
        so = session_options(threads)
        self.shared_weights = SharedWeights(bundle.path) if share_weights else None
        self.sessions: dict[str, ort.InferenceSession] = {}
        for role in ("embed", "decode") + (("prefill",) if self.plan == "fused" else ()):
            spec = m.graphs[role]
            path = bundle.file(spec.file)
            role_so = self.shared_weights.session_options(path, so) if self.shared_weights else so
            try:
                sess = ort.InferenceSession(str(path), role_so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own types; name the file
                raise BundleError(f"{path}: onnxruntime cannot load this graph ({e})") from None
            check_session_io(sess, spec, str(path))
            self.sessions[role] = sess
        # what the fused prefill graph takes (older bundles: the whole static cache, logits for every row)
        prefill_in = {t.name: t.shape for t in m.graphs["prefill"].inputs}
        self._prefill_prefix_rows = isinstance(prefill_in.get("past_key_0", (0,))[0], str)
        self._prefill_logits_rows = "logits_rows" in prefill_in
        self.vision = None  # multimodal bundles: the vision encoder (runtime/vision.py)
        if m.vision is not None:
            from edge.runtime.vision import VisionEncoder

            self.vision = VisionEncoder(bundle, m, so)
        self.split = None
        if self.plan == "split":
            from edge.runtime.lanes import make_lanes
            from edge.runtime.split_prefill import SplitPrefill

            self.split = SplitPrefill(bundle, make_lanes(accelerator, lane_threads, lane_threads, self.shared_weights))
        trim_heap()  # what building the sessions freed

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int = 0, verify_hashes: bool = True, **kwargs) -> "Model":
        """Open and verify a bundle (checksums unless ``verify_hashes=False``) and create sessions;
        ``kwargs``: plan, accelerator, lane_threads (see ``Model``)."""
        return cls(open_bundle(Path(path), verify_hashes=verify_hashes), threads=threads, **kwargs)

    # ---------------------------------------------------------------- building blocks
    def new_cache(self) -> KVCache:
        return KVCache(self.config, self.max_context)

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)[None, :]
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            raise PromptError(f"token ids must be in [0, {self.config.vocab_size}), got {arr.min()}..{arr.max()}")
        return self.sessions["embed"].run(None, {"input_ids": arr})[0]

    def prefill(self, embeds: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run the prompt's embeddings [1, n, H] through fixed-size chunks from ``cache.length``.

        The last chunk is zero-padded; padding sits after every real token, so the causal mask
        already hides it from them, and only real rows are written to the cache.
        Returns logits [n, V] (all_logits) or [V] for the last token.
        """
        n = embeds.shape[1]
        start = cache.length
        if start + n > self.max_context:
            raise PromptError(f"{start + n} tokens do not fit in the context of {self.max_context}")
        if self.split is not None:
            return self.split.prefill(embeds, cache, all_logits)
        C = self.chunk_length
        sess = self.sessions["prefill"]
        outs_all = []
        names = [o.name for o in sess.get_outputs()]
        for off in range(0, n, C):
            count = min(C, n - off)
            chunk = np.zeros((1, C, embeds.shape[2]), np.float32)
            chunk[0, :count] = embeds[0, off:off + count]
            pos = start + off
            last = off + count == n
            # only the logit rows someone reads: none before the last chunk
            feeds = self.chunk_feeds(chunk, pos, cache, range(count) if all_logits else [count - 1] if last else [])
            result = dict(zip(names, sess.run(names, feeds)))
            cache.write(pos, count, result)
            logits = result["logits"][0] if self._prefill_logits_rows else result["logits"][0, :count]
            if all_logits or last:
                outs_all.append(logits if all_logits else logits[-1:])
        return np.concatenate(outs_all, 0) if all_logits else outs_all[-1][0]

    def chunk_feeds(self, chunk: np.ndarray, pos: int, cache: KVCache, logit_rows: Sequence[int]) -> dict[str, np.ndarray]:
        """The fused prefill graph's inputs for one chunk [1, C, H] at ``pos`` (``logit_rows``: the
        rows whose logits are computed, where the graph takes them; older graphs compute all)."""
        feeds = {"inputs_embeds": chunk, "start": np.array([pos], np.int64),
                 **cache.feeds(pos if self._prefill_prefix_rows else None)}
        if self._prefill_logits_rows:
            feeds["logits_rows"] = np.array(logit_rows, np.int64)
        return feeds

    def decode_step(self, token: int, cache: KVCache) -> np.ndarray:
        pos = cache.length
        if pos >= self.max_context:
            raise PromptError(f"context of {self.max_context} tokens is full")
        if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or not 0 <= token < self.config.vocab_size:
            raise PromptError(f"token id must be an integer in [0, {self.config.vocab_size}), got {token!r}")
        sess = self.sessions["decode"]
        feeds = {"input_ids": np.array([[token]], np.int64), "start": np.array([pos], np.int64), **cache.feeds(pos)}
        names = [o.name for o in sess.get_outputs()]
        result = dict(zip(names, sess.run(names, feeds)))
        cache.write(pos, 1, result)
        return result["logits"][0, 0]

    # ---------------------------------------------------------------- text in, text out
    def encode_prompt(self, prompt: str, raw: bool = False) -> list[int]:
        """Token ids for a prompt, wrapped in the bundle's chat template unless ``raw``.

        In the template, text that spells a control token (``<|im_end|>``) stays plain text: user
        text cannot end its turn or open a system turn. ``raw=True`` sends the text as the model's
        whole input, control tokens included (for evaluation or a caller's own template).
        Refused with PromptError: a non-str, an empty prompt, invalid Unicode (lone surrogates), and a
        prompt that does not leave room for one new token in the context (checked on the length
        first, so an enormous prompt is refused without being tokenized)."""
        check_text(prompt)
        if not prompt:
            raise PromptError("prompt is empty")
        if len(prompt) > self.tokenizer.max_token_chars * self.max_context:
            raise PromptError(
                f"prompt of {len(prompt)} characters cannot fit in the bundle's context of {self.max_context} "
                f"tokens (at most {self.max_context - 1} prompt tokens); shorten the prompt or export with a larger --context")
        if raw:
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        if not ids:
            raise PromptError("prompt is empty (no tokens)")
        if len(ids) >= self.max_context:
            raise PromptError(
                f"prompt has {len(ids)} tokens but the bundle's context holds {self.max_context} "
                f"(at most {self.max_context - 1} prompt tokens); shorten the prompt or export with a larger --context")
        return ids

    def prepare_prompt(self, prompt: str, raw: bool = False, images=None) -> tuple[list[int], np.ndarray | None]:
        """(prompt ids, prompt embeddings or None): text-only bundles take ``encode_prompt``; vision
        bundles lay out image tokens and merge image embeddings (runtime/vision.py)."""
        if self.vision is None and (images is None or (isinstance(images, (list, tuple)) and not images)):
            return self.encode_prompt(prompt, raw=raw), None
        from edge.runtime.vision import prepare_prompt

        return prepare_prompt(self, prompt, images, raw)

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 256,
                     sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
                     cache: KVCache | None = None, embeds: np.ndarray | None = None) -> Iterator[int]:
        """Yield generated token ids (stop token excluded). Stops at a stop id, the token budget
        or a full context: ``max_new_tokens`` beyond the context is clamped, at most
        ``max_context - len(prompt_ids) + 1`` tokens come out (the last one is never fed back)."""
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise PromptError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if len(prompt_ids) == 0:
            raise PromptError("prompt is empty (no token ids)")
        if not isinstance(sampling, SamplingParams):
            raise PromptError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        stop = set(self.config.eos_token_ids if stop_ids is None else stop_ids)
        cache = cache or self.new_cache()
        sample = Sampler(sampling)
        # embeds: the prompt's embeddings when they are not just its tokens' (images merged in)
        logits = self.prefill(self.embed(prompt_ids) if embeds is None else embeds, cache)
        for i in range(max_new_tokens):
            token = sample(logits)
            if token in stop:
                return
            yield token
            if i + 1 == max_new_tokens or cache.length >= self.max_context:
                return
            logits = self.decode_step(token, cache)

    def stream(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, raw: bool = False, images=None) -> Iterator[str]:
        """Yield text pieces as tokens are generated. ``images`` (vision bundles): paths, bytes, uint8
        numpy arrays or PIL images; ``<image>`` in the prompt marks where each goes (default: first)."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        ids, embeds = self.prepare_prompt(prompt, raw=raw, images=images)
        decoder = self.tokenizer.stream_decoder()
        for token in self.generate_ids(ids, max_new_tokens, params, embeds=embeds):
            piece = decoder.push(token)
            if piece:
                yield piece
        if tail := decoder.flush():  # a trailing partial character: U+FFFD, as decode() renders it
            yield tail

    def generate(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, raw: bool = False, images=None) -> str:
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, raw, images))
