"""``mixcompile.save``: a converted model as a directory, without pickles.

::

    mixcompile.json      manifest: mixcompile version, the recipes applied, how to rebuild the base model
    model.safetensors    every weight of the converted model
    config.json          (Hugging Face bases only) the same manifest as transformers reads it (see
                         mixcompile.io.hf), and mixcompile_hf.py, the loader it names
    generation_config.json  (transformers models that generate) the model's generation settings
    base.pt              (pickled bases only) the pickled unconverted module; loading it needs trust_pickle

The directory is written beside its destination and moved into place when complete (see
:func:`mixcompile.io.files.output_directory`): a failure or an interrupt leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from mixcompile.errors import ConfigError, LoadError
from mixcompile.io.bases import KINDS, base_spec_of, stored_spec
from mixcompile.io.files import output_directory, path_argument
from mixcompile.io.hf import write_generation_config, write_hf_files
from mixcompile.io.manifest import MANIFEST, WEIGHTS, manifest_data, parse_manifest
from mixcompile.io.weights import misfits, stored_shapes
from mixcompile.runtime.introspect import sparse_blocks, unwrapped


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    base: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a converted ``model`` to the directory ``path``.

    An existing ``path`` is refused, unless ``overwrite`` and it is a model directory (one mixcompile or
    ``save_pretrained`` wrote); its old content goes only once the new one is complete. ``base`` says how to
    rebuild the unconverted model (see :mod:`mixcompile.io.bases`); by default it is what a builder,
    ``convert`` or ``load`` recorded, or the model's Hugging Face config.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(model).__name__}.")
    directory = path_argument(path, "path", "the directory to write the model to")
    model = unwrapped(model)  # a compiled or data-parallel model is saved as the model it wraps
    spec = base or base_spec_of(model)
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ConfigError(f"base must be a base spec with a 'kind' in {KINDS}, got {spec!r}.")
    recipes = recipes_to_save(model)  # refuse before touching the file system
    if base is not None:  # a spec the caller wrote: refused, before anything is written, if a load would be
        _check_rebuilds(model, recipes, base, directory)
    with output_directory(directory, overwrite=overwrite) as out:
        write_model(model, out.path, spec)
        out.commit()
    return directory


def _check_rebuilds(model: nn.Module, recipes: list[Any], base: dict[str, Any], directory: Path) -> None:
    """What :func:`mixcompile.load` would check of the directory, checked in memory: the manifest read
    back from its JSON, the model it describes built as a skeleton and its state dict against ``model``'s."""
    from mixcompile import __version__
    from mixcompile.io.loading import skeleton  # loading replays recipes through the compiler

    if base["kind"] == "pickle":  # the module itself is saved (trust_pickle): there is nothing to rebuild
        return
    data = manifest_data(recipes, stored_spec(base, directory), __version__, block_settings(model))
    try:
        written = json.loads(json.dumps(data))
    except (TypeError, ValueError) as exc:  # the recipes are checked at convert: the base's kwargs
        raise ConfigError(
            f"base={base!r}: its kwargs must be JSON values (a manifest holds them): {exc}."
        ) from None
    try:
        manifest = parse_manifest(written, directory, "its manifest", [])
        rebuilt = skeleton(manifest)
    except Exception as exc:  # a LoadError, or what the caller's builder raised on the meta device
        said = str(exc) if isinstance(exc, LoadError) else f"building it raised {type(exc).__name__}: {exc}"
        raise ConfigError(f"base={base!r} does not rebuild this model (a load would fail): {said}") from None
    if rebuilt is None:  # a model built in Python (external): the load is handed it
        return
    wrong = misfits(rebuilt, stored_shapes(model))
    if wrong:
        raise ConfigError(
            f"base={base!r} does not rebuild this model (a load would fail): the model it builds does not "
            f"fit this model's weights: {wrong}."
        )


def write_model(model: nn.Module, directory: Path, base: dict[str, Any]) -> None:
    """Fill the (new, empty) ``directory`` with ``model``'s weights and manifest."""
    from mixcompile import __version__

    recipes = recipes_to_save(model)
    stored = stored_spec(base, directory)
    save_model(model, str(directory / WEIGHTS))
    manifest = manifest_data(recipes, stored, __version__, block_settings(model))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if stored["kind"] == "transformers":
        write_hf_files(directory, manifest)
    write_generation_config(model, directory)


def block_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each sparse block's settings that may have changed since conversion (MoT mode, temperature)."""
    from mixcompile.runtime.introspect import sparse_blocks

    settings = {path: block.settings() for path, block in sparse_blocks(model).items()}
    return {path: values for path, values in settings.items() if values}


def recipes_to_save(model: nn.Module) -> list[Any]:
    """The recipes a directory of ``model`` records; a model that cannot be saved whole is refused here,
    before anything is written."""
    from mixcompile.compiler import recipes_of

    recipes = recipes_of(model)
    if not recipes:
        raise ConfigError(
            "this model was not converted by mixcompile (no recipe recorded); convert it first."
        )
    refuse_sharded_experts(model)
    refuse_distributed_tensors(model)
    refuse_meta_tensors(model)
    return recipes


def refuse_sharded_experts(model: nn.Module) -> None:
    """A block sharded by expert parallelism holds E/W experts: a directory of it would not load."""
    for path, block in sparse_blocks(model).items():
        runner = getattr(block, "expert_parallel", None)
        if runner is not None:
            raise ConfigError(
                f"the MoE block at {path!r} holds only this rank's experts ({runner}), sharded by "
                "mixcompile.distributed.parallelize, and a saved directory needs every expert: save before "
                "parallelize, or save each rank's torch.save(model.state_dict()) and load it into a model "
                "parallelized the same way."
            )


def refuse_distributed_tensors(model: nn.Module) -> None:
    """A DTensor (an FSDP2 shard) holds only this rank's part, and safetensors cannot read its storage
    (it failed with "Attempted to access the data pointer on an invalid python storage")."""
    names = distributed_tensor_names(model)
    if names:
        raise ConfigError(
            f"{type(model).__name__} has {len(names)} parameters or buffers that are sharded DTensors "
            f"({names[0]!r} first; FSDP2's fully_shard makes them), each holding only this rank's shard, and "
            "a saved directory needs full tensors. Save before fully_shard, or gather a full state dict on "
            "every rank (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True)); rank 0 gets the tensors), "
            "load it into an unsharded copy of the converted model (the same convert of the same base) and "
            "save that on rank 0."
        )


def distributed_tensor_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters and buffers that are ``torch.distributed`` DTensors."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.tensor import DTensor

    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in tensors if isinstance(tensor, DTensor)]


def refuse_meta_tensors(model: nn.Module) -> None:
    """Tensors on the meta device have no values to write."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    skeleton = [name for name, tensor in tensors if tensor.is_meta]
    if skeleton:
        raise ConfigError(
            f"{type(model).__name__} has {len(skeleton)} tensors on the meta device ({skeleton[0]!r} first): "
            "a structure without values, nothing to save. Fill them first (load_state_dict(state, "
            "assign=True), or to_empty(device=...) and an initialisation), then save."
        )
