"""The Python API: ``Model.load(bundle).generate(prompt)`` / ``.stream(prompt)``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from edge.errors import BundleError, PromptError

from edge.runtime.bundle import Bundle, open_bundle
from edge.runtime.chunks import ChunkRunner
from edge.runtime.cpu_plan import CpuCache, CpuPlan
from edge.runtime.kv_cache import KVCache
from edge.runtime.lanes import pick_plan
from edge.runtime.lookup import LOOKUP_MAX, LookupStats, default_lookup, lookup_decode
from edge.runtime.sampling import Sampler, SamplingParams
from edge.runtime.sessions import open_session, qdq_unfused, session_options, unfuse_int8
from edge.runtime.shared_weights import SharedWeights, clone_options, drop_mapped_pages, trim_heap
from edge.runtime.table_lookup import BlockTable
from edge.runtime.tokenizer import Tokenizer, check_text

if TYPE_CHECKING:
    from edge.runtime.chat import ChatSession


class Model:
    def __init__(self, bundle: Bundle, threads: int = 0, plan: str | None = None, accelerator: str = "auto",
                 lane_threads: int = 1, share_weights: bool = True, lookup: int | None = None):
        """``plan``: "cpu" (one fused-kernel graph for prompt and decode, the KV cache in place),
        "fused" (static-shape chunk graphs) or "split" (fused's per-layer subgraphs on a CPU lane and an
        accelerator lane, out of order); None = picked for the devices present (lanes.pick_plan: split
        when a real accelerator is there, else cpu, else the bundle's default).
        ``accelerator``: "auto" | "none" | a name from edge.runtime.lanes.list_devices();
        ``lane_threads``: onnxruntime threads of each CPU-backed lane. ``share_weights``: the embed,
        prefill and decode sessions read one memory map of the weights (runtime/shared_weights.py)
        instead of a copy each. ``lookup``: draft tokens per call of prompt lookup decoding on
        the CPU plan (runtime/lookup.py; 0 = one token per call; None = lookup.default_lookup for greedy
        decoding, none for sampled; a number: both)."""
        if lookup is not None and (not isinstance(lookup, int) or isinstance(lookup, bool) or not 0 <= lookup <= LOOKUP_MAX):
            raise ValueError(f"lookup must be an integer in [0, {LOOKUP_MAX}] (draft tokens per call), got {lookup!r}")
        self.bundle = bundle
        m = bundle.manifest
        if plan is not None and plan not in m.plans.names:
            raise BundleError(f"{bundle.path}: no prefill plan {plan!r} in this bundle (has {', '.join(m.plans.names)})")
        self.plan = plan or pick_plan(m.plans, accelerator)
        self.config, self.chunk_length, self.max_context = m.model, m.chunk_length, m.max_context
        self.tokenizer = Tokenizer(bundle.file(m.tokenizer["file"]), m.tokenizer.get("chat_template"),
                                   manifest={"model": m.model.to_dict(), "tokenizer": m.tokenizer})
        # with onnxruntime's arena (also the CPU plan: without it, glibc's heap peaked 6-23 MiB higher
        # over 1-4 prompts of 512 + 64 tokens, docs/cpu_plan.md)
        so = session_options(threads)
        self.shared_weights = SharedWeights(bundle.path) if share_weights else None
        self.sessions: dict[str, ort.InferenceSession] = {}
        # int8-GEMM graphs (static W8A8, int8dyn) on an x86 CPU whose int8 GEMM saturates: run
        # unfused, exact (sessions.py)
        self.int8_unfused = unfuse_int8(m.plans.cpu.linears if self.plan == "cpu" else m.quantization.get("prefill", "fp32"))
        graphs = {"cpu": {"embed": m.plans.cpu.embed, "cpu": m.plans.cpu.graph} if m.plans.cpu else {},
                  "fused": {"embed": "embed", "decode": "decode", "prefill": "prefill"},
                  "split": {"embed": "embed", "decode": "decode"}}[self.plan]
        # the CPU plan's 8-bit token table: rows read in numpy from the weight file (runtime/table_lookup.py)
        self.table = BlockTable.from_graph(bundle.file(m.graphs[graphs["embed"]].file), self.config.vocab_size,
                                           self.config.hidden_size) if self.plan == "cpu" else None
        for role, key in graphs.items():
            if role == "embed" and self.table is not None:
                continue
            spec = m.graphs[key]
            path = bundle.file(spec.file)
            role_so = self.shared_weights.session_options(path, so) if self.shared_weights else so
            if role in ("prefill", "cpu") and self.int8_unfused:
                role_so = qdq_unfused(clone_options(role_so) if role_so is so else role_so)
            self.sessions[role] = open_session(path, role_so, spec=spec)
        self.chunks = ChunkRunner(self.sessions["prefill"], self.chunk_length) if self.plan == "fused" else None
        self.cpu = CpuPlan(self.sessions["cpu"], self.config, self.max_context, m.plans.cpu.chunk, m.plans.cpu.kv) \
            if self.plan == "cpu" else None
        # the other plans' decode graphs take one token: a draft would cost a whole prompt chunk
        self.lookup = (default_lookup(m.plans.cpu.linears) if lookup is None else lookup) if self.cpu is not None else 0
        # sampled text keeps fewer drafts (0.92-1.28x over four prompts at T 0.7): only when asked for
        self.lookup_sampled = lookup is not None and self.lookup > 0
        self.vision = None  # multimodal bundles: the vision encoder (runtime/vision.py)
        if m.vision is not None:
            from edge.runtime.vision import VisionEncoder

            self.vision = VisionEncoder(bundle, m, so)
        self.split_prefill = None
        if self.plan == "split":
            from edge.runtime.lanes import make_lanes
            from edge.runtime.split_prefill import SplitPrefill

            self.split_prefill = SplitPrefill(bundle, make_lanes(accelerator, lane_threads, lane_threads, self.shared_weights),
                                              unfused_int8=self.int8_unfused)
        trim_heap()  # what building the sessions freed
        drop_mapped_pages([bundle.file(name) for name in m.files])  # weights onnxruntime copied but keeps mapped

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int = 0, verify_hashes: bool = True, **kwargs) -> "Model":
        """Open and verify a bundle (checksums unless ``verify_hashes=False``) and create sessions;
        ``kwargs``: plan, accelerator, lane_threads (see ``Model``)."""
        return cls(open_bundle(Path(path), verify_hashes=verify_hashes), threads=threads, **kwargs)

    # ---------------------------------------------------------------- building blocks
    def new_cache(self) -> KVCache | CpuCache:
        """A KV cache for this plan (``.length`` valid rows; lowering it rolls the cache back)."""
        return self.cpu.new_cache() if self.cpu else KVCache(self.config, self.max_context)

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)[None, :]
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            raise PromptError(f"token ids must be in [0, {self.config.vocab_size}), got {arr.min()}..{arr.max()}")
        if self.table is not None:
            return self.table(arr)
        return self.sessions["embed"].run(None, {"input_ids": arr})[0]

    def prefill(self, embeds: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run the prompt's embeddings [1, n, H] through fixed-size chunks from ``cache.length``
        (runtime/chunks.py). Returns logits [n, V] (all_logits) or [V] for the last token."""
        n = embeds.shape[1]
        if cache.length + n > self.max_context:
            raise PromptError(f"{cache.length + n} tokens do not fit in the context of {self.max_context}")
        if self.cpu is not None:
            return self.cpu.prefill(embeds, cache, all_logits)
        if self.split_prefill is not None:
            return self.split_prefill.prefill(embeds, cache, all_logits)
        # only the logit rows someone reads: none before the last chunk
        logits = [out["logits"] for _, out in self.chunks.run(embeds, cache, "all" if all_logits else "last")]
        return np.concatenate(logits, 0) if all_logits else logits[-1][0]

    def decode_step(self, token: int, cache: KVCache) -> np.ndarray:
        pos = cache.length
        if pos >= self.max_context:
            raise PromptError(f"context of {self.max_context} tokens is full")
        if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or not 0 <= token < self.config.vocab_size:
            raise PromptError(f"token id must be an integer in [0, {self.config.vocab_size}), got {token!r}")
        if self.cpu is not None:
            return self.cpu.decode_step(self.embed([token]), cache)
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

    def decodes_by_lookup(self, sampling: SamplingParams) -> bool:
        """Whether ``generate_ids`` with ``sampling`` decodes by prompt lookup (runtime/lookup.py)."""
        return bool(self.lookup) and (sampling.greedy or self.lookup_sampled)

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 256,
                     sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] | None = None,
                     cache: KVCache | None = None, embeds: np.ndarray | None = None,
                     context_ids: Sequence[int] = (), lookup_stats: LookupStats | None = None) -> Iterator[int]:
        """Yield generated token ids (stop token excluded). Stops at a stop id, the token budget
        or a full context: ``max_new_tokens`` beyond the context is clamped, at most
        ``max_context - len(prompt_ids) + 1`` tokens come out (the last one is never fed back).
        The CPU plan decodes by prompt lookup (``self.lookup``; greedy: the same tokens; sampled, where
        ``lookup`` was given: the same distribution):
        ``context_ids``, the tokens ``cache`` already holds, are searched for drafts with the prompt,
        and ``lookup_stats`` counts what it did."""
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise PromptError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if len(prompt_ids) == 0:
            raise PromptError("prompt is empty (no token ids)")
        if not isinstance(sampling, SamplingParams):
            raise PromptError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        stop = set(self.config.eos_token_ids if stop_ids is None else stop_ids)
        cache = cache if cache is not None else self.new_cache()
        sample = Sampler(sampling)
        # embeds: the prompt's embeddings when they are not just its tokens' (images merged in)
        logits = self.prefill(self.embed(prompt_ids) if embeds is None else embeds, cache)
        if self.decodes_by_lookup(sampling):
            yield from lookup_decode(self, logits, cache, [*context_ids, *prompt_ids], max_new_tokens, stop,
                                     self.lookup, lookup_stats, sample)
            return
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

    # ---------------------------------------------------------------- conversations (runtime/chat.py)
    def chat_session(self, system: str | None = None, overflow: str = "refuse") -> "ChatSession":
        """A conversation that keeps its KV cache: each follow-up turn prefills only its new tokens.
        ``overflow``: "refuse" (a full context is an error) or "drop_oldest" (oldest turns dropped)."""
        from edge.runtime.chat import ChatSession

        return ChatSession(self, system=system, overflow=overflow)

    def stream_chat(self, messages: list[dict], **options) -> Iterator[str]:
        """Answer a whole conversation (``[{"role": ..., "content": ...}, ...]``), streaming text pieces.
        ``options``: max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos."""
        from edge.runtime.chat import chat_once

        return chat_once(self, messages, **options)

    def chat(self, messages: list[dict], **options) -> str:
        return "".join(self.stream_chat(messages, **options))
