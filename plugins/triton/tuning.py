"""Autotuning that fits the GPU it runs on and never benchmarks inside a CUDA graph capture.

- Configs whose shared memory (estimated from the tile shapes, an upper bound of what Triton allocates,
  as ``tests/kernels/test_kernel_resources.py`` checks against real compiles) exceeds the per-block limit
  of the GPU a launch runs on are pruned before Triton tries them, so no launch can fail with
  ``OutOfResources``.
- So are configs that would hold more than ``MAX_LIVE_VALUES`` fp32 tile values per thread at once
  (accumulators, the epilogue's loaded tiles, an FMA dot's operands): past that, ptxas spills to local memory
  (the same test compiles every variant and asserts no spills on sm_90). A kernel whose live values are one
  dot accumulator (``lone_accumulator``) may hold ``MAX_ACCUMULATOR_VALUES`` on sm_90 and later, where wgmma
  reads both operands from shared memory: 128 x 256 tiles at 8 warps, the tile Hopper GEMMs use.
- Before sm_90, three-product fp32 dots (``PRECISION="tf32x3"``) hold their split operands in registers, so
  their ``BLOCK_K`` is at most ``MAX_SPLIT_OPERAND_K`` there.
- Tuning results are cached on disk by Triton (``cache_results``), so a new process reuses them.
- A launch whose key is tuned skips Triton's ``Autotuner.run`` (its dicts of every argument, the key's
  strings, the config's keyword arguments rebuilt per call): 18 us of host time per launch on this
  project's CPU machine, with the launch itself stubbed out, against 4.6 us through the look-up here. At
  decode sizes host time is the step time, and a MoE training step makes seven such launches.
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
# Measured on sm_90 (ptxas via tests/kernels/test_kernel_resources.py --full): at 128 x 256 x 64, 8 warps,
# the grouped GEMM and weight-gradient kernels take 204-224 registers in every variant (bf16, fp16), the up
# projection (its epilogue in quarter tiles) 186-255, none spilling; the up projection's backward, whose
# epilogue loads more tiles, spills at that count.
MAX_ACCUMULATOR_VALUES = 128
# Before sm_90 (no wgmma), three-product fp32 dots keep their split operands in registers; measured on sm_80
# (ptxas): 64 x 64 x 64 tiles spill 36-732 bytes in the up and grouped GEMM kernels, 32 x 64 x 32 none.
MAX_SPLIT_OPERAND_K = 32
MAX_CONFIGS = 4  # tried per tuning key: each costs a compile and a benchmark on first use

Estimate = Callable[[triton.Config, dict], int]


def shared_memory_limit(device: torch.device) -> int:
    """What one block may use on ``device``: the GPU's figure, or the table's for Triton's current target."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return int(properties.shared_memory_per_block_optin)  # type: ignore[attr-defined]  # not in torch's stubs
    return SHARED_MEMORY_PER_BLOCK.get(compute_capability(device), min(SHARED_MEMORY_PER_BLOCK.values()))


