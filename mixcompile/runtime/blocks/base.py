"""What MoE and MoT blocks share: kernel choice, checks of plugin outputs, loading dense weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixcompile.errors import ConfigError, ShapeError
from mixcompile.plugins.build import PluginKind, Source, call_factory, describe_plugin, plugin_source
from mixcompile.plugins.manager import lookup
from mixcompile.runtime.checks import check_input
from mixcompile.runtime.experts import StackedExperts
from mixcompile.runtime.ffn import DenseFFN
from mixcompile.runtime.kernels import Kernel, get_kernel, resolve_kernel
from mixcompile.types import BlockKind


class Block(nn.Module):
    """Base of the sparse blocks: holds the experts, the kernel choice, checks of plugin outputs, stats."""

    kind: BlockKind = ""  # type: ignore[assignment]  # the base has no kind; MoEBlock and MoTBlock set theirs
    experts: StackedExperts

    def __init__(self, kernel: str, site: str = "") -> None:
        super().__init__()
        self.site = site  # where the block sits in its model (convert sets it): errors name it
        if kernel != "auto":
            get_kernel(kernel)  # unknown names fail at construction, with a suggestion
        self.kernel = kernel
        self._stats: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        """The block's settings that can change after it is built (JSON-safe), for a save to keep."""
        return {}

    def apply_settings(self, settings: dict[str, Any]) -> None:
        """Restore :meth:`settings` (as a load does); unknown names and bad values raise ``ConfigError``."""
        if settings:
            raise ConfigError(f"{type(self).__name__} has no settings {sorted(settings)}.")

    @property
    def last_stats(self) -> dict[str, Any]:
        """Statistics of the last forward as Python numbers (``expert_load`` a CPU tensor).

        The forward keeps them as tensors where it computed them, so it neither waits for the device nor
        breaks a ``torch.compile`` graph; they are read back here, when asked for.
        """
        return {key: _to_host(value) for key, value in self._stats.items()}

    def kernel_for(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """The name of the kernel this block runs with on ``device``/``dtype`` (resolves ``auto``)."""
        return resolve_kernel(self.kernel, self.kind, torch.device(device), dtype)[0]

    @staticmethod
    def _compute_input(x: torch.Tensor) -> torch.Tensor:
        """``x`` in the autocast dtype when autocast is on: the block then computes in, and returns, the
        dtype the dense FFN's linears would have, and its kernel sees one dtype for inputs and weights."""
        device_type = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(device_type):
            return x.to(torch.get_autocast_dtype(device_type))
        return x

    def _kernel(self, x: torch.Tensor) -> tuple[str, Kernel]:
        return resolve_kernel(self.kernel, self.kind, x.device, x.dtype)

    def _source(self, kind: PluginKind, name: str) -> Source:
        """How errors name this block's plugin, computed only when one is raised (see ``Source``)."""
        return lambda: describe_plugin(kind, name, self.site)

    def _check_input(self, x: torch.Tensor, ranks: str, ok_rank: bool) -> None:
        if not isinstance(x, torch.Tensor):
            raise ShapeError(f"{self._name()} expects a tensor, got {type(x).__name__}.")
        if not ok_rank or x.shape[-1] != self.experts.d_model:
            raise ShapeError(
                f"{self._name()} expects inputs of shape {ranks} with d={self.experts.d_model} features, "
                f"got {tuple(x.shape)}."
            )
        check_input(x, lambda: f"the block at {self.site}" if self.site else type(self).__name__)

    def _name(self) -> str:
        return f"{type(self).__name__} at {self.site}" if self.site else type(self).__name__

    def load_dense(
        self,
        dense: DenseFFN,
        init: str = "upcycle",
        generator: torch.Generator | None = None,
        **init_options: Any,
    ) -> None:
        """Fill the experts from a dense FFN with the initializer plugin ``init``."""
        _check_compatible(self.experts, dense)
        registration = lookup("initializer", init)
        source = plugin_source("initializer", init, registration.plugin, self.site)
        options = {"generator": generator, **init_options}
        with torch.no_grad():
            call_factory(registration.factory, source, (self.experts, dense), options)


def _to_host(value: Any) -> Any:
    """A statistic as :func:`mixcompile.stats` gives it: scalars as Python numbers, vectors on the CPU."""
    if not isinstance(value, torch.Tensor):
        return value
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
