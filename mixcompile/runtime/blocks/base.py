"""What MoE and MoT blocks share: kernel choice, checks of plugin outputs, loading dense weights.

The kernel is chosen when a block is built and again whenever it moves (``.to()``, ``.cuda()``,
``.half()``: :meth:`Block._apply`), for every floating dtype on its device and for training with hidden
dropout, so a forward only looks its choice up: no registry walk inside ``torch.compile``'s trace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn

from mixcompile.errors import ConfigError, MixcompileError, PluginError, ShapeError
from mixcompile.plugins.build import PluginKind, Source, call_factory, plugin_source
from mixcompile.plugins.manager import lookup
from mixcompile.runtime.calls import combine_stats
from mixcompile.runtime.checks import check_input
from mixcompile.runtime.experts import StackedExperts
from mixcompile.runtime.ffn import DenseFFN
from mixcompile.runtime.kernels import Kernel, get_kernel, resolve_kernel
from mixcompile.types import BlockKind

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class Describe:
    """How errors name one of a block's plugins, built once per block and read only when an error is raised,
    so a compiled forward neither builds nor reads per-block text (each would be a guard). A class rather
    than a closure, so a converted model still deep-copies and pickles."""

    def __init__(self, block: Block, kind: PluginKind, name: str) -> None:
        # The plugin's name now: an error raised after unregister_plugin still names it, and is not lost
        # to an unknown-name error from a look-up made while reporting it.
        self.block, self.kind, self.name, self.plugin = block, kind, name, lookup(kind, name).plugin

    def __call__(self) -> str:
        return plugin_source(self.kind, self.name, self.plugin, self.block.site)


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a block runs with for one (device type, dtype, dropout) case."""

    name: str
    kernel: Kernel
    source: Source
    # A built-in kernel's routing picks are in range by construction, a third party's are checked (False,
    # the safe side, for a block pickled before this field existed).
    builtin: bool = False


# A case no kernel serves keeps the reason (a str) instead of a choice, for the forward that meets it.
_Choice = KernelChoice | str


