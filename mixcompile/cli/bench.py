"""Timing a converted model against its base on the current device (the ``bench`` command)."""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mixcompile.cli.probe import output_tensor
from mixcompile.compiler.probe import example_inputs
from mixcompile.errors import ConfigError, MixcompileError
from mixcompile.io.bases import build_base
from mixcompile.io.reading import LoadedModel


def bench_models(
    loaded: LoadedModel,
    recipe: Any,
    *,
    batch: int,
    seq: int,
    steps: int,
    device: str,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> str:
    """A table of forward and forward+backward times, base vs converted, measured in the same run.

    Rebuilding a saved model's base obeys the same trust flags as reading the model did; a converted model
    comes without a recipe (the command refuses recipe options for one before reading it)."""
    from mixcompile.compiler import convert

    if loaded.kind == "mixcompile":
        assert recipe is None  # refused by the command
        base = build_base(loaded.base, trust_pickle=trust_pickle, trust_code=trust_code)
        assert base is not None  # only a meta build gives None
        converted = loaded.model
        dtype = main_dtype(converted)
        if dtype is not None and main_dtype(base) != dtype:  # a base that does not record its dtype
            base = base.to(dtype)
    else:
        if recipe is None:
            raise ConfigError("to bench an unconverted model, say how to convert it: --strategy moe|mot.")
        base = loaded.model
        converted = convert(copy.deepcopy(base), recipe, inplace=True)
    rows = []
    for name, model in (("base", base), ("converted", converted)):
        model = model.to(device)
        try:
            inputs = example_inputs(model, batch=batch, seq=seq, device=device)
            fwd = _median_ms(functools.partial(_forward, model, inputs), steps, device)
            train = _median_ms(functools.partial(_train_step, model, inputs), steps, device)
        except ConfigError as exc:  # no inputs or no output tensor: the model's problem (exit 1), no usage's
            raise MixcompileError(str(exc)) from exc
        params = sum(p.numel() for p in model.parameters())
        dtype_name = str(main_dtype(model)).removeprefix("torch.")
        rows.append((name, dtype_name, params, fwd, train))
    base_row = rows[0]
    lines = [
        f"device: {device}, batch {batch}, sequence {seq}, median of {steps} steps; "
        "ratios are time / base time (below 1 is faster)",
        f"{'model':<10} {'dtype':>9} {'params':>12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd ratio':>10} "
        f"{'train ratio':>12}",
    ]
    for name, dtype_name, params, fwd, train in rows:
        lines.append(
            f"{name:<10} {dtype_name:>9} {params:>12,} {fwd:>9.2f} {train:>11.2f} "
            f"{fwd / base_row[3]:>10.2f} {train / base_row[4]:>12.2f}"
        )
    return "\n".join(lines)


def main_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype holding most of ``model``'s parameters (a few may be kept in float32)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=lambda dtype: counts[dtype]) if counts else None


def _forward(model: nn.Module, inputs: dict[str, Any]) -> None:
    model.eval()
    with torch.no_grad():
        model(**inputs)


def _train_step(model: nn.Module, inputs: dict[str, Any]) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    output_tensor(model(**inputs)).float().square().mean().backward()


def _median_ms(step: Callable[[], None], steps: int, device: str) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(max(1, steps)):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
