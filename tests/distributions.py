"""Installed plugin distributions for the tests: what pip leaves of an unzipped wheel (its metadata and a
``mixcompile`` entry-points table) and the module it names, in a folder the test puts on ``sys.path``."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_distribution(
    site: Path, name: str, entry_points: str, module: str, source: str, version: str = "1.0"
) -> None:
    """Distribution ``name`` ``version`` in ``site``, declaring ``entry_points`` (``"acme = diag_acme"``
    lines), with ``module``'s ``source`` beside it."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mixcompile]\n{entry_points}\n")
