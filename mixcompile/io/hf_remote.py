"""Loads a model that mixcompile converted: copied into every saved Hugging Face directory as
``mixcompile_hf.py`` and named by its ``config.json`` (``auto_map``), the Hugging Face convention for an
architecture transformers does not ship.

``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (the ``AutoModel*`` class that builds
the saved class; the others refuse, naming it) runs this file, which hands the directory to
``mixcompile.load``: the converted model comes back exactly, as an instance of its original class
(``LlamaForCausalLM``, ...), with its sparse blocks, saved weights and dtypes. Without ``trust_remote_code``
transformers refuses the directory instead of building the dense model with random FFNs. Needs
``pip install mixcompile``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel


class MixcompileConfig(PretrainedConfig):
    model_type = "mixcompile"


def _local(pretrained_model_name_or_path: Any, kwargs: dict[str, Any]) -> str:
    path = str(pretrained_model_name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, revision=kwargs.get("revision"))
    return path


class MixcompileModel(PreTrainedModel):
    """Never instantiated: ``from_pretrained`` returns the converted model mixcompile rebuilds."""

    config_class = MixcompileConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        import mixcompile

        path = _local(pretrained_model_name_or_path, kwargs)
        model = mixcompile.load(path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model


class MixcompileOtherHead(PreTrainedModel):
    """Named for the ``AutoModel*`` classes that would build another head than the saved model's (an
    ``AutoModelForSequenceClassification`` of a saved ``BertForMaskedLM``): refuses, naming the ones that
    load it, rather than handing back a model of another class than asked for."""

    config_class = MixcompileConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = _local(pretrained_model_name_or_path, kwargs)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as file:
            config = json.load(file)
        saved = config.get("mixcompile", {}).get("base", {}).get("class", "model")
        auto_map = config.get("auto_map", {})
        loaders = sorted(name for name, target in auto_map.items() if target.endswith(".MixcompileModel"))
        raise ValueError(
            f"{path} holds a converted {saved}, and this AutoModel class builds another architecture "
            f"(another head, or none), which mixcompile does not do: load it with "
            f"{' or '.join([*loaders, 'mixcompile.load'])}, then add the head you need."
        )
