"""Chat templates (Jinja, from a bundle's manifest) rendered with bounds on time, work and size.

jinja2's sandbox stops attribute tricks, not work: nested loops, recursive macros or a string
doubled in a loop can run for minutes or fill memory. Here every unit of template work is a *step*
charged to the render's budget, and a render stops with a ``TemplateLimitError`` (a PromptError)
at the first of: ``MAX_STEPS`` steps, ``TIME_LIMIT_S`` seconds, or more than the size limit
(``BASE_CHARS`` + 4 x the messages' text) written in all, or held by any one value.

Steps: each iteration of every ``for`` (the loop's iterable is wrapped at parse time), each call
(macros, ``loop()`` of recursive loops, methods), filter, test, attribute/item lookup, ``~``, and
the intercepted operators ``+ * ** %``. Sizes: every write to an output buffer (top level, macros,
``set`` and ``filter`` blocks) counts; operators and calls are checked *before* they run where
their result could be large (``"x" * n``, ``a ** b``, padding widths, ``replace``); results after.
The same budget applies at compile time (jinja evaluates constant expressions then).
"""

from __future__ import annotations

import contextvars
import functools
import re
import time
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge.errors import PromptError

TIME_LIMIT_S = 2.0
MAX_STEPS = 1_000_000
BASE_CHARS = 1 << 20  # output / value size allowed besides 4 x the messages' own text
MAX_INT_BITS = 1 << 16  # integer results (a ** b, a * b) beyond this are refused before computing
MAX_RANGE = 100_000
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width of a million characters or more


class TemplateLimitError(PromptError):
    """A chat template exceeded its time, step or size bound."""


class _Budget:
    __slots__ = ("steps", "deadline", "limit", "written")

    def __init__(self, limit: int = BASE_CHARS, seconds: float = TIME_LIMIT_S):
        self.steps, self.written, self.limit = 0, 0, limit
        self.deadline = time.monotonic() + seconds

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise TemplateLimitError(f"chat template: stopped after {MAX_STEPS:,} steps (loops, calls, filters); "
                                     "expected a template that renders a conversation in far fewer")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"chat template: stopped after {TIME_LIMIT_S:g} s of rendering; expected a "
                                     "template that renders a conversation in milliseconds")

    def size(self, n: int, what: str) -> None:
        if n > self.limit:
            raise TemplateLimitError(f"chat template: {what} of {n:,} characters; expected at most {self.limit:,} "
                                     "for this conversation")

    def write(self, n: int) -> None:
        self.written += n
        self.size(self.written, "output")


_CURRENT: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("edge_template_budget", default=None)


def _budget() -> _Budget:
    b = _CURRENT.get()
    return _Budget() if b is None else b  # outside render()/compile(): still bounded, per operation


def _length(v: Any) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _check_args(args, kwargs, b: _Budget) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > b.limit:
            b.size(abs(a), "an argument asking for a result")


def _check_format(fmt: Any, b: _Budget) -> None:
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise TemplateLimitError("chat template: a format width of a million characters or more; refused")


def _check_join(seq: Any, b: _Budget) -> None:
    if isinstance(seq, (list, tuple)):
        b.size(sum(len(x) for x in seq if isinstance(x, str)), "a join() result")


def _check_replace(s: Any, args, b: _Budget) -> None:
    if isinstance(s, str) and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = len(s) + 1 if args[0] == "" else s.count(args[0])
        b.size(len(s) + count * max(0, len(args[1]) - len(args[0])), "a replace() result")


class _Buffer(list):
    """An output buffer (macro bodies, ``set``/``filter`` blocks) that charges what is written to it."""

    def append(self, item: Any) -> None:
        b = _budget()
        b.step()
        b.write(_length(item) or 1)
        super().append(item)

    def extend(self, items) -> None:
        for item in items:
            self.append(item)


class _Counted:
    """A ``for`` loop's iterable: each item is a step; ``len`` as the iterable's (loop.length)."""

    __slots__ = ("_seq",)

    def __init__(self, seq: Any):
        self._seq = seq

    def __len__(self) -> int:
        return len(self._seq)  # TypeError for generators: jinja's LoopContext then counts by itself

    def __iter__(self):
        b = _budget()
        for item in self._seq:
            b.step()
            yield item


