"""``mixcompile.json``: what a saved directory says about itself, read as hostile input.

Every field is type-checked; file names are confined to the directory; the recipes are parsed by
:class:`~mixcompile.compiler.Recipe` (which validates names and bounds) before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixcompile.errors import LoadError, MixcompileError
from mixcompile.io.bases import check_base_spec
from mixcompile.io.files import confined_file, read_json_object

MANIFEST = "mixcompile.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
_FIELDS = {"format", "format_version", "mixcompile_version", "recipes", "base", "weights"}


@dataclass(frozen=True)
class Manifest:
    directory: Path
    recipes: list[Any]  # mixcompile.compiler.Recipe, oldest first
    base: dict[str, Any]  # how to rebuild the unconverted model (see mixcompile.io.bases)
    weights: Path


def read_manifest(directory: Path) -> Manifest:
    from mixcompile.compiler import Recipe

    directory = Path(directory)
    file = directory / MANIFEST
    if not (file.exists() or file.is_symlink()):
        raise LoadError(f"{directory} is not a mixcompile directory: {MANIFEST} is missing.")
    confined_file(directory, MANIFEST, MANIFEST)
    data = read_json_object(file, "mixcompile manifest")
    if data.get("format") != "mixcompile":
        raise LoadError(f"{file} is not a mixcompile manifest (its 'format' is {data.get('format')!r}).")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise LoadError(
            f"{file} has format_version {version!r}; this mixcompile reads version {FORMAT_VERSION}. "
            "Upgrade mixcompile."
        )
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise LoadError(f"{file} has unknown fields {unknown}; it was not written by this mixcompile.")
    if not isinstance(data.get("mixcompile_version", ""), str):
        raise LoadError(f"{file}: 'mixcompile_version' must be a string.")
    recipes = data.get("recipes")
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, dict) for r in recipes):
        raise LoadError(f"{file} has no 'recipes' section (a list of the recipes applied, oldest first).")
    parsed = []
    for number, recipe in enumerate(recipes):
        if "filter_fn" in recipe:
            raise LoadError(f"{file}: recipe {number} has a 'filter_fn', which is code and never stored.")
        try:
            parsed.append(Recipe.from_dict(recipe))
        except (MixcompileError, TypeError, ValueError) as exc:
            raise LoadError(f"{file}: recipe {number} is invalid: {exc}") from None
    if not isinstance(data.get("base"), dict):
        raise LoadError(f"{file} has no 'base' section.")
    base = check_base_spec(data["base"], directory, where=f"{file}: base")
    weights = confined_file(directory, data.get("weights", WEIGHTS), f"{file}: 'weights'")
    return Manifest(directory, parsed, base, weights)


def manifest_data(recipes: list[Any], base: dict[str, Any], version: str) -> dict[str, Any]:
    """The JSON a save writes (``base`` in its stored form, see :func:`mixcompile.io.bases.stored_spec`)."""
    return {
        "format": "mixcompile",
        "format_version": FORMAT_VERSION,
        "mixcompile_version": version,
        "recipes": [recipe.to_dict() for recipe in recipes],
        "base": base,
        "weights": WEIGHTS,
    }
