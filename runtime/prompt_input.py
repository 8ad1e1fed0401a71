"""Where edge-run's prompt comes from: ``--prompt TEXT``, ``--prompt -`` (standard input) or
``--prompt-file FILE``; the last two carry prompts longer than the OS argument limit (~128 KiB).

Input bytes must be UTF-8 (a message names the file and the byte offset otherwise); one trailing
newline (``\\n`` or ``\\r\\n``, as ``echo`` and editors write) is dropped, nothing else is changed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from edge.cli_errors import UsageError
from edge.errors import PromptError

MAX_PROMPT_BYTES = 64 << 20  # far beyond any context; refused before reading it all


def _decode(data: bytes, where: str) -> str:
    if len(data) > MAX_PROMPT_BYTES:
        raise PromptError(f"{where}: more than {MAX_PROMPT_BYTES >> 20} MiB; expected a prompt that fits a context")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"{where}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark some editors write
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[:-len(end)]
    return text


def _read(stream: BinaryIO) -> bytes:
    return stream.read(MAX_PROMPT_BYTES + 1)


def read_prompt(prompt: str | None, prompt_file: str | None, stdin: BinaryIO | None = None) -> str | None:
    """The prompt text, or None when neither flag was given."""
    if prompt is not None and prompt_file is not None:
        raise UsageError("--prompt and --prompt-file both give a prompt; expected one")
    if prompt_file is not None:
        path = Path(prompt_file)
        if path.is_dir():
            raise PromptError(f"--prompt-file {path}: is a folder; expected a text file")
        try:
            with open(path, "rb") as f:
                data = _read(f)
        except OSError as e:
            raise PromptError(f"--prompt-file {path}: cannot read ({e.strerror or e})") from None
        return _decode(data, f"--prompt-file {path}")
    if prompt == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return _decode(_read(stream), "--prompt - (standard input)")
    return prompt
