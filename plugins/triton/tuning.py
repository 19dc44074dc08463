"""Autotuning that fits the GPU it runs on and never benchmarks inside a CUDA graph capture.

- Configs whose shared memory (estimated from the tile shapes, an upper bound of what Triton allocates, as
  ``tests/test_kernel_resources.py`` checks against real compiles) exceeds the per-block limit of the GPU a
  launch runs on are pruned before Triton tries them, so no launch can fail with ``OutOfResources``.
- So are configs that would hold more than ``MAX_LIVE_VALUES`` fp32 tile values per thread at once
  (accumulators, the epilogue's loaded tiles, an FMA dot's operands): past that, ptxas spills to local memory
  (the same test compiles every variant and asserts no spills on sm_90).
- Tuning results are cached on disk by Triton (``cache_results``), so a new process reuses them.
- During CUDA-graph capture nothing is benchmarked (the trials would be captured into the graph): a key
  tuned before capture reuses its result; an untuned one launches the first config that fits, without
  recording it as tuned. Run one step eagerly before capturing to capture the tuned configs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
from triton.runtime import driver

# Per-block opt-in shared memory (bytes) by compute capability, for when no GPU can be asked (ahead-of-time
# checks); on a GPU the device's own figure is used. Unknown archs get the smallest.
SHARED_MEMORY_PER_BLOCK = {
    75: 65536,
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    103: 232448,
    120: 101376,
}

MAX_LIVE_VALUES = 96
MAX_CONFIGS = 4  # tried per tuning key: each costs a compile and a benchmark on first use

Estimate = Callable[[triton.Config, dict], int]


def shared_memory_limit(device: torch.device) -> int:
    """What one block may use on ``device``: the GPU's figure, or the table's for Triton's current target."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return int(properties.shared_memory_per_block_optin)  # type: ignore[attr-defined]  # not in torch's stubs
    arch = driver.active.get_current_target().arch
    return SHARED_MEMORY_PER_BLOCK.get(arch, min(SHARED_MEMORY_PER_BLOCK.values()))


def _device(args: dict) -> torch.device:
    return next(a.device for a in args.values() if isinstance(a, torch.Tensor))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Autotuner(triton.runtime.Autotuner):  # type: ignore[misc]  # Triton ships no types
    """Triton's autotuner, pruning by ``shared_memory(config, args)`` (bytes) and
    ``live_values(config, args)`` (fp32 values per thread), keeping one config per ``BLOCK_M x BLOCK_N``
    shape (the first in the list that fits: more warps or fewer stages come later as fallbacks) and at most
    ``MAX_CONFIGS``, and not tuning under graph capture."""

    def __init__(
        self, fn, configs, key, shared_memory: Estimate, live_values: Estimate, reset_to_zero
    ) -> None:
        super().__init__(
            fn, fn.arg_names, configs, key, reset_to_zero, None,
            prune_configs_by={"early_config_prune": self._fitting}, cache_results=True,
        )  # fmt: skip
        self.shared_memory = shared_memory
        self.live_values = live_values

    def _fitting(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        limit = shared_memory_limit(_device(args))
        kept: dict[tuple, triton.Config] = {}
        for c in configs:  # the first config of each tile shape that fits, up to MAX_CONFIGS
            fits = self.shared_memory(c, args) <= limit and self.live_values(c, args) <= MAX_LIVE_VALUES
            if fits and len(kept) < MAX_CONFIGS:
                kept.setdefault((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]), c)
        if not kept:
            raise RuntimeError(
                f"{self.base_fn.__name__}: no config fits {limit} bytes of shared memory and "
                f"{MAX_LIVE_VALUES} live values per thread"
            )
        return list(kept.values())

    def tuning_key(self, args: tuple, kwargs: dict) -> tuple:
        """The key ``run`` caches a tuned config under (Triton's rule: the named arguments, then dtypes)."""
        given = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
        named = {k: v for k, v in given.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        return tuple(key + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])

    def run(self, *args, **kwargs):
        if len(self.configs) == 1 or not _capturing():
            return super().run(*args, **kwargs)
        config = self.cache.get(self.tuning_key(args, kwargs))
        if config is None:
            self.nargs = dict(zip(self.arg_names, args, strict=False))
            config = self.prune_configs(kwargs)[0]
            self.nargs = None  # type: ignore[assignment]  # Triton's own attribute, reset as it does
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def autotune(configs: list[triton.Config], key: list[str], shared_memory: Estimate, live_values: Estimate,
             reset_to_zero: list[str] | None = None):  # fmt: skip
    """``triton.autotune`` with this module's pruning and capture rule; configs in order of preference."""
    return lambda fn: Autotuner(fn, configs, key, shared_memory, live_values, reset_to_zero)
