"""Weights files: checked against the model they must fill before anything large is read, then loaded
into it by assignment (each tensor read once, in its saved dtype; no second copy of the model).

Each file is one a manifest named inside its directory (:func:`~mixcompile.io.files.confined_file`), and is
read through the descriptor checked there (:func:`~mixcompile.io.files.reopenable`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mixcompile.errors import LoadError, first_line
from mixcompile.io.files import reopenable

Shapes = dict[str, tuple[int, ...]]


def read_shapes(files: list[Path]) -> Shapes:
    """Tensor names and shapes from safetensors headers (memory-mapped; no tensor is read)."""
    shapes: Shapes = {}
    for file in files:
        try:
            with (
                reopenable(file, "weights file", within=file.parent) as readable,
                safe_open(readable, framework="pt") as handle,
            ):
                for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    if name in shapes:
                        raise LoadError(f"{file} holds {name!r} again (it is in another weights file too).")
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise LoadError(f"{file} is corrupt or truncated: {first_line(exc)}") from None
    return shapes


def check_fits(model: nn.Module, shapes: Shapes, where: Path) -> None:
    """The weights in ``where`` (``shapes``) cover ``model`` exactly: see :func:`misfits`."""
    wrong = misfits(model, shapes)
    if wrong:
        raise LoadError(
            f"the weights in {where} do not fit the model its manifest describes: {wrong} "
            "(was it saved by another recipe or base, or edited?)."
        )


def misfits(model: nn.Module, shapes: Shapes) -> str:
    """How weights of ``shapes`` fail to cover ``model`` exactly (missing, unexpected or misshapen
    tensors), in words; "" when they fit. Tied tensors need only one of their names (safetensors stores a
    shared tensor once)."""
    groups = _tied_groups(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    missing = [names[0] for names in groups if not any(n in shapes for n in names)]
    unexpected = [name for name in shapes if name not in expected]
    misshapen = [
        f"{name} {shapes[name]} (the model has {expected[name]})"
        for name in shapes
        if name in expected and shapes[name] != expected[name]
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors, first {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, first {unexpected[0]!r}")
    if misshapen:
        parts.append(f"{len(misshapen)} of another shape, first {misshapen[0]}")
    return "; ".join(parts)


def load_weights(model: nn.Module, files: list[Path]) -> None:
    """Put the saved tensors into ``model`` by assignment, keeping their dtypes and the model's ties.

    ``model`` may hold its parameters on the meta device (a skeleton): every one is replaced; any tensor
    still on meta afterwards is one the files do not hold, and is refused by name.
    """
    check_fits(model, read_shapes(files), files[0].parent)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with (
                reopenable(file, "weights file", within=file.parent) as readable,
                safe_open(readable, framework="pt") as handle,
            ):
                for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    tensors[name] = _aligned(handle.get_tensor(name))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise LoadError(f"{file} is corrupt or truncated: {first_line(exc)}") from None
    ties = _tied_groups(model)
    for names in ties:  # a tied tensor is stored once: give every name the stored one
        stored = next(tensors[n] for n in names if n in tensors)
        for name in names:
            tensors.setdefault(name, stored)
    model.load_state_dict(tensors, strict=True, assign=True)
    _retie(model, ties)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LoadError(
            f"the weights in {files[0].parent} leave {left[0]!r} (and {len(left) - 1} more) unset."
        )


def stored_shapes(model: nn.Module) -> Shapes:
    """The tensor names and shapes a save of ``model`` writes: one name per group of tied tensors
    (safetensors stores a shared tensor once), which is what a load checks the model it rebuilds against."""
    state = model.state_dict(keep_vars=True)
    return {names[0]: tuple(state[names[0]].shape) for names in _tied_groups(model)}


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory as torch allocates it (64-byte aligned). safetensors 0.8 hands tensors back at
    any address, and CPU BLAS takes another path, with another rounding, for some of those: a loaded
    model's outputs differed from the saved model's in the last bit (a GEMV of Qwen2-MoE's shared-expert
    gate). Such a tensor is copied, one at a time."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (one name per group for untied tensors)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """After assignment each name holds its own parameter object; make tied names share one again, as
    the model had them (an optimizer must see a tied weight once)."""
    for names in groups:
        if len(names) < 2:
            continue
        first_owner, first_attr = _owner(model, names[0])
        shared = getattr(first_owner, first_attr)
        for name in names[1:]:
            owner, attr = _owner(model, name)
            if attr in owner._parameters:
                owner._parameters[attr] = shared
            else:
                owner._buffers[attr] = shared


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr
