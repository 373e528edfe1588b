"""``sthisto.settings.verbosity``: scanpy's levels; by default one line per call naming its keys."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sthisto
from sthisto._errors import InputError


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    adata = ad.AnnData(rng.poisson(3.0, size=(20, 5)).astype(np.float32))
    adata.obs["library_id"] = pd.Categorical(["s1"] * 20)
    return adata


@pytest.fixture(autouse=True)
def restore_verbosity():
    before = sthisto.settings.verbosity
    yield
    sthisto.settings.verbosity = before


def test_default_prints_one_line_naming_every_key_written(counts, capsys):
    assert sthisto.settings.verbosity == 2 and sthisto.settings.verbosity.name == "info"
    sthisto.pp.normalize(counts, key_added="target")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "normalize: added layers['target'], obs['target_size_factor'] and uns['sthisto']['normalize']['target']"
    ]
    assert "target" in counts.layers and "target_size_factor" in counts.obs


def test_hint_also_logs_each_key_as_written(counts, capsys):
    sthisto.settings.verbosity = "hint"
    sthisto.pp.normalize(counts, key_added="target")
    err = capsys.readouterr().err
    for key in ("layers['target']", "obs['target_size_factor']", "uns['sthisto']['normalize']['target']"):
        assert f"added adata.{key}\n" in err
    assert "normalize: added layers['target']" in err


def test_warning_level_is_silent_on_success(counts, capsys):
    sthisto.settings.verbosity = 1
    assert sthisto.settings.verbosity.name == "warning"
    sthisto.pp.normalize(counts, key_added="target")
    assert capsys.readouterr().err == ""


def test_a_summary_lists_only_the_keys_of_its_own_call(counts, capsys):
    sthisto.pp.normalize(counts, key_added="first")
    sthisto.pp.normalize(counts, key_added="second")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 2 and "first" not in lines[1] and "'second'" in lines[1]


def test_warnings_are_printed_with_their_level(capsys):
    sthisto.settings.verbosity = "warning"
    from sthisto._logging import logger

    logger.warning("something is off")
    logger.info("not shown")
    assert capsys.readouterr().err == "WARNING: something is off\n"


@pytest.mark.parametrize("value", [5, -1, "loud", True, 2.0])
def test_an_unknown_level_names_the_valid_ones(value):
    with pytest.raises(InputError, match=r"0 / 'error'.*4 / 'debug'"):
        sthisto.settings.verbosity = value
    assert sthisto.settings.verbosity == 2
