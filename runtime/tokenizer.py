"""Tokenizer + chat template, from the bundle's tokenizer.json and manifest (no transformers)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer

from edge.errors import BundleError, PromptError


def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise BundleError(f"chat template does not compile: {e}") from None


# Message content is rendered through the template as a placeholder first, so the template's own
# text (which may hold control tokens) and the user's text (which must not) are told apart.
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template writes them, trim/upper keep them
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
CHAT_ROLES = ("system", "user", "assistant", "tool")


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
    def __init__(self, tokenizer_json: Path, chat_template: str | None):
        try:
            self._tok = _HFTokenizer.from_file(str(tokenizer_json))
            # A second instance that reads special-token text in user content as plain text. (The
            # flag is per tokenizer object, so two objects rather than toggling: thread-safe.)
            self._plain = _HFTokenizer.from_file(str(tokenizer_json))
            self._plain.encode_special_tokens = True
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise BundleError(f"{tokenizer_json}: not a valid tokenizers JSON ({e})") from None
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        # No token covers more characters than the longest vocabulary entry: a text longer than
        # max_token_chars * N cannot fit in N tokens (lets an enormous prompt be refused unencoded).
        self.max_token_chars = max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``special=True``: control-token text (``<|im_end|>``) becomes the
        control token, as the model's own prompt format needs; ``special=False``: it stays plain text."""
        check_text(text)
        return (self._tok if special else self._plain).encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """The chat template's token ids, where only the template can produce control tokens: text
        in a message that spells a special token (``<|im_start|>system``) is encoded as plain text.

        Ordinary messages get exactly the ids of encoding the rendered template (as transformers
        does); only content that would have produced a control token is encoded on its own."""
        messages = self._check_messages(messages)
        held = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        skeleton = self.apply_chat_template(held, add_generation_prompt)
        # [(text, is_user_content)] in order
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for m in _PLACEHOLDER_RE.finditer(skeleton):
            if int(m.group(1)) < len(messages):
                pieces += [(skeleton[pos:m.start()], False), (messages[int(m.group(1))]["content"], True)]
                pos = m.end()
        pieces.append((skeleton[pos:], False))
        full = self.apply_chat_template(messages, add_generation_prompt)
        if "".join(t for t, _ in pieces) != full and len(pieces) == 3:
            # the template changes the content (e.g. | trim): take it from the real rendering
            head, tail = pieces[0][0], pieces[2][0]
            if full.startswith(head) and full.endswith(tail) and len(full) >= len(head) + len(tail):
                pieces[1] = (full[len(head):len(full) - len(tail)], True)
        return self.encode_pieces(pieces)

    def encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """Token ids of the concatenated ``(text, is_user_text)`` pieces: exactly the ids of encoding
        the whole text, unless a user piece would produce a control token; then each piece is
        encoded on its own, user pieces as plain text (the rule of ``encode_chat``)."""
        text = "".join(t for t, _ in pieces)
        enc = self._tok.encode(text, add_special_tokens=False)
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
                ids += (self._plain if user else self._tok).encode(t, add_special_tokens=False).ids
        return ids

    def _check_messages(self, messages) -> list[dict[str, str]]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise PromptError(f"messages[{i}] must be a dict with a str 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:
                raise PromptError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m['role']!r:.40}")
            check_text(m.get("content"), f"messages[{i}].content")
            out.append(m)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise PromptError("this bundle has no chat template; pass raw=True (edge-run --raw)")
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token="", eos_token="")
        except jinja2.TemplateError as e:
            raise PromptError(f"chat template failed on these messages: {e}") from None

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive; holds back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.emitted = tok, [], 0
        self._text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self._text = text[len(self._text):], text
        return piece
