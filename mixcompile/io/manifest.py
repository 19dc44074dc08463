"""What a saved directory says about itself, read as hostile input.

Two places hold the same manifest: ``mixcompile.json`` (written by :func:`mixcompile.save`) and, for
Hugging Face models, the ``"mixcompile"`` section of ``config.json`` (written by both ``save`` and the
converted model's own ``save_pretrained``; see :mod:`mixcompile.io.hf`). Every field is type-checked; file
names are confined to the directory; recipes are parsed by :class:`~mixcompile.compiler.Recipe` (which
validates names and bounds) before anything is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixcompile.compiler.recipe import matched_patterns
from mixcompile.errors import LoadError, MixcompileError, warn
from mixcompile.io.bases import check_base_spec, install_hint
from mixcompile.io.files import confined_file, read_json_object
from mixcompile.plugins.manager import registry
from mixcompile.plugins.providers import installed_providers
from mixcompile.types import PluginKind

MANIFEST = "mixcompile.json"
WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_MODEL_TYPE = "mixcompile"  # the model_type of a converted model's config.json (see mixcompile.io.hf)
FORMAT_VERSION = 1
_FIELDS = {
    "format",
    "format_version",
    "mixcompile_version",
    "recipes",
    "base",
    "weights",
    "blocks",
    "plugins",
}
# MoT blocks' settings, and "token_choice" (top_k) where mixcompile.to_token_choice replaced a MoT block
_BLOCK_SETTINGS = {"mode": str, "small_batch": str, "temperature": float, "token_choice": int, "kernel": str}


@dataclass(frozen=True)
class Manifest:
    directory: Path
    recipes: list[Any]  # mixcompile.compiler.Recipe, oldest first
    base: dict[str, Any]  # how to rebuild the unconverted model (see mixcompile.io.bases)
    weights: list[Path]
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)  # settings changed after conversion
    # "router:cosine" -> {"package": "revplug", "version": "0.1"}: who provided the plugins the recipes name,
    # the patterns that found the converted FFNs and the builder
    plugins: dict[str, dict[str, str]] = field(default_factory=dict)

    def provider(self, kind: str, name: str) -> Mapping[str, str] | None:
        """The package (and version) that provided plugin ``name`` when the model was saved, if recorded."""
        return self.plugins.get(f"{kind}:{name}")


def is_saved_model(directory: Path) -> bool:
    """Whether ``directory`` holds a converted model (a manifest, or a converted model's config.json)."""
    if (directory / MANIFEST).exists() or (directory / MANIFEST).is_symlink():
        return True
    config = directory / HF_CONFIG
    if not config.is_file() or config.is_symlink() and config.resolve().parent != directory.resolve():
        return False
    try:
        return read_json_object(config, "Hugging Face config").get("model_type") == HF_MODEL_TYPE
    except LoadError:
        return False


def read_manifest(directory: Path) -> Manifest:
    directory = Path(directory)
    file = directory / MANIFEST
    if file.exists() or file.is_symlink():
        confined_file(directory, MANIFEST, MANIFEST)
        data = read_json_object(file, "mixcompile manifest", within=directory)
        weights = [confined_file(directory, data.get("weights", WEIGHTS), f"{file}: 'weights'")]
        return parse_manifest(data, directory, str(file), weights)
    config_file = directory / HF_CONFIG
    if config_file.exists() or config_file.is_symlink():
        confined_file(directory, HF_CONFIG, HF_CONFIG)
        config = read_json_object(config_file, "Hugging Face config", within=directory)
        if config.get("model_type") == HF_MODEL_TYPE:
            section = config.get("mixcompile")
            where = f"{config_file}: 'mixcompile'"
            if not isinstance(section, dict):
                raise LoadError(f"{where} must be an object (the manifest of the converted model).")
            return parse_manifest(section, directory, where, hf_weight_files(directory))
    if not directory.exists():
        raise LoadError(f"{directory} does not exist.")
    if not directory.is_dir():
        raise LoadError(f"{directory} is a file; a saved model is the directory mixcompile.save wrote.")
    raise LoadError(f"{directory} is not a mixcompile directory: {MANIFEST} is missing.")


def hf_weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or else the shards a ``save_pretrained`` index names (plain names inside):
    transformers' order, which reads a directory whose unsharded save left an older index behind."""
    index = directory / HF_INDEX
    single = directory / WEIGHTS
    if not (single.exists() or single.is_symlink()) and (index.exists() or index.is_symlink()):
        confined_file(directory, HF_INDEX, HF_INDEX)
        weight_map = read_json_object(index, "weights index", within=directory).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{index}: 'weight_map' must be an object of tensor names to files.")
        names = sorted({str(name) for name in weight_map.values()})
        return [confined_file(directory, name, f"{index}: weight_map") for name in names]
    if not (directory / WEIGHTS).exists() and (directory / "pytorch_model.bin").exists():
        raise LoadError(
            f"{directory} holds pickled weights (pytorch_model.bin); save with safetensors "
            "(save_pretrained's default) to load it with mixcompile."
        )
    return [confined_file(directory, WEIGHTS, "weights")]


def parse_manifest(data: dict[str, Any], directory: Path, where: str, weights: list[Path]) -> Manifest:
    from mixcompile.compiler import Recipe

    if data.get("format") != "mixcompile":
        raise LoadError(f"{where} is not a mixcompile manifest (its 'format' is {data.get('format')!r}).")
    version = data.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise LoadError(
            f"{where} has format_version {version!r}; this mixcompile reads version {FORMAT_VERSION}. "
            "Upgrade mixcompile."
        )
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise LoadError(f"{where} has unknown fields {unknown}; it was not written by this mixcompile.")
    if not isinstance(data.get("mixcompile_version", ""), str):
        raise LoadError(f"{where}: 'mixcompile_version' must be a string.")
    recipes = data.get("recipes")
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, dict) for r in recipes):
        raise LoadError(f"{where} has no 'recipes' section (a list of the recipes applied, oldest first).")
    parsed = []
    for number, recipe in enumerate(recipes):
        if "filter_fn" in recipe:
            raise LoadError(f"{where}: recipe {number} has a 'filter_fn', which is code and never stored.")
        try:
            parsed.append(Recipe.from_dict(_saved_router_options(recipe, f"{where}: recipe {number}")))
        except (MixcompileError, TypeError, ValueError) as exc:
            raise LoadError(f"{where}: recipe {number} is invalid: {exc}") from None
    if not isinstance(data.get("base"), dict):
        raise LoadError(f"{where} has no 'base' section.")
    plugins = _check_plugins(data.get("plugins", {}), where)
    base = check_base_spec(data["base"], directory, where=f"{where}: base")
    blocks = _check_blocks(data.get("blocks", {}), where)
    _check_patterns_registered(plugins, directory)
    return Manifest(directory, parsed, base, weights, blocks, plugins)