def compute_capability(device: torch.device) -> int:
    """``90`` for an H100: the GPU's, or Triton's current target's (0 for a target that is not NVIDIA's)."""
    if device.type == "cuda" and torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    arch = driver.active.get_current_target().arch
    return arch if isinstance(arch, int) else 0


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
        self, fn, configs, key, shared_memory: Estimate, live_values: Estimate, reset_to_zero,
        lone_accumulator: bool, tiles_expert_rows: bool,
    ) -> None:  # fmt: skip
        super().__init__(
            fn, fn.arg_names, configs, key, reset_to_zero, None,
            prune_configs_by={"early_config_prune": self._fitting}, cache_results=True,
        )  # fmt: skip
        self.shared_memory = shared_memory
        self.live_values = live_values
        self.lone_accumulator = lone_accumulator
        self.tiles_expert_rows = tiles_expert_rows
        self._key_at = [(name, self.arg_names.index(name)) for name in self.keys]
        # launch key -> (Triton's key, its tuned config, the config's keyword arguments)
        self._tuned: dict[tuple, tuple[tuple, triton.Config, dict]] = {}

    def _fitting(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        device = _device(args)
        limit = shared_memory_limit(device)
        wgmma = compute_capability(device) >= 90
        live_limit = MAX_ACCUMULATOR_VALUES if self.lone_accumulator and wgmma else MAX_LIVE_VALUES
        max_k = MAX_SPLIT_OPERAND_K if args.get("PRECISION") == "tf32x3" and not wgmma else None
        if self.tiles_expert_rows:  # row blocks taller than an expert's rows compute padding: shortest first
            rows = args["ROWS_HINT"]
            configs = sorted(configs, key=lambda c: c.kwargs["BLOCK_M"] if c.kwargs["BLOCK_M"] > rows else 0)
        kept: dict[tuple, triton.Config] = {}
        for c in configs:  # the first config of each tile shape that fits, up to MAX_CONFIGS
            fits = self.shared_memory(c, args) <= limit and self.live_values(c, args) <= live_limit
            fits = fits and (max_k is None or c.kwargs.get("BLOCK_K", 0) <= max_k)
            if fits and len(kept) < MAX_CONFIGS:
                kept.setdefault((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]), c)
        if not kept:
            raise RuntimeError(
                f"{self.base_fn.__name__}: no config fits {limit} bytes of shared memory and "
                f"{live_limit} live values per thread"
            )
        return list(kept.values())

    def tuning_key(self, args: tuple, kwargs: dict) -> tuple:
        """The key ``run`` caches a tuned config under (Triton's rule: the named arguments, then dtypes)."""
        given = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
        named = {k: v for k, v in given.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        return tuple(key + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])

    def _launch_key(self, args: tuple, kwargs: dict) -> tuple:
        """What decides Triton's key (the key arguments' values, every argument's dtype), cheaply: the
        fast path's look-up key."""
        n = len(args)  # list comprehensions: about half the time of generators at these lengths
        values = tuple([args[i] if i < n else kwargs.get(name) for name, i in self._key_at])
        dtypes = tuple([getattr(a, "dtype", None) for a in args])
        return values, dtypes, tuple([getattr(v, "dtype", None) for v in kwargs.values()])

    def run(self, *args, **kwargs):
        launch_key = self._launch_key(args, kwargs)
        tuned = self._tuned.get(launch_key)
        # Checked against Triton's cache, which a caller may clear (the ahead-of-time checks do).
        if tuned is not None and self.cache.get(tuned[0]) is tuned[1]:
            return self.fn.run(*args, **kwargs, **tuned[2])
        key = self.tuning_key(args, kwargs)
        if len(self.configs) == 1 or not _capturing():
            result = super().run(*args, **kwargs)
            config = self.cache.get(key)
            if config is not None and config.pre_hook is None:
                self._tuned[launch_key] = (key, config, config.all_kwargs())
            return result
        config = self.cache.get(key)
        if config is None:
            self.nargs = dict(zip(self.arg_names, args, strict=False))
            config = self.prune_configs(kwargs)[0]
            self.nargs = None  # type: ignore[assignment]  # Triton's own attribute, reset as it does
        return self.fn.run(*args, **kwargs, **config.all_kwargs())


def autotune(configs: list[triton.Config], key: list[str], shared_memory: Estimate, live_values: Estimate,
             reset_to_zero: list[str] | None = None, lone_accumulator: bool = False,
             tiles_expert_rows: bool = False):  # fmt: skip
    """``triton.autotune`` with this module's pruning and capture rule; configs in order of preference.
    ``lone_accumulator``: the kernel's live values are one dot accumulator (its epilogue loads no other
    whole tile). ``tiles_expert_rows``: ``BLOCK_M`` blocks the rows each expert owns, about ``ROWS_HINT``;
    configs with taller blocks go after the others, shortest first, so that at decode sizes (a few rows
    per expert) the configs tried are the ones that do not compute mostly padding."""
    return lambda fn: Autotuner(
        fn, configs, key, shared_memory, live_values, reset_to_zero, lone_accumulator, tiles_expert_rows
    )