class Block(nn.Module):
    """Base of the sparse blocks: holds the experts, the kernel choice, checks of plugin outputs, stats.

    Subclasses build ``self.experts`` and then call :meth:`choose_kernels`.
    """

    kind: BlockKind = ""  # type: ignore[assignment]  # the base has no kind; MoEBlock and MoTBlock set theirs
    experts: StackedExperts

    def __init__(self, kernel: str, site: str = "") -> None:
        super().__init__()
        self.site = site  # where the block sits in its model (convert sets it): errors name it
        self._kernels: dict[tuple[str, torch.dtype, bool], _Choice] = {}
        self.kernel = kernel
        self._recipe_kernel = kernel
        self._stats: dict[str, Any] = {}
        # Whether the converted model's current forward called the block yet; None outside such a forward
        # (set by mixcompile.runtime.calls.ForwardScope). Calls within one forward add up what they keep.
        self.called_in_forward: bool | None = None

    def settings(self) -> dict[str, Any]:
        """The block's settings that can change after it is built (JSON-safe), for a save to keep: here its
        kernel, where set since (a load builds the block with :attr:`recipe_kernel`, then sets it)."""
        # a block pickled before the recipe's kernel was kept saves its kernel whatever it is
        return {"kernel": self.kernel} if self.kernel != getattr(self, "_recipe_kernel", None) else {}

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Restore :meth:`settings` (as a load does); unknown names and bad values raise ``ConfigError``.
        Subclasses pass on the kernel."""
        unknown = sorted(set(settings) - {"kernel"})
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no settings {unknown}.")
        if "kernel" in settings:
            self.kernel = settings["kernel"]

    @property
    def recipe_kernel(self) -> str:
        """The kernel the block was built with, which a load's replay of its recipe builds it with."""
        return getattr(self, "_recipe_kernel", self.kernel)  # a block pickled before it was kept

    @property
    def kernel(self) -> str:
        """The kernel name asked for (``"auto"`` or a registered name); setting it chooses again."""
        return self._kernel_name

    @kernel.setter
    def kernel(self, name: str) -> None:
        if name != "auto":
            get_kernel(name)  # unknown names fail at once, with a suggestion
        self._kernel_name = name
        if "experts" in self._modules:
            self.choose_kernels()

    @property
    def last_stats(self) -> dict[str, Any]:
        """Statistics of the last forward as Python numbers (``expert_load`` a CPU tensor; None for what a
        forward on the meta device computed, which has a shape and no value).

        The forward keeps them as tensors where it computed them, so it neither waits for the device nor
        breaks a ``torch.compile`` graph; they are read back here, when asked for.
        """
        return {key: _to_host(value) for key, value in self._stats.items()}

    def _keep_stats(self, stats: dict[str, Any]) -> bool:
        """Keep this call's statistics: added to the earlier calls' when the model's current forward called
        the block before (see :mod:`mixcompile.runtime.calls`), else in their place. Returns whether they
        were added, so that a subclass adds up what else it keeps per call (a MoE block's router losses)."""
        called = getattr(self, "called_in_forward", None)  # absent on a block pickled before it existed
        if called:
            stats = combine_stats(self._stats, stats)
        if called is not None:
            self.called_in_forward = True
        self._stats = stats
        return bool(called)

    def kernel_for(self, device: torch.device | str, dtype: torch.dtype, *, training: bool = False) -> str:
        """The name of the kernel this block runs with on ``device``/``dtype`` (resolves ``auto``)."""
        dropout = self.experts.hidden_dropout if training else 0.0
        return resolve_kernel(self.kernel, self.kind, torch.device(device), dtype, hidden_dropout=dropout)[0]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Block:
        """Moving or casting the block (``.to``, ``.cuda``, ``.half``) chooses its kernels again."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # unannotated in torch; returns self
        self.choose_kernels()
        return self

    def choose_kernels(self) -> None:
        """Resolve the kernel for the experts' device, every floating dtype (autocast may change it) and
        training with and without hidden dropout; a case no kernel serves keeps its error for the forward
        that needs it, so a block built for one device can still be moved to another. Moving or casting the
        block calls it; weights assigned otherwise (a load, ``load_state_dict(assign=True)``) need a call."""
        device = self.experts.w_in.device
        if device.type == "meta":
            self._kernels = {}
            return
        dropouts = (False, True) if self.experts.hidden_dropout > 0 else (False,)
        choices: dict[tuple[str, torch.dtype, bool], _Choice] = {}
        for dtype in dict.fromkeys((self.experts.w_in.dtype, *_FLOATS)):
            for dropout in dropouts:
                choices[(device.type, dtype, dropout)] = self._resolve(device, dtype, dropout)
        self._kernels = choices

    def _resolve(self, device: torch.device, dtype: torch.dtype, dropout: bool) -> _Choice:
        p = self.experts.hidden_dropout if dropout else 0.0
        try:
            name, kernel = resolve_kernel(self.kernel, self.kind, device, dtype, hidden_dropout=p)
        except PluginError:
            raise  # a broken kernel plugin: now, not as a ConfigError at the forward that meets it
        except MixcompileError as exc:
            return str(exc)
        return KernelChoice(name, kernel, Describe(self, "kernel", name), lookup("kernel", name).builtin)

    def _kernel(self, x: torch.Tensor) -> KernelChoice:
        """This block's kernel for ``x`` (chosen in advance; resolved here only for a device or dtype the
        block was never moved to, which only an eager forward can meet)."""
        dropout = self.training and self.experts.hidden_dropout > 0
        choice = self._kernels.get((x.device.type, x.dtype, dropout))
        if choice is None:
            choice = self._resolve(x.device, x.dtype, dropout)
        if isinstance(choice, str):
            raise ConfigError(f"{self._name()}: {choice}")
        return choice

    @staticmethod
    def _compute_input(x: torch.Tensor) -> torch.Tensor:
        """``x`` in the autocast dtype when autocast is on: the block then computes in, and returns, the
        dtype the dense FFN's linears would have, and its kernel sees one dtype for inputs and weights."""
        device_type = x.device.type
        if x.is_floating_point() and _autocast_on(device_type):
            return x.to(torch.get_autocast_dtype(device_type))
        return x

    def _check_input(self, x: torch.Tensor, ranks: str, ok_rank: bool) -> None:
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"{self._name()} expects a tensor, got {type(x).__name__}.")
        if not ok_rank or x.shape[-1] != self.experts.d_model:
            raise ShapeError(
                f"{self._name()} expects inputs of shape {ranks} with d={self.experts.d_model} features, "
                f"got {tuple(x.shape)}."
            )
        self._check_device(x)
        weights = self.experts.w_in.dtype
        if not x.is_floating_point():
            raise ShapeError(
                f"{self._name()} got a {x.dtype} input; it computes on floating-point features (an FFN's "
                f"input, [..., {self.experts.d_model}]), not on token ids: embed the tokens first."
            )
        if x.dtype != weights and not _autocast_on(x.device.type):
            raise ShapeError(
                f"{self._name()} holds {weights} weights and got a {x.dtype} input (as a dense nn.Linear, it "
                f"computes in one dtype): pass {weights} inputs, move the block or model with "
                f".to({x.dtype}), or run under torch.autocast (with FSDP2's MixedPrecisionPolicy and expert "
                "parallelism, autocast: the expert shards are ignored by FSDP, so it does not cast them)."
            )
        check_input(x, lambda: f"the block at {self.site}" if self.site else type(self).__name__)

    def _check_device(self, x: torch.Tensor) -> None:
        """Input and every tensor of the block (experts, router or mixer, any plugin's) on one device,
        compared from metadata (no sync): the kernels would otherwise compute on a meta skeleton's
        uninitialised memory and return it (torch multiplies a CPU input by a meta weight without a word), or
        fail inside torch."""
        device = x.device
        for module in self.modules():
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None and tensor.device != device:
                    self._refuse_device(x)

    def _refuse_device(self, x: torch.Tensor) -> NoReturn:
        elsewhere = [
            (name, tensor.device)
            for name, tensor in (*self.named_parameters(), *self.named_buffers())
            if tensor.device != x.device
        ]
        names = ", ".join(name for name, _ in elsewhere[:3]) + (", ..." if len(elsewhere) > 3 else "")
        where = (
            f"{self._name()} got an input on {x.device}, but {names} {'are' if len(elsewhere) > 1 else 'is'}"
        )
        if x.device.type != "meta" and any(device.type == "meta" for _, device in elsewhere):
            raise ConfigError(
                f"{where} on the meta device (a skeleton, without values): load or materialise them first "
                "(load_state_dict(state, assign=True) with the converted model's weights, or "
                "to_empty(device=...) and an initialisation)."
            )
        devices = ", ".join(sorted({str(device) for _, device in elsewhere}))
        raise ShapeError(
            f"{where} on {devices}: move the input or the model (.to({str(x.device)!r})) so that both are on "
            "one device."
        )

    def _name(self) -> str:
        return f"{type(self).__name__} at {self.site}" if self.site else type(self).__name__

    def load_dense(
        self,
        dense: DenseFFN,
        init: str = "upcycle",
        generator: torch.Generator | None = None,
        **init_options: Any,
    ) -> None:
        """Fill the experts from a dense FFN with the initializer plugin ``init``.

        The experts are NaN until it runs, and checked after: a tensor it leaves unfilled (or fills with
        NaN, or replaces with another shape) is its error, not a model that computes NaN."""
        _check_compatible(self.experts, dense)
        registration = lookup("initializer", init)
        source = plugin_source("initializer", init, registration.plugin, self.site)
        options = {"generator": generator, **init_options}
        shapes = {name: (p.shape, p.dtype) for name, p in self.experts.named_parameters()}
        real = next(self.experts.parameters()).device.type != "meta"
        with torch.no_grad():
            if real:
                for param in self.experts.parameters():
                    param.fill_(float("nan"))
            returned = call_factory(
                registration.factory, source, (self.experts, dense), options, kind="initializer"
            )
        if returned is not None:
            raise PluginError(
                f"{source} returned a {type(returned).__name__}; an initializer fills the experts in place "
                "and returns None."
            )
        for name, param in self.experts.named_parameters():
            if (param.shape, param.dtype) != shapes[name]:
                raise PluginError(
                    f"{source} replaced experts.{name} ({tuple(shapes[name][0])}, {shapes[name][1]}) with "
                    f"{tuple(param.shape)}, {param.dtype}: fill the experts' tensors in place (param.copy_)."
                )
        if not real:
            return
        params = self.experts.named_parameters()  # a NaN or inf makes the float32 sum so: one read, no copy
        unfilled = [name for name, param in params if not param.sum(dtype=torch.float32).isfinite()]
        if unfilled:
            raise PluginError(
                f"{source} left experts.{', experts.'.join(unfilled)} unfilled or not finite (the experts "
                "are NaN until it fills them): an initializer must set every tensor of the block's experts."
            )


