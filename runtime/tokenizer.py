"""Tokenizer + chat template, from the bundle's tokenizer.json and manifest (no transformers)."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

from tokenizers import Tokenizer as _HFTokenizer

from edge.errors import BundleError, PromptError


def _compile_template(source: str):
    """The bundle's chat template, compiled in edge's bounded sandbox (runtime/template_sandbox.py:
    attribute access as jinja2's immutable sandbox allows, and bounds on time, work and size)."""
    import jinja2

    from edge.runtime.template_sandbox import compile_template

    def raise_exception(message):
        raise PromptError(f"chat template: {message}")

    def configure(env) -> None:
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                     ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    try:
        return compile_template(source, configure)
    except jinja2.TemplateError as e:
        raise BundleError(f"chat template does not compile: {e}") from None


# Message content is rendered through the template as a placeholder first, so the template's own
# text (which may hold control tokens) and the user's text (which must not) are told apart.
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template writes them, trim/upper keep them
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# The special-token variables transformers passes to a chat template (its special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_FROM_MANIFEST = object()  # Tokenizer(special_tokens=...) default: read them from the bundle's manifest


def special_tokens_from_manifest(manifest: Mapping[str, Any], tok: _HFTokenizer) -> dict[str, str]:
    """The texts of the chat template's special variables (``bos_token``, ``eos_token``, ...), as
    transformers passes them to ``apply_chat_template``.

    From the manifest's ``tokenizer`` section where the exporter stored them as text
    (``tokenizer.special_tokens = {"bos_token": "<s>", ...}`` or ``tokenizer.bos_token``), else from
    the model's ``bos_token_id`` and first ``eos_token_ids`` entry looked up in tokenizer.json.
    A token the model does not have is left out (the template sees it undefined, as in transformers)."""
    out: dict[str, str] = {}
    model = manifest.get("model") if isinstance(manifest.get("model"), Mapping) else {}
    bos = model.get("bos_token_id")
    eos = model.get("eos_token_ids")
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    for name, tid in (("bos_token", bos), ("eos_token", eos)):
        if isinstance(tid, int) and not isinstance(tid, bool):
            text = tok.id_to_token(tid)
            if text is not None:
                out[name] = text
    section = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), Mapping) else {}
    stored = section.get("special_tokens") if isinstance(section.get("special_tokens"), Mapping) else {}
    for name in SPECIAL_TOKEN_NAMES:
        for src in (stored, section):
            if name in src and (src[name] is None or isinstance(src[name], str)):
                if src[name]:
                    out[name] = src[name]
                else:
                    out.pop(name, None)  # stored as absent: the model has no such token
                break
    return out


_BYTE_TOKEN_RE = re.compile("<0x[0-9A-Fa-f]{2}>")


def _byte_fallback(tokenizer_json: str) -> bool:
    """The model's ``byte_fallback`` flag (the tokenizers library does not expose it)."""
    try:
        model = json.loads(tokenizer_json).get("model") or {}
    except (ValueError, AttributeError):
        return False
    return bool(isinstance(model, dict) and model.get("byte_fallback"))


