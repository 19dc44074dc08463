"""Check a rewrite: the blocks take the inputs their FFNs took, return the same shapes, and, when the
initialisation preserves the function, the same values.

Probe inputs are the real inputs of each FFN when there are model inputs (the user's ``example_inputs`` or
inputs built from the model; captured with forward hooks on the unconverted model), otherwise random
tensors ``[B, T, d]`` of the FFN's feature size. Checks run in eval mode without gradients, and put every
module's mode back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from mixcompile.compiler.build import Replacement
from mixcompile.compiler.find import FFNSite
from mixcompile.compiler.recipe import Recipe
from mixcompile.compiler.report import ProbeSource
from mixcompile.errors import MixcompileError, PluginError, ShapeError, VerificationError
from mixcompile.runtime.blocks.base import Block
from mixcompile.runtime.tokens import token_mask


@dataclass
class SiteCheck:
    max_error: float | None  # max |block - dense| where the block should preserve the FFN's function
    source: ProbeSource


@contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration, each module's own mode restored after."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def run_model(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple | list):
        return model(*example_inputs)
    return model(example_inputs)


def capture_inputs(
    model: nn.Module, sites: list[FFNSite], example_inputs: Any
) -> tuple[dict[int, Any], dict[int, int], Any]:
    """Run ``model`` once; return each site's first real FFN input and how many times its module ran on
    the whole batch (by site index: a module shared by several layers, as in ALBERT, runs once per layer),
    and the model output.

    Calls on slices of one tensor (a feed-forward applied chunk by chunk) are one run: a run is a call
    whose input lives in storage no earlier call's did (the inputs are held until the end, so freed memory
    is not reused for the next one)."""
    captured: dict[int, torch.Tensor] = {}
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = []
    for site in sites:
        path = site.probe_module()
        if path is None:
            continue

        def hook(module: nn.Module, args: tuple[Any, ...], index: int = site.index) -> None:
            if args and isinstance(args[0], torch.Tensor):
                captured.setdefault(index, args[0].detach().clone())
                inputs.setdefault(index, []).append(args[0])

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with evaluation(model):
            output = run_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    calls = {index: len({_storage(x) for x in xs}) for index, xs in inputs.items()}
    return captured, calls, output


def _storage(x: torch.Tensor) -> tuple[torch.device, int]:
    return x.device, x.untyped_storage().data_ptr()


def random_probe(plan: Replacement, recipe: Recipe) -> torch.Tensor:
    ffn = plan.site.ffn
    batch = max(2, recipe.group_size) if recipe.strategy == "mot" else 2
    generator = torch.Generator(device=ffn.w_in.device).manual_seed(recipe.seed)
    return torch.randn(
        batch, 3, ffn.d_model, generator=generator, device=ffn.w_in.device, dtype=ffn.w_in.dtype
    )


def check_site(
    plan: Replacement, x: torch.Tensor, *, preserving: bool, source: ProbeSource, batch: int | None = None
) -> SiteCheck:
    """Run the block and the dense FFN on ``x`` (``batch`` sequences, which a block on flattened tokens
    needs told); shapes must agree, values are compared when ``preserving`` (see
    :func:`mixcompile.compiler.build.function_preserving`)."""
    site = plan.site
    with evaluation(plan.block), token_mask(plan.block, None, batch=batch or 1):
        try:
            y = plan.block(x)
        except MixcompileError as exc:  # a plugin's fault, a bad option: keeps its type (PluginError, ...)
            where = f"FFN site {site.index} at {site.label!r}, on a probe of shape {tuple(x.shape)}"
            raise exc.prefixed(where) from exc
        except Exception as exc:
            raise MixcompileError(
                f"FFN site {site.index} at {site.label!r}: the new block failed on a probe of shape "
                f"{tuple(x.shape)}: {type(exc).__name__}: {exc}"
            ) from exc
        reference = site.ffn.forward(x)
    if not isinstance(y, torch.Tensor) or y.shape != reference.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ShapeError(
            f"FFN site {site.index} at {site.label!r}: the block returned {got} where the dense FFN "
            f"returns {tuple(reference.shape)}."
        )
    _check_finite(plan, x, y, reference)
    if not preserving:
        return SiteCheck(None, source)
    mismatch = tensor_disagreement(reference, y)
    if mismatch is not None:
        rewrite = f" ({site.rewrite.describe()})" if site.rewrite is not None else ""
        raise VerificationError(
            f"FFN site {site.index} at {site.label!r}{rewrite}: the block built for it should compute the "
            f"dense FFN (its experts are copies of the FFN and its router's weights sum to 1 per token), but "
            f"on a probe of shape {tuple(x.shape)} its output {mismatch}."
        )
    return SiteCheck(float((y - reference).abs().max()) if y.numel() else None, source)


def _check_finite(plan: Replacement, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor) -> None:
    """A block whose output is NaN or inf where the dense FFN's is finite would make a model that computes
    nothing; its plugins are at fault (float16 may overflow to inf legitimately: only NaN there). Not
    judged on a probe that holds NaN or inf itself: a MoT block mixes it into its group-mates' rows."""
    if not torch.isfinite(x).all():
        return
    finite = torch.isfinite(reference)
    bad = (torch.isnan(y) if y.dtype == torch.float16 else ~torch.isfinite(y)) & finite
    if not bad.any():
        return
    block, site = plan.block, plan.site
    named = [
        f"{kind} {getattr(block, attribute)!r}"
        for kind, attribute in (("router", "router_name"), ("mixer", "mixer_name"))
        if hasattr(block, attribute)
    ]
    if isinstance(block, Block):  # the kernel that ran, not "auto"
        named.append(f"kernel {block.kernel_for(x.device, x.dtype)!r}")
    raise PluginError(
        f"FFN site {site.index} at {site.label!r}: the block built for it returned NaN or inf at "
        f"{int(bad.sum())} of {int(finite.sum())} values where the dense FFN's are finite, on a probe of "
        f"shape {tuple(x.shape)}; one of its plugins ({', '.join(named)}, or the initializer) computes them. "
        "Run the block under mixcompile.debug_checks() to see where they first appear."
    )


