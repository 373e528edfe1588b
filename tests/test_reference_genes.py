"""The packaged her2st 785-gene list."""

from __future__ import annotations

import pytest

import sthisto


def test_785_unique_symbols():
    genes = sthisto.datasets.her2st_785_genes()
    assert len(genes) == 785 and len(set(genes)) == 785
    assert all(g and g == g.strip() and not g.startswith("#") and " " not in g for g in genes)
    assert genes[:3] == ["HPS6", "TNC", "NR1H2"]  # released order kept
    genes.append("extra")  # callers get their own list
    assert len(sthisto.datasets.her2st_785_genes()) == 785


@pytest.mark.real_data
def test_equals_the_shared_reference_file(her2st_dir):
    shared = (her2st_dir / "reference" / "her2st_785_genes.txt").read_text().split()
    assert sthisto.datasets.her2st_785_genes() == shared
