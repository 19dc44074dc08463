"""The generated Hugging Face zoo (``tests/zoo.py``: every text family transformers ships, built from its
own config class shrunk to a tiny size). The default run checks a representative sample; ``pytest -m
zoo_full`` checks every family against the published table, ``docs/results/zoo_coverage.md``: a family
listed as converted must still be converted (every FFN found, upcycled MoE equal to dense, MoT forward
and backward on a padded batch, ``generate`` equal to dense), and one listed as not converted must still
fail for the reason the table gives (so a fix, or a new failure, shows up as a table to regenerate with
``python benchmarks/zoo_coverage.py --markdown docs/results/zoo_coverage.md``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from zoo import coverage, hf_families

pytestmark = pytest.mark.filterwarnings("ignore")

TABLE = Path(__file__).resolve().parents[2] / "docs" / "results" / "zoo_coverage.md"
# A sample of the rewrites and layouts: inline functional dropout (BART), flattened tokens (OPT), a
# sequence-first encoder (XLNet), an encoder-decoder with gated FFNs (mT5), a fused gate-up (Phi-3), a
# decoder with shared experts (Qwen2-MoE) and an encoder (RoBERTa).
SAMPLE = ("bart", "opt", "xlnet", "mt5", "phi3", "qwen2_moe", "roberta")
FAMILIES = {family.name: family for family in hf_families()}


def published() -> dict[str, str]:
    """family -> ``"converted"`` or the reason the table gives."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[1] not in ("head", "---", "hand-written"):
            rows[cells[0]] = "converted" if cells[7] == "yes" else cells[8]
    return rows


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_family_is_converted(name: str) -> None:
    row = coverage(FAMILIES[name])
    assert row.converted, row
    assert row.expected in (None, row.found), row


def test_the_published_table_lists_every_family() -> None:
    assert set(published()) == set(FAMILIES)


@pytest.mark.zoo_full
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_is_as_published(name: str) -> None:
    outcome = coverage(FAMILIES[name]).outcome.replace("|", "/")
    expected = published()[name]
    if expected == "converted":
        assert outcome == "converted"
    else:  # the same failure (reason texts may carry sizes that vary: compare their start)
        assert outcome != "converted", f"{name} converts now: regenerate the table"
        assert outcome[:40] == expected[:40], (outcome, expected)
