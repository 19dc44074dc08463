"""Loads a model that mixcompile converted: copied into every saved Hugging Face directory as
``mixcompile_hf.py`` and named by its ``config.json`` (``auto_map``), the Hugging Face convention for an
architecture transformers does not ship.

``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (the ``AutoModel*`` class that builds
the saved class; the others refuse, naming it) runs this file, which hands the directory to
``mixcompile.load``: the converted model comes back exactly, as an instance of its original class
(``LlamaForCausalLM``, ...), with its sparse blocks, saved weights and dtypes. Without ``trust_remote_code``
transformers refuses the directory instead of building the dense model with random FFNs. The keywords that
can be applied to the rebuilt model are (``dtype``, one device, attention and experts implementations,
runtime config flags); any other is refused by name, never ignored. Needs ``pip install mixcompile``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel


class MixcompileConfig(PretrainedConfig):
    model_type = "mixcompile"


# What from_pretrained does with its keywords. Everything else is refused by name: the converted model is
# rebuilt exactly as saved, so a keyword that would change it (or that only transformers' own loading
# understands) must not be silently dropped.
_DOWNLOAD = ("revision", "cache_dir", "token", "force_download", "local_files_only", "proxies")
_BOOKKEEPING = ("trust_remote_code", "code_revision", "_from_auto", "_from_pipeline", "_commit_hash")
_RUNTIME_FLAGS = (
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_cache",
    "output_router_logits",
)
_SPREAD = ("auto", "balanced", "balanced_low_0", "sequential", "disk")
_CONFIG_NAMES = {  # config attributes AutoConfig sets from keywords, by the keyword's name
    "_attn_implementation_internal": "attn_implementation",
    "_experts_implementation_internal": "experts_implementation",
    "_output_attentions": "output_attentions",
}
_CONFIG_IGNORED = ("_name_or_path", "_commit_hash", "transformers_version")


def _local(pretrained_model_name_or_path: Any, kwargs: dict[str, Any]) -> str:
    path = str(pretrained_model_name_or_path)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        download = {key: kwargs[key] for key in _DOWNLOAD if kwargs.get(key) is not None}
        path = snapshot_download(path, **download)
    return path


def _refuse(keyword: str, why: str) -> Exception:
    import mixcompile

    return mixcompile.LoadError(
        f"from_pretrained of a converted model: {keyword} {why}. Load it without that keyword, then change "
        "the model (model.to(...), model.set_attn_implementation(...), ...)."
    )


def _overrides(cls: Any, path: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The settings asked for: keywords, and the config attributes AutoConfig set from keywords (found by
    comparing the config handed over with the directory's own)."""
    settings = {key: value for key, value in kwargs.items() if key != "config"}
    config = kwargs.get("config")
    if config is None:
        return settings
    if not isinstance(config, MixcompileConfig) and type(config).__name__ != "MixcompileConfig":
        raise _refuse("config=", f"is a {type(config).__name__}, not this directory's config")
    saved = vars(cls.config_class.from_pretrained(path))
    for key, value in vars(config).items():
        if key not in _CONFIG_IGNORED and (key not in saved or saved[key] != value):
            settings.setdefault(_CONFIG_NAMES.get(key, key), value)
    return settings


def _device(device_map: Any) -> torch.device:
    """The one device a ``device_map`` names (``"cpu"``, ``"cuda:0"``, ``0``, ``{"": "cuda:0"}``), or a
    refusal: spreading a model over devices or offloading it is transformers' loading, not done here."""
    named = device_map
    if isinstance(device_map, dict):
        values = {str(value) for value in device_map.values()}
        named = next(iter(device_map.values())) if len(values) == 1 else None
    if isinstance(named, bool) or not isinstance(named, str | int | torch.device) or str(named) in _SPREAD:
        raise _refuse(f"device_map={device_map!r}", "does not name one device (no splitting or offloading)")
    try:
        device = torch.device(named)
    except (RuntimeError, ValueError, TypeError):
        raise _refuse(f"device_map={device_map!r}", "is not a device") from None
    if device.type == "meta":  # a model without weights, silently
        raise _refuse(f"device_map={device_map!r}", "would load no weights")
    return device


class MixcompileModel(PreTrainedModel):
    """Never instantiated: ``from_pretrained`` returns the converted model mixcompile rebuilds."""

    config_class = MixcompileConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """``mixcompile.load(path)``, then the keywords that can be applied to the model it rebuilds:
        ``dtype``, ``device_map`` naming one device, ``attn_implementation``, ``experts_implementation``,
        runtime config flags (``output_hidden_states``, ``use_cache``, ...), ``output_loading_info``, and
        the download keywords for a Hub repository; any other is refused by name, never ignored."""
        import mixcompile

        if args:
            raise _refuse("positional model arguments", "have nothing to configure in a saved model")
        path = _local(pretrained_model_name_or_path, kwargs)
        settings = _overrides(cls, path, kwargs)
        for key in (*_DOWNLOAD, *_BOOKKEEPING):
            settings.pop(key, None)
        for key, allowed in (
            ("adapter_kwargs", (None, {})),
            ("subfolder", (None, "")),
            ("use_safetensors", (None, True)),
            ("low_cpu_mem_usage", (None, True, False)),  # mixcompile.load always builds a skeleton first
        ):
            if key in settings and settings.pop(key) not in allowed:
                raise _refuse(f"{key}={kwargs.get(key)!r}", "is not supported for a converted model")
        dtype = settings.pop("dtype", None)
        torch_dtype = settings.pop("torch_dtype", None)
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise _refuse(f"dtype={dtype!r} with torch_dtype={torch_dtype!r}", "name two dtypes")
        dtype = torch_dtype if dtype is None else dtype
        device_map = settings.pop("device_map", None)
        loading_info = settings.pop("output_loading_info", False)
        attention = settings.pop("attn_implementation", None)
        experts = settings.pop("experts_implementation", None)
        flags = {key: settings.pop(key) for key in _RUNTIME_FLAGS if key in settings}
        if settings:
            name = sorted(settings)[0]
            raise _refuse(
                f"{name}={settings[name]!r}",
                "cannot be applied: the converted model is rebuilt exactly as saved (its structure and "
                "config come from its manifest)",
            )
        if dtype is not None and not isinstance(dtype, str | torch.dtype):
            raise _refuse(f"dtype={dtype!r}", "is not one dtype")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype, None) if dtype.isidentifier() else None
            if not isinstance(dtype, torch.dtype):
                raise _refuse(f"dtype={kwargs.get('dtype', torch_dtype)!r}", "is not a torch dtype")
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise _refuse(f"dtype={dtype}", "is not a floating-point dtype (a model's weights are)")
        device = None if device_map is None else _device(device_map)
        model = mixcompile.load(path).eval()  # transformers' contract: from_pretrained gives eval mode
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        for keyword, value, setter in (
            ("attn_implementation", attention, "set_attn_implementation"),
            ("experts_implementation", experts, "set_experts_implementation"),
        ):
            if value is None:
                continue
            if not hasattr(model, setter):
                raise _refuse(f"{keyword}={value!r}", f"needs a transformers with {setter}")
            getattr(model, setter)(value)
        for key, value in flags.items():
            if not hasattr(model.config, key):
                raise _refuse(f"{key}={value!r}", f"is not a setting of {type(model.config).__name__}")
            setattr(model.config, key, value)
        if loading_info:  # mixcompile.load refuses weights that do not cover the model exactly
            info: dict[str, list[Any]] = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
            return model, {**info, "error_msgs": []}
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
