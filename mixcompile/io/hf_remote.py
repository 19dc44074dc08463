"""Loads a model that mixcompile converted: copied into every saved Hugging Face directory as
``mixcompile_hf.py`` and named by its ``config.json`` (``auto_map``), the Hugging Face convention for an
architecture transformers does not ship.

``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (or any ``AutoModel*``) runs this
file, which hands the directory to ``mixcompile.load``: the converted model comes back exactly, as an
instance of its original class (``LlamaForCausalLM``, ...), with its sparse blocks, saved weights and dtypes.
Without ``trust_remote_code`` transformers refuses the directory instead of building the dense model with
random FFNs. Needs ``pip install mixcompile``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel


class MixcompileConfig(PretrainedConfig):
    model_type = "mixcompile"


class MixcompileModel(PreTrainedModel):
    """Never instantiated: ``from_pretrained`` returns the converted model mixcompile rebuilds."""

    config_class = MixcompileConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        import mixcompile

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, revision=kwargs.get("revision"))
        model = mixcompile.load(path)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model
