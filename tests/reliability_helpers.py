"""Helpers for the reliability tests of issue 17: run a CLI in-process, assert a clean one-line
failure, and prove that nothing outside (or inside) a folder changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

EXPORT_ARGS = ("--chunk", "16", "--context", "64", "--quant", "fp32", "--quiet")


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: files by sha256, folders and links by kind (a snapshot)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_line(stderr: str, prog: str, status: int, returncode: int, *words: str) -> str:
    """The failure is one ``prog: error: ...`` line (the last of stderr) holding ``words``, the exit
    status is ``status``, and there is no traceback."""
    assert returncode == status, (returncode, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    line = errors[0]
    assert line.startswith(f"{prog}: error: "), line
    for w in words:
        assert w in line, (w, line)
    return line


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """A CLI's ``main(argv)`` in this process: (exit status, stdout, stderr); argparse's exits too."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err