class _CodeGenerator(CodeGenerator):
    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.edge_buffer()")

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.edge_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _bounded(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)  # keeps jinja's pass_context / pass_environment marks
    def run(*args, **kwargs):
        b = _budget()
        b.step()
        _check_args(args, kwargs, b)
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                         jinja2.nodes.EvalContext))]
        if name == "format" and values:
            _check_format(values[0], b)
        if name == "join" and values:
            _check_join(values[0], b)
        if name == "replace" and len(values) >= 3:
            _check_replace(values[0], values[1:], b)
        result = fn(*args, **kwargs)
        b.size(_length(result), f"the result of the {name!r} filter")
        return result
    return run


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["+", "*", "**", "%", "//"])
    code_generator_class = _CodeGenerator

    def __init__(self, **kwargs):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], **kwargs)
        self.globals.pop("lipsum", None)  # lipsum(n) builds n paragraphs in one call
        self.globals["range"] = self._range

    def finalize_filters(self) -> None:
        """Wrap every filter and test (call after adding the template's own filters)."""
        self.filters = {k: _bounded(f, k) for k, f in self.filters.items()}
        self.tests = {k: _bounded(f, k) for k, f in self.tests.items()}

    # ---- parse: every for loop's iterable is counted
    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            call = nodes.Call(nodes.EnvironmentAttribute("edge_iter"), [loop.iter], [], None, None,
                              lineno=loop.iter.lineno)
            call.set_environment(self)
            loop.iter = call
        return tree

    # ---- hooks the generated code calls
    def edge_iter(self, seq: Any) -> _Counted:
        return _Counted(seq)

    def edge_buffer(self) -> _Buffer:
        return _Buffer()

    def edge_concat(self, parts) -> str:
        b = _budget()
        b.step()
        pieces = [str(p) for p in parts]
        b.size(sum(map(len, pieces)), "a ~ concatenation")
        return "".join(pieces)

    def _range(self, *args):
        _budget().step()
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise TemplateLimitError(f"chat template: range of {len(r):,} items; expected at most {MAX_RANGE:,}")
        return r

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        b = _budget()
        b.step()
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            if abs(left).bit_length() * right > MAX_INT_BITS:
                raise TemplateLimitError(f"chat template: {left} ** {right} is too large a number; refused")
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError("chat template: a product too large a number; refused")
            for seq, n in ((left, right), (right, left)):
                if _length(seq) and isinstance(n, int):
                    b.size(_length(seq) * max(n, 0), "a repeated value")
        if operator == "+" and _length(left) and _length(right):
            b.size(_length(left) + _length(right), "a + result")
        if operator == "%":
            _check_format(left, b)
            _check_args(right if isinstance(right, tuple) else (right,), {}, b)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        b = _budget()
        b.step()
        _check_args(args, kwargs, b)
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name in ("format", "format_map"):
                _check_format(owner, b)
            elif name == "replace":
                _check_replace(owner, args, b)
            elif name == "join" and args:
                _check_join(args[0], b)
        result = super().call(__context, __obj, *args, **kwargs)
        b.size(_length(result), "a call's result")
        return result

    def getattr(self, obj, attribute):
        b = _budget()
        b.step()
        if isinstance(obj, str) and attribute in ("format", "format_map"):  # the sandbox wraps these
            _check_format(obj, b)
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().step()
        return super().getitem(obj, argument)


class BoundedTemplate:
    """A compiled chat template whose ``render`` is bounded (see the module doc)."""

    def __init__(self, template: jinja2.Template):
        self._template = template

    def render(self, messages: Any = (), **context: Any) -> str:
        chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict)
                    and isinstance(m.get("content"), str)) if isinstance(messages, (list, tuple)) else 0
        b = _Budget(BASE_CHARS + 4 * chars)
        token = _CURRENT.set(b)
        try:
            out = []
            for piece in self._template.generate(messages=messages, **context):
                b.step()
                b.write(len(piece))
                out.append(piece)
            return "".join(out)
        except RecursionError:
            raise TemplateLimitError("chat template: recursion too deep (a macro calling itself without end?)") \
                from None
        except MemoryError:
            raise TemplateLimitError("chat template: ran out of memory while rendering") from None
        finally:
            _CURRENT.reset(token)


def compile_template(source: str, configure: Callable[[BoundedEnvironment], None] | None = None) -> BoundedTemplate:
    """Compile ``source`` (jinja2.TemplateError on a syntax error); ``configure(env)`` may add
    globals and filters first (they are bounded too)."""
    env = BoundedEnvironment()
    if configure is not None:
        configure(env)
    env.finalize_filters()
    token = _CURRENT.set(_Budget())
    try:
        return BoundedTemplate(env.from_string(source))
    except (RecursionError, MemoryError):
        raise TemplateLimitError("chat template: too large or too deeply nested to compile") from None
    finally:
        _CURRENT.reset(token)
