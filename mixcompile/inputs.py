"""Reading whatever the CLI is pointed at as a model, with a one-line reason when it cannot."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .serialization import (
    MANIFEST,
    LoadError,
    base_spec_of,
    load,
    read_manifest,
    read_pickle,
    read_transformers_dir,
    sha256,
)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


@dataclass
class LoadedModel:
    model: nn.Module
    base: dict[str, Any]  # how to rebuild the unconverted model (goes into a saved manifest)
    kind: str  # "mixcompile", "transformers" or "pickle"


def read_model(path: Path, *, trust_pickle: bool = False, trust_code: bool = False) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path} does not exist.")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            model = load(path, trust_pickle=trust_pickle, trust_code=trust_code)
            return LoadedModel(model, read_manifest(path)["base"], "mixcompile")
        if (path / "config.json").is_file():
            model = read_transformers_dir(path)
            return LoadedModel(model, base_spec_of(model), "transformers")
        raise LoadError(f"{path} is not a model directory: it has neither {MANIFEST} nor config.json.")
    if path.suffix == ".pt2":
        raise LoadError(
            f"{path} is a torch.export program, which is not supported: export flattens the model to ATen "
            "operations, leaving no FFN modules to swap. Convert the nn.Module, then export the result."
        )
    if path.suffix == ".safetensors":
        raise LoadError(f"{path} holds weights but no architecture; point at its folder with config.json.")
    if path.suffix in PICKLE_SUFFIXES or _looks_pickled(path):
        model = read_pickle(path, trust_pickle=trust_pickle)
        spec = {"kind": "pickle", "path": str(path.resolve()), "sha256": sha256(path)}
        return LoadedModel(model, spec, "pickle")
    raise LoadError(
        f"{path} is not a model: expected a mixcompile or Hugging Face directory, or a torch.save'd module."
    )


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head[:1] == b"\x80" or (zipfile.is_zipfile(path) and _zip_has_pickle(path))


def _zip_has_pickle(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("data.pkl") for name in archive.namelist())