def _check_patterns_registered(plugins: dict[str, dict[str, str]], directory: Path) -> None:
    """Every pattern that found the saved model's FFNs must be registered here: without it a replay finds
    other FFNs, or none, and could not say which plugin is missing."""
    recorded = sorted(key.partition(":")[2] for key in plugins if key.startswith("pattern:"))
    known = registry().names("pattern") if recorded else []
    for name in recorded:
        if name in known:
            continue
        raise LoadError(
            f"{directory} was converted with FFNs found by the pattern {name!r}, which no installed plugin "
            f"registers here (known: {', '.join(known) or 'none'}). "
            + install_hint(plugins[f"pattern:{name}"])
        )


# The built-in learned routers' on/off options, which mixcompile before e8ab23c took by truthiness.
_LEARNED_ROUTERS = ("topk", "switch", "expert_choice")
_ON_OFF = ("renormalize", "bias_balancing")


def _saved_router_options(recipe: dict[str, Any], where: str) -> dict[str, Any]:
    """A saved recipe's router options as the mixcompile that saved them read them. Earlier versions took
    on/off options by truthiness (``--router-option renormalize=False`` saved the string "False", read as
    on) and ignored ``bias_update_rate`` without balancing; both are refused now for new recipes, so a
    model saved then loads as it computed, with a warning saying what was read (saving it again writes the
    options as they are meant)."""
    options = recipe.get("router_options")
    if recipe.get("router", "topk") not in _LEARNED_ROUTERS or not isinstance(options, dict):
        return recipe
    read = dict(options)
    for name in _ON_OFF:
        if name in read and not isinstance(read[name], bool):
            read[name] = bool(read[name])
            said = f"router option {name}={options[name]!r} read as {read[name]}"
            warn(f"{where}: {said}, as the mixcompile that saved it did.")
    if "bias_update_rate" in read and not read.get("bias_balancing", False):
        said = f"router option bias_update_rate={read.pop('bias_update_rate')!r} ignored without balancing"
        warn(f"{where}: {said}, as the mixcompile that saved it did.")
    return {**recipe, "router_options": read}