def _sibling_manifest(tokenizer_json: Path) -> dict[str, Any]:
    """The manifest of the bundle a tokenizer.json sits in ({} outside a bundle or if unreadable)."""
    from edge.manifest import MANIFEST_NAME

    try:
        data = json.loads((Path(tokenizer_json).parent / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_message_list(messages: Any) -> list | tuple:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    return messages


def check_role(i: int, m: Any) -> str:
    """messages[i] is a dict whose 'role' is a chat role; returns the role."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise PromptError(f"messages[{i}] must be a dict with a str 'role' and 'content'")
    if m["role"] not in CHAT_ROLES:
        raise PromptError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r:.40}")
    return m["role"]


def check_text(text: object, what: str = "prompt") -> str:
    """A str that is valid Unicode (no lone surrogates, which is how Python carries undecodable
    input bytes, e.g. from a command line with invalid UTF-8)."""
    if isinstance(text, (bytes, bytearray)):
        raise PromptError(f"{what} must be a str, got {type(text).__name__} (decode it first: data.decode('utf-8'))")
    if not isinstance(text, str):
        raise PromptError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{what} is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character "
                          f"{e.start} (input bytes that are not UTF-8?)") from None
    return text


class Tokenizer:
    def __init__(self, tokenizer_json: Path, chat_template: str | None,
                 special_tokens: Mapping[str, str] | None | object = _FROM_MANIFEST,
                 manifest: Mapping[str, Any] | None = None):
        """``special_tokens``: the chat template's ``bos_token``, ``eos_token``, ... texts; by default
        taken from ``manifest`` (the bundle's, already parsed) or else read from the manifest of the
        bundle ``tokenizer_json`` belongs to (see ``special_tokens_from_manifest``); None or {} = none."""
        try:
            text = Path(tokenizer_json).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BundleError(f"{tokenizer_json}: cannot read ({e})") from None
        if special_tokens is _FROM_MANIFEST and manifest is None:
            manifest = _sibling_manifest(tokenizer_json)
        self._load(text, str(tokenizer_json), chat_template, special_tokens, manifest or {})

    @classmethod
    def from_json_text(cls, tokenizer_json: str, chat_template: str | None,
                       special_tokens: Mapping[str, str] | None = None, origin: str = "tokenizer.json",
                       manifest: Mapping[str, Any] | None = None) -> "Tokenizer":
        """From the text of a tokenizer.json (a source being exported has no bundle yet); ``origin``
        names it in errors; ``manifest`` (a manifest-shaped dict) supplies the special tokens when
        ``special_tokens`` is None."""
        tok = cls.__new__(cls)
        special = _FROM_MANIFEST if special_tokens is None and manifest is not None else special_tokens
        tok._load(tokenizer_json, origin, chat_template, special, manifest or {})
        return tok

    def _load(self, text: str, origin: str, chat_template: str | None,
              special_tokens: Mapping[str, str] | None | object, manifest: Mapping[str, Any]) -> None:
        try:
            self._tok = _HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise BundleError(f"{origin}: not a valid tokenizers JSON ({e})") from None
        # One instance: a second one for plain-text encoding held ~14 MiB more after load. Its
        # encode_special_tokens flag is toggled under this lock (encode holds the GIL throughout).
        self._encode_lock = threading.Lock()
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        if special_tokens is _FROM_MANIFEST:
            special_tokens = special_tokens_from_manifest(manifest, self._tok)
        self.special_tokens: dict[str, str] = {k: v for k, v in dict(special_tokens or {}).items()
                                               if k in SPECIAL_TOKEN_NAMES and isinstance(v, str) and v}
        # No token covers more characters than the longest vocabulary entry: a text longer than
        # max_token_chars * N cannot fit in N tokens (lets an enormous prompt be refused unencoded).
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.max_token_chars = max((len(t) for t in vocab), default=1)
        # byte-fallback tokens (<0xE2>, SentencePiece style): the decoder turns a whole run of them
        # into text at once (all U+FFFD if any byte of the run is left incomplete), so a stream holds
        # a run back until it ends
        self.byte_fallback_ids = frozenset(
            i for t, i in vocab.items() if _BYTE_TOKEN_RE.fullmatch(t)) if _byte_fallback(text) else frozenset()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def max_token_id(self) -> int:
        """The largest id the tokenizer can produce (added tokens may sit past vocab_size)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``special=True``: control-token text (``<|im_end|>``) becomes the
        control token, as the model's own prompt format needs; ``special=False``: it stays plain text."""
        check_text(text)
        return self._encode(text, special).ids

    def _encode(self, text: str, special: bool):
        with self._encode_lock:
            self._tok.encode_special_tokens = not special
            return self._tok.encode(text, add_special_tokens=False)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat template's token ids, where only the template can produce control tokens: text
        in a message that spells a special token (``<|im_start|>system``) is encoded as plain text.

        Ordinary messages get exactly the ids of encoding the rendered template (as transformers
        does); only content that would have produced a control token is encoded on its own."""
        messages = self._check_messages(messages)
        held = [{**m, "content": self.slot(i)} for i, m in enumerate(messages)]
        pieces, _, _ = self.template_pieces(held, [m["content"] for m in messages], add_generation_prompt)
        full = self.apply_chat_template(messages, add_generation_prompt)
        if "".join(t for t, _ in pieces) != full and len(pieces) == 3:
            # the template changes the content (e.g. | trim): take it from the real rendering
            head, tail = pieces[0][0], pieces[2][0]
            if full.startswith(head) and full.endswith(tail) and len(full) >= len(head) + len(tail):
                pieces[1] = (full[len(head):len(full) - len(tail)], True)
        return self.encode_pieces(pieces)

    @staticmethod
    def slot(i: int) -> str:
        """A stand-in for user text number ``i`` in a message given to ``template_pieces``."""
        return _PLACEHOLDER.format(i)

    def template_pieces(self, messages: list[dict[str, Any]], texts: list[str], add_generation_prompt: bool = True
                        ) -> tuple[list[tuple[str, bool]], list[int], str]:
        """Render the chat template over ``messages`` whose user text sits in ``slot(i)`` stand-ins
        (string content or list-content text parts) and split it into (text, is_user_text) pieces,
        user text number i put back where its slot was rendered. Returns (pieces, the slot numbers
        in rendered order, the rendered skeleton): the caller checks the template kept them all."""
        skeleton = self.apply_chat_template(messages, add_generation_prompt)
        pieces: list[tuple[str, bool]] = []
        found, pos = [], 0
        for m in _PLACEHOLDER_RE.finditer(skeleton):
            i = int(m.group(1))
            if i < len(texts):
                pieces += [(skeleton[pos:m.start()], False), (texts[i], True)]
                found.append(i)
                pos = m.end()
        pieces.append((skeleton[pos:], False))
        return pieces, found, skeleton

    def encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Token ids of the concatenated ``(text, is_user_text)`` pieces: exactly the ids of encoding
        the whole text, unless a user piece would produce a control token; then each piece is
        encoded on its own, user pieces as plain text (the rule of ``encode_chat``)."""
        text = "".join(t for t, _ in pieces)
        enc = self._encode(text, True)
        spans, pos = [], 0
        for t, user in pieces:
            if user and t:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        if not any(i in self.special_ids and a < e and s < b
                   for i, (a, b) in zip(enc.ids, enc.offsets) for s, e in spans):
            return enc.ids
        ids: list[int] = []
        for t, user in pieces:
            if t:
                ids += self._encode(t, not user).ids
        return ids

    def _check_messages(self, messages) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(check_message_list(messages)):
            check_role(i, m)
            check_text(m.get("content"), f"messages[{i}].content")
            out.append(m)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise PromptError("this bundle has no chat template; pass raw=True (edge-run --raw)")
        import jinja2

        try:
            # the variables transformers' apply_chat_template passes: tools/documents None, the
            # tokenizer's special tokens (bos_token, eos_token, ...) as text
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise PromptError(f"chat template failed on these messages: {e}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as e:  # the template's own bugs
            raise PromptError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive; holds back incomplete UTF-8 sequences
    (a text ending in U+FFFD, e.g. the first bytes of a multi-byte character) and runs of
    byte-fallback tokens until a later token completes them or ``flush()`` ends the stream.

    Pieces from ``push`` followed by ``flush()`` join to ``tok.decode(all ids)``."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.emitted = tok, [], 0
        self._text = ""

    def _emit(self, text: str) -> str:
        piece, self._text = text[len(self._text):], text
        self.emitted = len(text)
        return piece

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if token_id in self.tok.byte_fallback_ids:
            return ""  # a byte-fallback run decodes as a whole: wait for its end
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back, at the end of generation: incomplete bytes come out as
        U+FFFD, exactly as ``tok.decode`` renders them. Further pushes continue the stream."""
        return self._emit(self.tok.decode(self.ids)) if self.ids else ""
