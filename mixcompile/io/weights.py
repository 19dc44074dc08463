"""Weights files: checked against the model they must fill before anything large is built or read."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn

from mixcompile.errors import LoadError, first_line
from mixcompile.io.files import check_regular_file

Shapes = dict[str, tuple[int, ...]]


def read_shapes(file: Path) -> Shapes:
    """Tensor names and shapes from a safetensors header (memory-mapped; no tensor is read)."""
    check_regular_file(file, "weights file")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{file} is corrupt or truncated: {first_line(exc)}") from None


def check_fits(model: nn.Module, shapes: Shapes, file: Path) -> None:
    """The weights in ``file`` (``shapes``) cover ``model`` exactly: no missing, unexpected or misshapen
    tensor. Tied tensors need only one of their names (safetensors stores a shared tensor once)."""
    groups: dict[int, list[str]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        expected[name] = tuple(tensor.shape)
    missing = [names[0] for names in groups.values() if not any(n in shapes for n in names)]
    unexpected = [name for name in shapes if name not in expected]
    misshapen = [
        f"{name} {shapes[name]} (the model has {expected[name]})"
        for name in shapes
        if name in expected and shapes[name] != expected[name]
    ]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors, first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, first {unexpected[0]!r}")
        if misshapen:
            parts.append(f"{len(misshapen)} of another shape, first {misshapen[0]}")
        raise LoadError(
            f"{file} does not fit the model its manifest describes: {'; '.join(parts)} "
            "(was it saved by another recipe or base, or edited?)."
        )


def load_weights(model: nn.Module, file: Path) -> None:
    """Load safetensors weights strictly; corrupt, truncated or mismatched files get a one-line error."""
    check_fits(model, read_shapes(file), file)
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{file} is corrupt or truncated: {first_line(exc)}") from None
    except RuntimeError as exc:
        raise LoadError(f"{file} does not fit the rebuilt model: {first_line(exc)}") from None
    if missing or unexpected:
        raise LoadError(
            f"{file} does not fit the rebuilt model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}."
        )