def _check_plugins(plugins: object, where: str) -> dict[str, dict[str, str]]:
    if not isinstance(plugins, dict):
        raise LoadError(f"{where}: 'plugins' must be an object of plugin names to their packages.")
    for key, provider in plugins.items():
        fields = provider.keys() if isinstance(provider, dict) else ()
        if (
            not isinstance(provider, dict)
            or not {"package"} <= set(fields) <= {"package", "version"}
            or not all(isinstance(v, str) and _PROVIDER.fullmatch(v) for v in provider.values())
        ):
            raise LoadError(
                f"{where}: plugins[{key!r}] must be an object with a 'package' name and, optionally, its "
                "'version' (a distribution's name and version: letters, digits and . _ - + !)."
            )
    return plugins


_PROVIDER = re.compile(r"[A-Za-z0-9._+!\-]{1,200}")  # printed in errors: no spaces, quotes or escapes


def _check_blocks(blocks: object, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(blocks, dict):
        raise LoadError(f"{where}: 'blocks' must be an object of block paths to settings.")
    for path, settings in blocks.items():
        if not isinstance(settings, dict):
            raise LoadError(f"{where}: blocks[{path!r}] must be an object of settings.")
        for name, value in settings.items():
            kind = _BLOCK_SETTINGS.get(name)
            if kind is None:
                raise LoadError(f"{where}: blocks[{path!r}] has an unknown setting {name!r}.")
            if isinstance(value, bool) or not isinstance(value, kind | int if kind is float else kind):
                raise LoadError(f"{where}: blocks[{path!r}].{name} must be a {kind.__name__}, got {value!r}.")
    return blocks


def manifest_data(
    recipes: list[Any], base: dict[str, Any], version: str, blocks: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The JSON a save writes (``base`` in its stored form, see :func:`mixcompile.io.bases.stored_spec`)."""
    data = {
        "format": "mixcompile",
        "format_version": FORMAT_VERSION,
        "mixcompile_version": version,
        "recipes": [recipe.to_dict() for recipe in recipes],
        "base": base,
        "weights": WEIGHTS,
    }
    if blocks:
        data["blocks"] = blocks
    plugins = plugin_providers(recipes, base, blocks)
    if plugins:
        data["plugins"] = plugins
    return data


def plugin_providers(
    recipes: list[Any], base: dict[str, Any] | None = None, blocks: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, str]]:
    """The installed package (and its version) behind each plugin the recipes name, each pattern that
    found their FFNs, the builder of ``base`` and each kernel set on a block since (``blocks``), so that
    loading where one is missing can say what to install (:mod:`mixcompile.plugins.providers`). A plugin
    no installed package provided (registered in-process) is left out: an entry without a package would be
    refused by the mixcompile versions before this one."""
    return installed_providers(_plugins_used(recipes, base, blocks or {}))


def _plugins_used(
    recipes: list[Any], base: dict[str, Any] | None, blocks: dict[str, dict[str, Any]]
) -> dict[str, tuple[PluginKind, str]]:
    """``{"router:topk": ("router", "topk"), ...}``: the plugins a saved model needs to be rebuilt."""
    named: list[tuple[PluginKind, str]] = []
    for recipe in recipes:
        named += [("initializer", recipe.init), ("kernel", recipe.kernel)]
        named.append(("router", recipe.router) if recipe.strategy == "moe" else ("mixer", recipe.mixer))
        named += [("pattern", name) for name in matched_patterns(recipe)]
    if base is not None and base.get("kind") == "builder":
        named.append(("builder", base["name"]))
    named += [("kernel", settings["kernel"]) for settings in blocks.values() if "kernel" in settings]
    return {f"{kind}:{name}": (kind, name) for kind, name in named if name != "auto"}
