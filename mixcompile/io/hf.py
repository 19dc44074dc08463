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

import inspect
import json
import os
import shutil
import types
from pathlib import Path
from typing import Any

from torch import nn

from mixcompile.io.manifest import HF_CONFIG, HF_MODEL_TYPE, manifest_data

REMOTE_CODE = "mixcompile_hf.py"
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
    ``push_to_hub``) does the rest.
    """
    if is_transformers_model(model):
        object.__setattr__(model, "save_pretrained", types.MethodType(_save_pretrained, model))


def _save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
) -> Any:
    from mixcompile import __version__
    from mixcompile.compiler import recipes_of
    from mixcompile.io.bases import base_spec_of
    from mixcompile.io.saving import block_settings

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
    model_class: Any = type(model)  # a transformers PreTrainedModel (checked when installed)
    if "save_original_format" in inspect.signature(model_class.save_pretrained).parameters:
        kwargs["save_original_format"] = False
    result = model_class.save_pretrained(model, save_directory, *args, **kwargs)
    base = base_spec_of(model)
    manifest = manifest_data(recipes_of(model), base, __version__, block_settings(model))
    del manifest["weights"]  # transformers names its own weight files (one file, or shards and an index)
    write_hf_files(Path(save_directory), manifest)
    return result
