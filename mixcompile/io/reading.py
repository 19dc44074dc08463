"""Reading whatever the CLI is pointed at as a model, with a one-line reason when it cannot.

Accepted: a mixcompile directory, a Hugging Face model directory, a ``torch.save``'d module
(``trust_pickle``). Every file is checked before it is opened (a FIFO or a device would hang a reader) and
every weights file must cover its model exactly: nothing is ever silently left randomly initialised.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mixcompile.errors import LoadError, first_line
from mixcompile.io.bases import (
    base_spec_of,
    check_transformers_config,
    read_pickle,
    sha256,
    transformers_module,
)
from mixcompile.io.files import check_regular_file, read_json_object
from mixcompile.io.loading import load_manifest
from mixcompile.io.manifest import MANIFEST, is_saved_model, read_manifest

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


@dataclass
class LoadedModel:
    model: nn.Module
    base: dict[str, Any]  # how to rebuild the unconverted model (goes into a saved manifest)
    kind: str  # "mixcompile", "transformers" or "pickle"


def read_model(path: Path, *, trust_pickle: bool = False, trust_code: bool = False) -> LoadedModel:
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise LoadError(f"{path} does not exist.")
    if path.is_dir():
        if is_saved_model(path):  # mixcompile.save, or a converted model's save_pretrained
            manifest = read_manifest(path)
            model = load_manifest(manifest, trust_pickle=trust_pickle, trust_code=trust_code)
            return LoadedModel(model, manifest.base, "mixcompile")
        if (path / "config.json").exists() or (path / "config.json").is_symlink():
            model = read_transformers_dir(path, trust_code=trust_code)
            return LoadedModel(model, base_spec_of(model), "transformers")
        raise LoadError(f"{path} is not a model directory: it has neither {MANIFEST} nor config.json.")
    check_regular_file(path, "model file")
    if path.suffix == ".pt2":
        raise LoadError(
            f"{path} is a torch.export program, which is not supported: export flattens the model to ATen "
            "operations, leaving no FFN modules to swap. Convert the nn.Module, then export the result."
        )
    if path.suffix == ".safetensors":
        raise LoadError(f"{path} holds weights but no architecture; point at its folder with config.json.")
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        raise LoadError(
            f"{path} is a TorchScript archive (torch.jit.save): scripting compiled the FFNs into a graph "
            "with no modules left to swap. Convert the Python nn.Module (torch.save it, or save_pretrained), "
            "then script the result."
        )
    if _looks_pickled(path):
        model = read_pickle(path, trust_pickle=trust_pickle)
        spec = {"kind": "pickle", "path": str(path.resolve()), "sha256": sha256(path)}
        return LoadedModel(model, spec, "pickle")
    if path.suffix in PICKLE_SUFFIXES:  # not a pickle by its first bytes: no trust to ask for
        what = "empty" if path.stat().st_size == 0 else "not a PyTorch file"
        raise LoadError(
            f"{path} is {what}: torch.save writes a zip archive holding data.pkl (or, before torch 1.6, a "
            "pickle); expected a torch.save'd nn.Module."
        )
    raise LoadError(
        f"{path} is not a model: expected a mixcompile or Hugging Face directory, or a torch.save'd module."
    )


def read_transformers_dir(directory: Path, *, trust_code: bool = False) -> nn.Module:
    """A Hugging Face model folder (config.json + weights), read offline; its weights must cover the model."""
    transformers = transformers_module()
    config_file = directory / "config.json"
    config = read_json_object(config_file, "Hugging Face config")
    check_transformers_config(config, trust_code=trust_code, where=str(config_file))
    names = config.get("architectures") or []
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise LoadError(f"{config_file}: 'architectures' must be a list of class names, got {names!r}.")
    cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if cls is not transformers.AutoModel and not (
        isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    ):
        raise LoadError(f"{config_file}: transformers has no model class {names[0]!r}.")
    _check_weight_files(directory)
    generation = directory / "generation_config.json"  # transformers reads it too: no FIFO, no device
    if generation.exists() or generation.is_symlink():
        check_regular_file(generation, "generation config")
    model: nn.Module  # from_pretrained's (transformers is imported lazily, so untyped here)
    try:
        model, info = cls.from_pretrained(
            str(directory),
            local_files_only=True,
            trust_remote_code=trust_code,
            output_loading_info=True,
            # transformers 5 raises for a mismatch pointing at a report the CLI silences: have it reported
            # in ``info`` instead, and refused below, naming the tensor and both shapes
            ignore_mismatched_sizes=True,
            **{_dtype_keyword(transformers): "auto"},  # the saved dtype, not float32
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises anything for a bad folder
        raise LoadError(f"{directory} could not be loaded by transformers: {first_line(exc)}") from exc
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []  # (name, shape in the file, shape in the model)
    if missing or unexpected or mismatched:
        parts = [
            f"{label} {len(names)}, first {sorted(names)[0]!r}"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        ]
        if mismatched:
            name, saved, expected = sorted(mismatched, key=lambda entry: str(entry[0]))[0]
            parts.append(
                f"misshapen {len(mismatched)}, first {name!r}: {list(saved)} in the file, "
                f"{list(expected)} in the model its config.json describes"
            )
        hint = ""
        names = [*unexpected, *(entry[0] for entry in mismatched)]
        if any(".experts." in str(name) or "router" in str(name) for name in names):
            hint = (
                " It looks like a converted model saved with save_pretrained: read it with mixcompile.load."
            )
        raise LoadError(
            f"the weights in {directory} do not cover {type(model).__name__} exactly ({'; '.join(parts)}); "
            f"refused rather than left randomly initialised.{hint}"
        )
    return model


def _check_weight_files(directory: Path) -> None:
    """Weight files are regular files (symlinks allowed: the Hub cache uses them); the sharded index
    transformers will read (if it reads one) names only plain files inside the directory, so that nothing
    is read from elsewhere (and an output check of the directory covers every file read). An index it will
    not read (one an unsharded save left beside ``model.safetensors``) is not looked at, as transformers
    does not."""
    for entry in sorted(directory.iterdir()):
        if entry.suffix in (".safetensors", ".bin"):
            check_regular_file(entry, "weights file")
    index = next((directory / name for name in _WEIGHTS_READ_FIRST if (directory / name).exists()), None)
    if index is None or not index.name.endswith(".index.json"):
        return
    weight_map = read_json_object(index, "weights index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise LoadError(f"{index}: 'weight_map' must be an object of tensor names to files.")
    for shard in sorted(set(weight_map.values()), key=str):
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise LoadError(f"{index} names {shard!r}, not a file inside {directory}; refused.")
        check_regular_file(directory / shard, "weights shard")


# What transformers' from_pretrained reads from a directory, first found first (no variant).
_WEIGHTS_READ_FIRST = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _looks_pickled(path: Path) -> bool:
    """What ``torch.load`` can read: a zip archive holding ``data.pkl``, or torch.save's legacy format, a
    pickle of protocol 2 or later (``\x80``) or of protocol 1, whose first object, torch's magic number,
    is a long (``L``)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head[:1] in (b"\x80", b"L") or (zipfile.is_zipfile(path) and _zip_has_pickle(path))


def _is_torchscript(path: Path) -> bool:
    """``torch.jit.save`` archives carry compiled code (``<name>/code/...``); ``torch.save`` ones do not."""
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _zip_has_pickle(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("data.pkl") for name in archive.namelist())


def _dtype_keyword(transformers: Any) -> str:
    """transformers 5 calls it ``dtype``; 4.x ``torch_dtype``."""
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
