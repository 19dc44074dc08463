"""``mixcompile.load``: rebuild a directory :func:`mixcompile.save` wrote, refusing anything it did not.

The manifest is validated field by field; the base is built as a skeleton (parameters on the meta device)
and the recipes replayed on it, so a manifest that would build something other than what the weights hold
(tampered sizes, another recipe) is refused before any parameter is allocated or any weight is read (buffers
are built for real: those a checkpoint does not hold are computed as the model computes them). The
saved tensors then become the model's parameters by assignment: each read once, in its saved dtype.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

from torch import nn

from mixcompile.errors import LoadError, MixcompileError, UnknownNameError, warn
from mixcompile.io.bases import build_base, install_hint, meta_copy
from mixcompile.io.files import path_argument
from mixcompile.io.hf import install_save_pretrained, read_generation_config
from mixcompile.io.manifest import Manifest, read_manifest
from mixcompile.io.weights import check_fits, load_weights, read_shapes
from mixcompile.plugins.manager import KINDS
from mixcompile.plugins.providers import changed_providers
from mixcompile.runtime.introspect import sparse_blocks

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
    directory = path_argument(path, "path", "the directory mixcompile.save wrote")
    manifest = read_manifest(directory)
    return load_manifest(manifest, base=base, trust_pickle=trust_pickle, trust_code=trust_code)


def load_manifest(
    manifest: Manifest, *, base: Base | None = None, trust_pickle: bool = False, trust_code: bool = False
) -> nn.Module:
    """:func:`load` of a read manifest. A plugin provided otherwise than when the model was saved (another
    package or version) may compute something else: said in a warning, or in the error of a failed load."""
    changes = changed_providers(manifest.plugins)
    try:
        model = _load(manifest, base=base, trust_pickle=trust_pickle, trust_code=trust_code)
    except LoadError as exc:
        if not changes:
            raise
        raise LoadError(f"{exc} Since the model was saved, {'; '.join(changes)}.") from None
    if changes:
        warn(
            f"{manifest.directory}: since the model was saved, {'; '.join(changes)}: the loaded model may "
            "compute something else than the saved one did."
        )
    return model


def _load(manifest: Manifest, *, base: Base | None, trust_pickle: bool, trust_code: bool) -> nn.Module:
    shapes = read_shapes(manifest.weights)
    if base is None:
        # the package that provided a builder base when the model was saved: named should it be missing
        provider = manifest.provider("builder", manifest.base.get("name", ""))
        model = build_base(
            manifest.base, trust_pickle=trust_pickle, trust_code=trust_code, meta=True, provider=provider
        )
        if model is None:  # a pickled base: unpickled for real (trust_pickle), checked on a meta copy
            model = build_base(manifest.base, trust_pickle=trust_pickle, trust_code=trust_code)
            assert model is not None
            check_fits(_replay(meta_copy(model), manifest), shapes, manifest.directory)
        model = _replay(model, manifest)  # on a skeleton, the blocks are skeletons too: nothing is filled
    else:
        model = _user_base(base)
        check_fits(_replay(meta_copy(model), manifest), shapes, manifest.directory)
        model = _replay(model, manifest)
    load_weights(model, manifest.weights)  # checks the fit (on a skeleton: before any weight is read)
    for block in sparse_blocks(model).values():  # assigned, not moved: choose for where the weights are
        block.choose_kernels()
    _apply_block_settings(model, manifest)
    read_generation_config(model, manifest.directory)
    model.mixcompile_base = manifest.base  # type: ignore[assignment]  # torch types __setattr__'s value too narrowly
    install_save_pretrained(model)
    return model


def skeleton(manifest: Manifest) -> nn.Module | None:
    """The model ``manifest`` describes, as a skeleton (parameters on the meta device), rebuilt as
    :func:`load` rebuilds it; ``None`` for a pickled base. For a base spec a caller of
    :func:`mixcompile.save` wrote themselves: its code is theirs, so it is imported (``trust_code``)."""
    with warnings.catch_warnings():  # convert warned once already, when the model was converted
        warnings.simplefilter("ignore")
        model = build_base(manifest.base, trust_pickle=False, trust_code=True, meta=True)
        return None if model is None else _replay(model, manifest)


def _apply_block_settings(model: nn.Module, manifest: Manifest) -> None:
    blocks = sparse_blocks(model)
    for path, settings in manifest.blocks.items():
        if path not in blocks:
            raise LoadError(f"{manifest.directory}: the manifest sets block {path!r}, which the model lacks.")
        try:
            blocks[path].apply_settings(settings)
        except UnknownNameError as exc:
            hint = f" {install_hint(manifest.provider(exc.kind, exc.name))}" if exc.kind == "kernel" else ""
            raise LoadError(f"{manifest.directory}: the settings of block {path!r}: {exc}{hint}") from None
        except MixcompileError as exc:
            raise LoadError(f"{manifest.directory}: the settings of block {path!r}: {exc}") from None


def _replay(model: nn.Module, manifest: Manifest) -> nn.Module:
    """The recipes, oldest first, then the recorded Token Choice switches (``mixcompile.to_token_choice``)."""
    from mixcompile.compiler import convert
    from mixcompile.runtime.transition import redo_token_choice

    for number, recipe in enumerate(manifest.recipes):
        try:
            model = convert(model, recipe, inplace=True, verify=False)
        except UnknownNameError as exc:
            if exc.kind not in KINDS:
                raise LoadError(f"{manifest.directory}: recipe {number} of the manifest: {exc}") from None
            raise LoadError(
                f"{manifest.directory} was converted with an unknown {exc.kind} here, {exc.name!r}: no "
                f"installed plugin registers it (known: {', '.join(exc.known) or 'none'}). "
                + install_hint(manifest.provider(exc.kind, exc.name))
            ) from None
        except MixcompileError as exc:
            raise LoadError(
                f"{manifest.directory}: recipe {number} of the manifest could not be applied to its base "
                f"model: {exc}"
            ) from None
    for path, settings in manifest.blocks.items():
        if "token_choice" in settings:
            try:
                redo_token_choice(model, path, settings["token_choice"])
            except MixcompileError as exc:
                raise LoadError(f"{manifest.directory}: {exc}") from None
    return model


def _user_base(base: Base) -> nn.Module:
    model = base() if callable(base) and not isinstance(base, nn.Module) else base
    if not isinstance(model, nn.Module):
        raise TypeError(f"base must be an nn.Module or a function returning one, got {type(model).__name__}.")
    return model