def check_plugin_options(name: str, options: object) -> None:
    """``router_options`` / ``mixer_options``: keyword arguments for the plugin's factory."""
    if options is not None and not (
        isinstance(options, Mapping) and all(isinstance(k, str) for k in options)
    ):
        raise ConfigError(
            f"{name} must be a dict of keyword options for the plugin (name -> value), got {options!r}."
        )


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False on the meta device, which has no autocast (its
    forwards infer shapes: ``torch.is_autocast_enabled("meta")`` raises). Not asked with
    ``torch.amp.is_autocast_available``: torch 2.11's Dynamo cannot trace it (fullgraph compiles failed)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _to_host(value: Any) -> Any:
    """A statistic as :func:`mixcompile.stats` gives it: scalars as Python numbers, vectors on the CPU;
    None after a forward on the meta device (shapes, no values)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_meta:
        return None
    return value.item() if value.ndim == 0 else value.cpu()


def _check_compatible(experts: StackedExperts, dense: DenseFFN | None) -> None:
    if dense is None:
        return
    if not isinstance(dense, DenseFFN):
        raise TypeError(f"dense must be a mixcompile.DenseFFN, got {type(dense).__name__}.")
    problems = []
    if dense.d_model != experts.d_model:
        problems.append(f"d_model {dense.d_model} vs the block's {experts.d_model}")
    if dense.gated != experts.gated:
        problems.append(f"gated={dense.gated} vs the block's gated={experts.gated}")
    if dense.activation != experts.activation:
        problems.append(f"activation {dense.activation!r} vs the block's {experts.activation!r}")
    if dense.has_bias and not experts.bias:
        problems.append("the dense FFN has biases and the block has none (build it with bias=True)")
    if problems:
        raise ConfigError("the dense FFN does not fit this block: " + "; ".join(problems) + ".")
