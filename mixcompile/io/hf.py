"""Hugging Face directories of converted models: what ``config.json`` says, so nothing reads them as the
dense model.

A converted transformers model, saved by :func:`mixcompile.save` or by its own ``save_pretrained``, gets a
``config.json`` whose ``model_type`` is ``"mixcompile"`` (unknown to transformers), whose ``auto_map`` names
the loader in ``mixcompile_hf.py`` (copied beside it), and whose ``"mixcompile"`` section is the manifest:
the recipes and the original config. ``AutoModel*.from_pretrained`` then either rebuilds the converted
model (``trust_remote_code=True``, through ``mixcompile.load``) or refuses; it can no longer build the dense
architecture and fill its FFNs with random weights.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from mixcompile.errors import ConfigError, LoadError, first_line
from mixcompile.io.files import confined_file, read_json_object
from mixcompile.io.manifest import HF_CONFIG, HF_MODEL_TYPE, manifest_data

REMOTE_CODE = "mixcompile_hf.py"
GENERATION_CONFIG = "generation_config.json"
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForMaskedLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForImageClassification",
)


def is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def write_hf_files(directory: Path, manifest: dict[str, Any]) -> None:
    """The converted model's ``config.json`` and the loader it names, in ``directory``."""
    loads = _auto_classes_of(manifest["base"])
    auto_map = {
        name: "mixcompile_hf.MixcompileModel" if name in loads else "mixcompile_hf.MixcompileOtherHead"
        for name in AUTO_CLASSES
    }
    config = {
        "model_type": HF_MODEL_TYPE,
        "architectures": ["MixcompileModel"],
        "auto_map": {"AutoConfig": "mixcompile_hf.MixcompileConfig", **auto_map},
        "mixcompile": manifest,
    }
    (directory / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    shutil.copyfile(Path(__file__).with_name("hf_remote.py"), directory / REMOTE_CODE)


def _auto_classes_of(base: dict[str, Any]) -> set[str]:
    """The ``AutoModel*`` classes that build the saved model's class for its model type, by transformers'
    own tables (all of them where those say nothing: a class they do not map)."""
    import transformers

    name = base.get("class")
    config = base.get("config")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    loads = set()
    for auto in AUTO_CLASSES:
        try:
            mapped = getattr(transformers, auto)._model_mapping._model_mapping.get(model_type, ())
        except AttributeError:  # transformers' private tables moved: refuse nothing
            return set(AUTO_CLASSES)
        if name in ((mapped,) if isinstance(mapped, str) else tuple(mapped)):
            loads.add(auto)
    return loads or set(AUTO_CLASSES)


def install_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write a converted model's directory (see the module docstring).

    Set on the instance: the class stays the user's, and transformers' own saving (shards, tied weights,
    ``push_to_hub``) does the rest. A ``partial``, not a bound method: a bound method pickles as the
    attribute of its name, which the model's class does not have, so the model would not unpickle.
    """
    if is_transformers_model(model):
        object.__setattr__(model, "save_pretrained", functools.partial(_save_pretrained, model))


def _save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
) -> Any:
    from mixcompile import __version__
    from mixcompile.io.bases import base_spec_of
    from mixcompile.io.saving import block_settings, recipes_to_save

    if kwargs.get("safe_serialization") is False:
        raise ValueError(
            "a converted model is saved with safetensors (safe_serialization=True); pickled weights would be "
            "loaded as code."
        )
    if kwargs.get("save_original_format"):
        raise ValueError(
            "a converted model is saved with its tensors as it holds them (save_original_format=False): "
            "transformers' original-format conversion renames some (a MoE model's fused experts, one "
            "tensor per expert), which mixcompile.load then would not find."
        )
    recipes = recipes_to_save(model)
    model_class: Any = type(model)  # a transformers PreTrainedModel (checked when installed)
    if "save_original_format" in inspect.signature(model_class.save_pretrained).parameters:
        kwargs["save_original_format"] = False
    with _saving_every_tensor(model):
        result = model_class.save_pretrained(model, save_directory, *args, **kwargs)
    base = base_spec_of(model)
    manifest = manifest_data(recipes, base, __version__, block_settings(model))
    del manifest["weights"]  # transformers names its own weight files (one file, or shards and an index)
    write_hf_files(Path(save_directory), manifest)
    return result


@contextlib.contextmanager
def _saving_every_tensor(model: nn.Module) -> Iterator[None]:
    """No keys ignored on save for the duration: transformers leaves out the tensors a class lists in
    ``_keys_to_ignore_on_save`` (Marian's sinusoidal positions, which its own loader recomputes), and
    ``mixcompile.load`` refuses weights that do not cover the model exactly."""
    name = "_keys_to_ignore_on_save"
    own = vars(model)
    had, previous = name in own, own.get(name)
    object.__setattr__(model, name, None)
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, name, previous)
        else:
            object.__delattr__(model, name)


def write_generation_config(model: nn.Module, directory: Path) -> None:
    """``generation_config.json``, as transformers' ``save_pretrained`` writes it: without it a reloaded
    model generates with other defaults (eos ids, lengths, beams) than the model saved."""
    config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not is_transformers_model(model):
        return
    if callable(can_generate) and not can_generate():
        return
    shadowing = _shadowing(vars(config))
    if shadowing:  # transformers loads such a file, then fails calling the method it hides
        raise ConfigError(
            f"the model's generation config sets {shadowing!r}, the name of a GenerationConfig method; "
            "remove that key from its generation_config.json."
        )
    config.save_pretrained(directory)


def _shadowing(data: dict[str, Any]) -> str | None:
    """A key of a generation config that would hide a method of ``GenerationConfig`` (``save_pretrained``:
    1 makes every later save fail)."""
    from transformers import GenerationConfig

    return next((key for key in data if callable(getattr(GenerationConfig, key, None))), None)


def read_generation_config(model: nn.Module, directory: Path) -> None:
    """Give ``model`` the generation config saved in ``directory``, if any: read as JSON only, from a
    regular file inside the directory (see :func:`mixcompile.io.files.confined_file`)."""
    file = directory / GENERATION_CONFIG
    if not (file.exists() or file.is_symlink()) or not is_transformers_model(model):
        return
    data = read_json_object(
        confined_file(directory, GENERATION_CONFIG, GENERATION_CONFIG), "generation config", within=directory
    )
    from transformers import GenerationConfig

    shadowing = _shadowing(data)
    if shadowing:
        raise LoadError(f"{file} sets {shadowing!r}, the name of a GenerationConfig method; refused.")
    try:
        config = GenerationConfig.from_dict(data)
    except Exception as exc:  # noqa: BLE001 - a hostile file can make transformers raise anything
        raise LoadError(f"{file} is not a generation config transformers reads: {first_line(exc)}") from None
    config._original_object_hash = hash(config)  # as GenerationConfig.from_pretrained marks it unmodified
    model.generation_config = config  # type: ignore[assignment]  # torch types __setattr__ narrowly
