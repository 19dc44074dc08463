"""Hierarchical FX tracing: one graph per module that can be traced, and the reason for each that cannot.

``torch.fx.symbolic_trace`` of a whole Hugging Face model fails (control flow on shapes, masks, caches),
but most submodules trace fine. So modules are traced bottom-up: a module whose own trace fails becomes an
opaque leaf in its ancestors' traces, and its reason is kept for the report. When a module's ``forward``
fails, the helper methods it calls (``TransformerEncoderLayer._ff_block``, BERT's ``feed_forward_chunk``)
are traced instead, so an FFN spread over sibling modules is still visible.

The leaf policy keeps linear-like and activation modules whole, so patterns see ``linear -> act -> linear``
rather than ``addmm`` and a tanh formula. Analysis traces are looser than FFN-exact ones, so more modules
trace: arguments with defaults keep their defaults (a decoder layer's ``attention_mask=None``,
``**kwargs`` empty) and ``tensor.dtype`` / ``.device`` are read from the module's parameters. Those
graphs are marked ``specialised`` where it mattered and are only used to find FFNs, never executed; a
graph edit re-traces its module exactly. During an analysis trace the module's own float attributes are
:class:`TaggedFloat` s, so a constant in the graph (``F.dropout(h, p=self.activation_dropout)``) says which
attribute it was read from.

A TorchScript submodule is opaque: FX cannot look inside it, and its parent is traced around it. An
uninitialised lazy module (``nn.LazyLinear`` before its first forward) has no shapes to read, so tracing
refuses the model with a :class:`~mixcompile.errors.ConfigError` naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any

import torch
from torch import fx, nn

from mixcompile.compiler.activation_names import module_activation
from mixcompile.compiler.linears import is_linear_like
from mixcompile.errors import ConfigError
from mixcompile.integrations.transformers_experts import is_experts_module
from mixcompile.runtime.blocks import Block
from mixcompile.runtime.rewritten import edited_graph

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_MAX_REASON = 240


def is_primitive(module: nn.Module) -> bool:
    """Modules the compiler never looks inside: projections, activations and childless ``torch.nn`` layers."""
    if is_linear_like(module) or module_activation(module) is not None:
        return True
    return type(module).__module__.startswith("torch.nn") and not list(module.children())


class LeafTracer(fx.Tracer):
    """An FX tracer that keeps primitives and known-untraceable modules as ``call_module`` leaves."""

    def __init__(self, opaque: set[nn.Module], *, method: str = "forward", analysis: bool = True) -> None:
        super().__init__()
        self.opaque = opaque
        self.traced_func_name = method
        self.analysis = analysis
        self.specialised: set[str] = set()
        self._leaves: set[nn.Module] = set()
        self._dtype = torch.get_default_dtype()
        self._device = torch.device("cpu")

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # Decided before tracing: probing an unknown activation runs it, which must not happen mid-trace.
        self._leaves = {m for m in root.modules() if m is not root and is_primitive(m)}
        param = next((p for p in root.parameters() if p.is_floating_point()), None)
        if param is not None:
            self._dtype, self._device = param.dtype, param.device
        return super().trace(root, concrete_args)

    def create_args_for_root(
        self, root_fn: Any, is_module: bool, concrete_args: dict[str, Any] | tuple[Any, ...] | None = None
    ) -> tuple[Any, list[Any]]:
        """Analysis traces give placeholders to required positional parameters only; the rest keep their
        defaults (``**kwargs`` stays empty), which is how most callers call a layer anyway."""
        if not self.analysis:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        params = list(inspect.signature(root_fn).parameters.values())[1 if is_module else 0 :]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
        placeholders = [self.create_proxy("placeholder", p.name, (), {}) for p in required]
        return root_fn, ([self.root] if is_module else []) + placeholders

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if m in self.opaque or m in self._leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return AnalysisProxy(node, self) if self.analysis else super().proxy(node)

    def concrete(self, name: str) -> object:
        """The value an analysis trace assumes for ``tensor.<name>``; remembered so the graph is marked."""
        self.specialised.add(name)
        return self._dtype if name == "dtype" else self._device


class TaggedFloat(float):
    """A float attribute of a traced module that remembers its name (``attr``), so the rewrite can find the
    attribute behind a functional dropout's probability and set it to 0 once the block applies it."""

    attr: str

    def __new__(cls, value: float, attr: str = "") -> TaggedFloat:
        tagged = super().__new__(cls, value)
        tagged.attr = attr
        return tagged


@contextmanager
def tagged_floats(module: nn.Module) -> Iterator[None]:
    """The module's own float attributes as :class:`TaggedFloat` s for the duration."""
    names = [k for k, v in vars(module).items() if type(v) is float]
    for name in names:
        vars(module)[name] = TaggedFloat(vars(module)[name], name)
    try:
        yield
    finally:
        for name in names:
            vars(module)[name] = float(vars(module)[name])


class AnalysisProxy(fx.Proxy):
    def __getattr__(self, name: str) -> Any:
        if name in ("dtype", "device"):
            return self.tracer.concrete(name)  # type: ignore[attr-defined]
        return super().__getattr__(name)


@dataclass
class TracedUnit:
    """The graph of one method (``forward`` or a helper it calls) of the module at ``path``."""

    path: str
    method: str
    module: nn.Module
    graph: fx.Graph
    specialised: bool

    @property
    def label(self) -> str:
        where = self.path or "<root>"
        return where if self.method == "forward" else f"{where}.{self.method}"


