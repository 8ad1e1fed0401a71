"""edge: an on-device runtime for small (multimodal) LLMs.

One import root: ``edge`` holds the shared core (numpy + stdlib only), ``edge.runtime`` (what a
board imports), ``edge.export`` (the exporter; heavy deps) and ``edge.bench`` (benchmarks, dev
only). The public API is ``from edge import Model``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"
__all__ = ["Model", "SamplingParams", "__version__"]

# In a source checkout the subpackages are the sibling folders runtime/, export/ and bench/ (the
# project's fixed layout); an installed edge has them under edge/ (pyproject's package-dir). This
# finder serves the checkout case only, for the three names, so `PYTHONPATH=checkout` just works.
_SUBPACKAGES = ("runtime", "export", "bench")
_CHECKOUT = Path(__file__).resolve().parent.parent


class _CheckoutSubpackages:
    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in _SUBPACKAGES:
            return None
        init = _CHECKOUT / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


if not (Path(__file__).parent / "runtime").is_dir() and (_CHECKOUT / "pyproject.toml").is_file():
    # just before the path finder: after any finder a caller put first (tests block imports that
    # way), before an editable install's finder, which would map to the installed checkout
    sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder), _CheckoutSubpackages)


def __getattr__(name: str):
    # lazy: `import edge.manifest` (the exporter, a numpy-only tool) must not load onnxruntime
    if name in ("Model", "SamplingParams"):
        from edge import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