def output_error(before: Any, after: Any) -> float | None:
    """Max absolute difference over the floating tensors of two model outputs of the same structure."""
    left, right = _float_leaves(before), _float_leaves(after)
    if (
        not left
        or len(left) != len(right)
        or any(a.shape != b.shape for a, b in zip(left, right, strict=True))
    ):
        return None
    gaps = [float((a - b).abs().max()) for a, b in zip(left, right, strict=True) if a.numel()]
    return max(gaps) if gaps else None  # an empty batch: nothing to compare


def disagreement(reference: Any, output: Any) -> str | None:
    """Where a model's ``output`` differs from its ``reference`` by more than rounding (see
    :func:`tensor_disagreement`), or ``None``."""
    left, right = _float_leaves(reference), _float_leaves(output)
    if len(left) != len(right) or any(a.shape != b.shape for a, b in zip(left, right, strict=True)):
        return "output changed its structure"
    for index, (a, b) in enumerate(zip(left, right, strict=True)):
        mismatch = tensor_disagreement(a, b)
        if mismatch is not None:
            return f"output tensor {index} of shape {tuple(a.shape)} {mismatch}"
    return None


def tensor_disagreement(reference: torch.Tensor, value: torch.Tensor) -> str | None:
    """How ``value`` differs from ``reference`` by more than rounding, or ``None``.

    Rounding here is what a function-preserving block adds: its experts' outputs summed with weights that
    sum to 1 (a relative ``1e-3`` of the tensor's largest value in float32 and wider; ``0.1`` in 16-bit
    floats, which keep 8-11 bits and pass the difference on through every later layer). A rewrite that
    changed anything besides the FFN is off by far more (0.1-40 in the cases seen). Positions where the
    reference itself is not finite are not compared."""
    finite = torch.isfinite(reference)  # where the dense model overflows (T5 in float16), nothing to hold
    if not finite.any():
        return None
    rtol = 1e-3 if reference.dtype.itemsize >= 4 else 1e-1
    scale = float(reference[finite].abs().max())
    diff = float((reference[finite].double() - value[finite].double()).abs().max())
    if diff <= rtol * scale + 1e-6:  # False for NaN
        return None
    return f"differs by {diff:.3g} (its largest value is {scale:.3g})"


def _float_leaves(output: Any) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(_plain(output))
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _plain(output: Any) -> Any:
    """HF ``ModelOutput`` s are dicts with extra behaviour; compare their tensor fields."""
    if isinstance(output, Mapping):
        return {key: _plain(value) for key, value in output.items() if not hasattr(value, "get_seq_length")}
    if isinstance(output, tuple | list):
        return [_plain(value) for value in output]
    return output
