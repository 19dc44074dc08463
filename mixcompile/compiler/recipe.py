"""The recipe: what to turn the dense FFNs into, and which of them.

A recipe is plain data so it can be stored next to a checkpoint and replayed: ``to_dict`` gives JSON-safe
values and ``from_dict`` reads them back. The one exception is ``filter_fn`` (like torchao's
``quantize_(model, config, filter_fn)``), a Python callable that is *not* serialised: ``to_dict`` leaves it
out, so re-apply it by hand after ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from torch import nn

from mixcompile.errors import ConfigError, check_choice, check_positive_int
from mixcompile.types import Layout, MoTMode, Sites, Sizing, SmallBatchPolicy, Strategy, TokenLayout

# The values each option takes, from its Literal; the MoT options' first value is their default.
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
SIZINGS: tuple[Sizing, ...] = get_args(Sizing)
LAYOUTS: tuple[Layout, ...] = get_args(Layout)
MOT_MODES: tuple[MoTMode, ...] = get_args(MoTMode)
SMALL_BATCH_POLICIES: tuple[SmallBatchPolicy, ...] = get_args(SmallBatchPolicy)
MAX_EXPERTS = 1 << 16  # far beyond any published MoE; a larger number is a typo or a tampered file
MAX_GROUP_SIZE = 1 << 16
_EVERY = re.compile(r"^every:(\d+)$")
_RECORD = "_mixcompile_recipes"
_PATTERNS = "_mixcompile_patterns"  # on a recorded recipe: the patterns that found its sites
# Options one strategy's blocks take and the other's ignore, which a recipe of the other leaves at their
# defaults; the MoT options of _MOT_VALUES are checked with their values.
_MOT_ONLY = ("group_size", "mixer", "mixer_options")
_MOE_ONLY = ("top_k", "router", "router_options", "num_shared_experts")
_MOT_VALUES: dict[str, tuple[str, ...]] = {
    "mode": MOT_MODES,
    "small_batch": SMALL_BATCH_POLICIES,
    "layout": LAYOUTS,
}
#: The options only one strategy's blocks take, by strategy (the command line refuses the other's flags).
STRATEGY_OPTIONS: dict[Strategy, tuple[str, ...]] = {"moe": _MOE_ONLY, "mot": (*_MOT_ONLY, *_MOT_VALUES)}
_NAMES = ("strategy", "router", "mixer", "kernel", "init", "sizing", "mode", "small_batch", "layout")


@dataclass
class Recipe:
    """How to convert. MoT blocks take ``mode`` (``"soft"``, the paper; ``"sparse"``: each expert keeps its
    top group member) and ``small_batch`` (``"group"`` or ``"sparse"`` at inference with fewer than G
    sequences); see :class:`mixcompile.MoTBlock`. Sizing: ``same`` keeps the dense hidden size per expert,
    ``split`` gives each expert ``hidden / num_experts`` (MoEfication), ``flop`` sizes the experts so that
    *their* FLOPs per token equal the dense FFN's (the block adds its own on top: a MoT block's controller,
    mixing and redistribution, ``3 * E * d`` multiply-adds per token, a MoE block's router, ``E * d``;
    :func:`mixcompile.inspect` and the conversion report count them in "FFN FLOPs per token: a -> b"),
    ``auto`` is ``split`` for the ``split`` initializer and ``same`` otherwise.

    Sites: ``"all"``, ``"last_half"`` (as in the MoT paper), ``"every:N"`` (the N-th, 2N-th, ... FFN, i.e.
    indices N-1, 2N-1, ...), or a list of site indices (model order, as ``inspect`` numbers them);
    ``filter_fn(module, fqn) -> bool`` then narrows the choice further, called as torchao's ``quantize_``
    calls it: with the module that holds the FFN and its fully qualified name.

    ``layout`` (MoT): the token layout of the FFN inputs, ``[B, T, d]`` (``"batch_first"``), ``[T, B, d]``
    (``"seq_first"``) or ``[B*T, d]`` (``"flat"``). ``"auto"`` takes it from the model (a forward of its
    inputs, ``batch_first`` flags, the graph); a stated layout the model contradicts is an error. MoE blocks
    take any ``[..., d]``, so a MoE recipe leaves it at ``"auto"``.
    """

    strategy: Strategy = "moe"
    num_experts: int = 8
    top_k: int = 2
    group_size: int = 4
    router: str = "topk"
    mixer: str = "softmax"
    kernel: str = "auto"
    init: str = "upcycle"
    init_options: dict[str, Any] = field(default_factory=dict)
    router_options: dict[str, Any] = field(default_factory=dict)
    mixer_options: dict[str, Any] = field(default_factory=dict)
    num_shared_experts: int = 0
    mode: MoTMode = "soft"
    small_batch: SmallBatchPolicy = "group"
    sizing: Sizing = "auto"
    sites: Sites = "all"
    layout: Layout = "auto"
    seed: int = 0
    filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in _NAMES:
            if not isinstance(getattr(self, name), str):  # from_dict reads untrusted files
                raise ConfigError(f"{name} must be a name (a string), got {getattr(self, name)!r}.")
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("sizing", self.sizing, SIZINGS)
        check_positive_int("num_experts", self.num_experts, maximum=MAX_EXPERTS)
        check_positive_int("top_k", self.top_k, maximum=MAX_EXPERTS)
        check_positive_int("group_size", self.group_size, maximum=MAX_GROUP_SIZE)
        check_positive_int("num_shared_experts", self.num_shared_experts, minimum=0, maximum=MAX_EXPERTS)
        check_positive_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        for name, choices in _MOT_VALUES.items():
            value = check_choice(name, getattr(self, name), choices)
            if self.strategy == "moe" and value != choices[0]:
                raise ConfigError(
                    f"{name}={value!r} is a MoT option; a MoE recipe leaves it at {choices[0]!r}."
                )
        self._check_strategy_options()
        for name in ("init_options", "router_options", "mixer_options"):
            if getattr(self, name) is None:  # as the blocks take it: no options
                setattr(self, name, {})
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}.")
            setattr(self, name, dict(getattr(self, name)))
        if "generator" in self.init_options:  # load_dense passes one per site: init_options cannot
            raise ConfigError(
                "init_options: 'generator' is mixcompile's to give (one per site, seeded from seed= so a "
                "conversion repeats); choose the random draws with seed= instead."
            )
        self._check_sites()
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(
                f"filter_fn must be callable as filter_fn(module, fqn), got {self.filter_fn!r}."
            )

    def _check_strategy_options(self) -> None:
        """Options of the other strategy must stay at their defaults: set, they would do nothing (a
        misspelt mixer option on a MoE recipe would pass unnoticed, and be saved)."""
        other, kind = (_MOT_ONLY, "mot") if self.strategy == "moe" else (_MOE_ONLY, "moe")
        for name in other:
            default = Recipe.__dataclass_fields__[name]
            expected = default.default_factory() if callable(default.default_factory) else default.default
            if getattr(self, name) != expected:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is a {kind} option, which a {self.strategy} recipe does "
                    f"not use; leave it at {expected!r}, or use strategy={kind!r}."
                )

    def _check_sites(self) -> None:
        sites: object = self.sites  # whatever the caller passed (from_dict reads untrusted files)
        if isinstance(sites, str):
            if sites not in ("all", "last_half") and not _EVERY.match(sites):
                hint = " (the command line's last-half is 'last_half' here)" if sites == "last-half" else ""
                raise ConfigError(
                    f"sites must be 'all', 'last_half', 'every:N' or a list of indices, got {sites!r}{hint}."
                )
            if _EVERY.match(sites):
                check_positive_int("N in sites='every:N'", int(sites.split(":")[1]))
            return
        if not isinstance(sites, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in sites
        ):
            raise ConfigError(
                f"sites must be 'all', 'last_half', 'every:N' or a list of indices, got {sites!r}."
            )
        self.sites = list(sites)

    def resolved_sizing(self) -> Sizing:
        if self.sizing != "auto":
            return self.sizing
        return "split" if self.init == "split" else "same"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields; ``filter_fn`` is not serialised."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "filter_fn"}
        for name in ("init_options", "router_options", "mixer_options"):
            data[name] = dict(data[name])
        if isinstance(data["sites"], list):
            data["sites"] = list(data["sites"])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping):  # read from untrusted files: a string would be read as its letters
            raise ConfigError(f"a recipe must be a mapping of options, got {type(data).__name__}.")
        check_option_names(data, "Recipe.from_dict")
        return cls(**dict(data))


def recipes_of(model: nn.Module) -> list[Recipe]:
    """The recipes ``convert`` applied to ``model``, oldest first (empty if it converted nothing).

    Each is recorded with its converted sites as an explicit index list and no ``filter_fn``, so replaying
    them in order on the unconverted model (as ``mixcompile.load`` does) converts exactly the same sites,
    also when a model was converted twice (MoE in some layers, then MoT in others).
    """
    recipes = getattr(model, _RECORD, [])
    return list(recipes) if isinstance(recipes, list) else []


def record(
    model: nn.Module,
    recipe: Recipe,
    converted: list[int],
    layouts: Sequence[TokenLayout] = (),
    patterns: Iterable[str] = (),
) -> None:
    """Remember ``recipe`` as replayable: its converted sites as indices, and the MoT layout it found when
    every converted site has the same one (so a replay without inputs builds the same blocks). ``patterns``:
    the registered names of the patterns that found those sites (see :func:`matched_patterns`)."""
    layout: Layout = layouts[0] if len(set(layouts)) == 1 else recipe.layout
    replayable = dataclasses.replace(recipe, sites=sorted(converted), filter_fn=None, layout=layout)
    setattr(replayable, _PATTERNS, tuple(sorted(set(patterns))))
    object.__setattr__(model, _RECORD, [*recipes_of(model), replayable])


def matched_patterns(recipe: Recipe) -> tuple[str, ...]:
    """The registered patterns that found the FFNs a recorded ``recipe`` converted (empty for a recipe
    :func:`record` did not make), so that a save names their plugins: without one, a load finds other FFNs
    or none. Kept beside the recipe's fields, not as one: what the conversion relied on, not an option (a
    replay finds its sites with the patterns registered then)."""
    names = getattr(recipe, _PATTERNS, ())
    return names if isinstance(names, tuple) else ()


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe)]


def check_option_names(options: Mapping[str, Any], where: str) -> None:
    """Unknown names fail with the valid ones listed and the closest one suggested."""
    valid = option_names()
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1) if isinstance(name, str) else []
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown option {name!r}.{hint} Valid options: {', '.join(valid)}.")


def make_recipe(
    recipe: Recipe | Mapping[str, Any] | None, options: Mapping[str, Any], *, where: str = "convert"
) -> Recipe:
    """A recipe from ``convert(model, recipe, **options)`` (or ``inspect``, ``where``): options override the
    recipe's fields."""
    check_option_names(options, where)
    if recipe is None:
        return Recipe(**options)
    if isinstance(recipe, Mapping):
        recipe = Recipe.from_dict(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(
            f"recipe must be a mixcompile.compiler.Recipe, a dict or None, got {type(recipe).__name__}; "
            "pass options as keywords, e.g. convert(model, strategy='moe', num_experts=8)."
        )
    return dataclasses.replace(recipe, **options) if options else recipe
