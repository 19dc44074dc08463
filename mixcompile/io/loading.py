"""``mixcompile.load``: rebuild a directory :func:`mixcompile.save` wrote, refusing anything it did not.

The manifest is validated field by field; the base is first built on the meta device (no memory) and the
recipes replayed on it, so a manifest that would build something other than what the weights file holds
(tampered sizes, another recipe) is refused before anything large is allocated or any weight is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mixcompile.errors import LoadError, MixcompileError
from mixcompile.io.bases import build_base, meta_copy
from mixcompile.io.manifest import Manifest, read_manifest
from mixcompile.io.weights import check_fits, load_weights, read_shapes

Base = nn.Module | Callable[[], nn.Module]


def load(
    path: str | os.PathLike[str],
    *,
    base: Base | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild a model written by :func:`mixcompile.save`; its outputs equal the saved model's.

    ``base``: the unconverted model (a module, converted in place, or a function building one). Without it
    the manifest's base spec is used: a registered builder or a Hugging Face config (nothing runs but
    installed code), an imported function (``trust_code``) or a pickled module (``trust_pickle``).
    """
    return load_manifest(
        read_manifest(Path(path)), base=base, trust_pickle=trust_pickle, trust_code=trust_code
    )


def load_manifest(
    manifest: Manifest, *, base: Base | None = None, trust_pickle: bool = False, trust_code: bool = False
) -> nn.Module:
    shapes = read_shapes(manifest.weights)
    skeleton = None
    if base is None:
        skeleton = build_base(manifest.base, trust_pickle=trust_pickle, trust_code=trust_code, meta=True)
    if skeleton is not None:
        check_fits(_replay(skeleton, manifest), shapes, manifest.weights)
    model = (
        _user_base(base)
        if base is not None
        else build_base(manifest.base, trust_pickle=trust_pickle, trust_code=trust_code)
    )
    assert model is not None  # build_base gives None only for meta=True
    if skeleton is None:  # a pickled or user-given base: check its structure before allocating experts
        check_fits(_replay(meta_copy(model), manifest), shapes, manifest.weights)
    model = _replay(model, manifest)
    model.mixcompile_base = manifest.base  # type: ignore[assignment]  # torch types __setattr__'s value too narrowly
    load_weights(model, manifest.weights)
    return model


def _replay(model: nn.Module, manifest: Manifest) -> nn.Module:
    from mixcompile.compiler import convert

    for number, recipe in enumerate(manifest.recipes):
        try:
            model = convert(model, recipe, inplace=True, verify=False)
        except MixcompileError as exc:
            raise LoadError(
                f"{manifest.directory}: recipe {number} of the manifest does not fit its base model: {exc}"
            ) from None
    return model


def _user_base(base: Base) -> nn.Module:
    model = base() if callable(base) and not isinstance(base, nn.Module) else base
    if not isinstance(model, nn.Module):
        raise TypeError(f"base must be an nn.Module or a function returning one, got {type(model).__name__}.")
    return model
