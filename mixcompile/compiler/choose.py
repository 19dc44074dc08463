"""Choose which FFN sites a recipe converts: its ``sites`` selection, then its ``filter_fn``."""

from __future__ import annotations

from mixcompile.compiler.find import FFNSite
from mixcompile.compiler.recipe import Recipe
from mixcompile.errors import ConfigError


class SitesOutOfRange(ConfigError):
    """Indices in a recipe's ``sites`` for which the model has no FFN site; ``reason`` says so without
    naming ``sites`` (the command line names its ``--layers`` instead)."""

    def __init__(self, bad: list[int], count: int) -> None:
        self.reason = f"{bad} out of range: the model has {count} FFN sites (0..{count - 1})."
        super().__init__(f"sites {self.reason}")


def select_sites(recipe: Recipe, sites: list[FFNSite]) -> list[FFNSite]:
    """The sites ``recipe`` converts, in model order."""
    count = len(sites)
    if recipe.sites == "all":
        chosen = list(range(count))
    elif recipe.sites == "last_half":
        chosen = list(range(count // 2, count))
    elif isinstance(recipe.sites, str):
        every = int(recipe.sites.split(":")[1])
        chosen = list(range(every - 1, count, every))
    else:
        bad = [i for i in recipe.sites if not -count <= i < count]
        if bad:
            raise SitesOutOfRange(bad, count)
        chosen = sorted({i % count for i in recipe.sites})
    picked = [sites[i] for i in chosen]
    if recipe.filter_fn is not None:
        picked = [site for site in picked if recipe.filter_fn(site.unit.module, site.path)]
    return picked