class TrainingFlag(int):
    """A module's ``training`` during a mode-probing trace: truthy or falsy like the mode, and
    recognisable in the graph, so ``F.dropout(h, p, training=self.training)`` says its flag *is* the
    module's mode (``training=self.training and self.use_dropout`` gives a plain bool instead)."""

    def __repr__(self) -> str:
        return f"TrainingFlag({bool(self)})"


@contextmanager
def flagged_training(module: nn.Module, mode: bool) -> Iterator[None]:
    """The module's own ``training`` as a :class:`TrainingFlag` of ``mode`` for the duration."""
    before = module.training
    vars(module)["training"] = TrainingFlag(mode)
    try:
        yield
    finally:
        vars(module)["training"] = before


@dataclass
class TraceResult:
    units: list[TracedUnit] = field(default_factory=list)  # children before parents
    failures: dict[str, str] = field(default_factory=dict)  # module path -> why its forward did not trace
    opaque: set[nn.Module] = field(default_factory=set, repr=False)  # leaves of every trace: re-trace with it


def trace_module(
    module: nn.Module,
    opaque: set[nn.Module],
    *,
    method: str = "forward",
    analysis: bool = True,
    mode: bool | None = None,
) -> tuple[fx.Graph, bool]:
    """Trace one method of ``module``; returns the graph and whether it relied on assumed dtype/device.
    ``mode`` traces it as if in that training mode, its ``training`` a :class:`TrainingFlag`. A module an
    earlier graph edit gave its own forward runs that graph, not its class's forward: that is its graph."""
    edited = edited_graph(module) if method == "forward" else None
    if edited is not None:
        return edited, False
    tracer = LeafTracer(opaque, method=method, analysis=analysis)
    with (
        tagged_floats(module) if analysis else nullcontext(),
        flagged_training(module, mode) if mode is not None else nullcontext(),
    ):
        graph = tracer.trace(module)
    return graph, bool(tracer.specialised)


def trace_hierarchy(model: nn.Module) -> TraceResult:
    """Trace every module of ``model`` that can be traced, children first."""
    check_initialised(model)
    result = TraceResult()
    opaque = result.opaque
    seen: set[nn.Module] = set()

    def visit(path: str, module: nn.Module) -> None:
        if module in seen or is_primitive(module):
            return
        seen.add(module)
        # Already sparse (a block, or a transformers experts module, which the report lists on its own): a
        # leaf for its parents, nothing to find inside.
        if isinstance(module, Block) or is_experts_module(module):
            opaque.add(module)
            return
        if isinstance(module, torch.jit.ScriptModule):
            opaque.add(module)
            result.failures[path] = _SCRIPTED
            return
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)
        if isinstance(module, _CONTAINERS):
            return
        try:
            graph, specialised = trace_module(module, opaque)
        except Exception as exc:  # noqa: BLE001 - any failure means "not traceable", and we keep why
            opaque.add(module)
            result.failures[path] = _reason(exc)
            result.units.extend(_trace_helpers(path, module, opaque))
            return
        result.units.append(TracedUnit(path, "forward", module, graph, specialised))

    visit("", model)
    return result


_SCRIPTED = "TorchScript module: FX cannot trace compiled code, so it is an opaque leaf of its parent"


def check_initialised(model: nn.Module) -> None:
    """Refuse a model with uninitialised lazy parameters: an FFN's shapes and weights do not exist yet."""
    lazy = [(path, module) for path, module in model.named_modules() if _has_lazy_tensors(module)]
    if lazy:
        names = ", ".join(f"{path or '<root>'} ({type(module).__name__})" for path, module in lazy)
        raise ConfigError(
            f"{names} of {type(model).__name__} {'has' if len(lazy) == 1 else 'have'} uninitialised lazy "
            "parameters: run one forward on a real input first, so they take their shapes, then convert"
        )


def _has_lazy_tensors(module: nn.Module) -> bool:
    tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return any(nn.parameter.is_lazy(tensor) for tensor in tensors)


def _trace_helpers(path: str, module: nn.Module, opaque: set[nn.Module]) -> list[TracedUnit]:
    units = []
    for name in helper_methods(module):
        try:
            graph, specialised = trace_module(module, opaque, method=name)
        except Exception:  # noqa: BLE001 - helpers are a best effort; forward's failure is what we report
            continue
        units.append(TracedUnit(path, name, module, graph, specialised))
    return units


def helper_methods(module: nn.Module) -> list[str]:
    """Methods of the module's own class that its ``forward`` calls and that take at least one argument.
    The class's forward is read from the class dicts, never through descriptors (TorchScript's raise)."""
    found = _class_function(type(module), "forward")
    if found is None:
        return []
    forward = inspect.unwrap(found)
    names = getattr(getattr(forward, "__code__", None), "co_names", ())
    helpers = []
    for name in dict.fromkeys(names):
        if name == "forward" or name.startswith("__"):
            continue
        function = _class_function(type(module), name)
        if function is None:
            continue
        params = list(inspect.signature(function).parameters.values())[1:]
        if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            helpers.append(name)
    return helpers


def _class_function(cls: type, name: str) -> FunctionType | None:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            return None
        value = klass.__dict__.get(name)
        if value is not None:
            return value if isinstance(value, FunctionType) else None
    return None


def _reason(exc: BaseException) -> str:
    """The exception's type and first sentence: enough to see why, short enough for a report line."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = message.split(". ")[0]
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."
