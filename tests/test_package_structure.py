"""The public API follows one contract (after scanpy's test_package_structure).

- every public name is documented in ``docs/api.md`` and has a numpydoc docstring;
- functions take the data object first, at most three positional parameters, everything
  else keyword-only;
- functions writing results name them with ``key_added`` and refuse to overwrite unless
  ``overwrite=True``; their Returns section says where results land;
- every parameter and return value is annotated;
- plots take ``show=`` / ``return_fig=`` / ``save=`` as scanpy's do;
- ``copy=False`` writes in place and returns ``None``, ``copy=True`` returns the new object
  (checked by calling every function that has ``copy``); functions that return a new object
  or a table by design have no ``copy``;
- one name per knob: the alternative spellings in ``BANNED`` appear in no public signature
  (the old names live on only in deprecation shims, which warn).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("pp", "tl", "pl", "io", "datasets", "models", "encoders")
DATA_FIRST = {"adata", "sdata", "data", "adata_or_sdata", "sdata_or_adata"}
# Functions whose first argument is not an AnnData by nature (paths, names, arrays, models).
NOT_DATA_FIRST = {
    "io.read_her2st",
    "io.read_hest",
    "io.read_visium",
    "io.read_image",
    "io.load_model",
    "io.from_spatialdata",
    "models.create",
    "models.list_models",
    "models.register_method",
    "encoders.get_encoder",
    "encoders.cpu_batch_size",
    "encoders.list_encoders",
    "encoders.register_encoder",
    "encoders.read_state_dict",
    "encoders.load_weights_strict",
    "encoders.weights_provenance",
    "encoders.provenance_label",
    "encoders.weights_label",
    "tl.list_methods",
    "datasets.synthetic",
    "datasets.synthetic_he_image",
    "datasets.synthetic_bins",
    "datasets.synthetic_transcripts",
    "datasets.her2st_785_genes",
    "pp.normalize_counts",
    "pp.size_factors",
    "pp.knn_edge_index",
    "pl.training_curves",
}


def _public():
    for package in SUBPACKAGES:
        module = importlib.import_module(f"sthisto.{package}")
        for name in module.__all__:
            yield f"{package}.{name}", getattr(module, name)


PUBLIC = dict(_public())
FUNCTIONS = {name: obj for name, obj in PUBLIC.items() if inspect.isfunction(obj)}


def test_public_api_is_not_empty():
    for required in ("pp.normalize", "pp.embed", "tl.train", "tl.predict", "io.read_her2st", "models.create"):
        assert required in PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_documented_in_api_page(name):
    api = (REPO / "docs" / "api.md").read_text()
    assert f"{name.split('.')[1]}" in api and f"sthisto.{name.split('.')[0]}" in api, (
        f"sthisto.{name} is public but not listed in docs/api.md"
    )
    package, attribute = name.split(".")
    section = api.split(f"sthisto.{package}", 1)[1] if f"sthisto.{package}" in api else ""
    assert f"\n    {attribute}\n" in section or f"   {attribute}\n" in section, f"{name} missing from docs/api.md"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_has_numpydoc_docstring(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj)
    assert doc and len(doc.splitlines()[0]) > 10, f"sthisto.{name} needs a summary line"
    if inspect.isfunction(obj):
        parameters = [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
        if parameters:
            assert "Parameters\n----------" in doc, f"sthisto.{name} lacks a Parameters section"
        returns_nothing = inspect.signature(obj).return_annotation in (None, "None")
        assert returns_nothing or "Returns\n-------" in doc or "Yields\n------" in doc, (
            f"sthisto.{name} lacks a Returns section"
        )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_at_most_three_positional_parameters(name):
    signature = inspect.signature(FUNCTIONS[name])
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, (
        f"sthisto.{name} has {len(positional)} positional parameters; make options keyword-only"
    )


@pytest.mark.parametrize("name", sorted(set(FUNCTIONS) - NOT_DATA_FIRST))
def test_data_object_first(name):
    parameters = list(inspect.signature(FUNCTIONS[name]).parameters)
    assert parameters and parameters[0] in DATA_FIRST, f"sthisto.{name} should take the data object first"


@pytest.mark.parametrize(
    "name", sorted(n for n, f in FUNCTIONS.items() if "key_added" in inspect.signature(f).parameters)
)
def test_key_added_comes_with_overwrite_and_documented_keys(name):
    function = FUNCTIONS[name]
    parameters = inspect.signature(function).parameters
    assert parameters["key_added"].kind == inspect.Parameter.KEYWORD_ONLY
    assert "overwrite" in parameters, f"sthisto.{name} writes results but cannot be told to overwrite"
    returns = inspect.getdoc(function).split("Returns\n-------", 1)[1]
    assert any(slot in returns for slot in ("obs", "var", "layers", "uns", "obsm", "obsp", "AnnData")), (
        f"sthisto.{name}'s Returns section must list the keys it writes"
    )


@pytest.mark.parametrize("name", sorted(n for n, f in FUNCTIONS.items() if "copy" in inspect.signature(f).parameters))
def test_copy_contract_is_documented(name):
    function = FUNCTIONS[name]
    assert inspect.signature(function).parameters["copy"].default is False
    returns = inspect.getdoc(function).split("Returns\n-------", 1)[1]
    assert "None" in returns or "copy" in returns, f"sthisto.{name} must say it returns None in place / the copy"


@pytest.mark.parametrize("name", sorted(n for n in FUNCTIONS if n.startswith("pl.")))
def test_plots_follow_scanpys_show_and_return_fig(name):
    parameters = inspect.signature(FUNCTIONS[name]).parameters
    for option, default in (("show", None), ("return_fig", False), ("save", None)):
        assert option in parameters, f"sthisto.{name} lacks {option}= (scanpy's plotting convention)"
        assert parameters[option].kind == inspect.Parameter.KEYWORD_ONLY and parameters[option].default is default
    returns = inspect.getdoc(FUNCTIONS[name]).split("Returns\n-------", 1)[1]
    assert "None" in returns, f"sthisto.{name}'s Returns section must say it returns None when it shows the figure"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_annotated(name):
    signature = inspect.signature(FUNCTIONS[name])
    bare = [p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert not bare, f"sthisto.{name}: annotate {bare} (e.g. adata: AnnData)"
    assert signature.return_annotation is not inspect.Signature.empty, f"sthisto.{name} needs a return annotation"


# ---- copy= -------------------------------------------------------------------------------------
# Functions that write results (they take key_added) and return a new object or a table by
# design: they have no copy=, and their Returns section says what new thing they give.
RETURNS_BY_DESIGN = {
    "pp.tile": "new AnnData",  # pseudo-spots cannot be added to the slide's AnnData in place
    "pp.pool": "new AnnData",  # pseudo-spots summed from bins or transcripts
    "tl.superresolve": "new AnnData",  # spots between the measured ones
    "tl.evaluate": "new table",  # the metrics table, also stored in uns
    "tl.cross_validate": "table",  # the metrics table; out-of-fold predictions land in layers
    "tl.train": "model",  # the trained model object, also stored in uns
}

WRITERS = {n for n, f in FUNCTIONS.items() if "key_added" in inspect.signature(f).parameters}
WITH_COPY = {n for n, f in FUNCTIONS.items() if "copy" in inspect.signature(f).parameters}


def test_every_writer_either_has_copy_or_returns_by_design():
    assert set(RETURNS_BY_DESIGN) <= set(FUNCTIONS)
    undecided = sorted(WRITERS - WITH_COPY - set(RETURNS_BY_DESIGN))
    assert not undecided, f"{undecided} write results: give them copy= or list them in RETURNS_BY_DESIGN"
    both = sorted(WITH_COPY & set(RETURNS_BY_DESIGN))
    assert not both, f"{both} return a new object by design and must not take copy="


@pytest.mark.parametrize("name", sorted(RETURNS_BY_DESIGN))
def test_returns_by_design_says_so(name):
    returns = inspect.getdoc(FUNCTIONS[name]).split("Returns\n-------", 1)[1]
    assert RETURNS_BY_DESIGN[name] in " ".join(returns.replace("*", "").split()), (
        f"sthisto.{name}'s Returns section must say it returns a {RETURNS_BY_DESIGN[name]} by design"
    )


def _key_paths(mapping, prefix=()):
    for key, value in mapping.items():
        yield (*prefix, str(key))
        if isinstance(value, dict):
            yield from _key_paths(value, (*prefix, str(key)))


def _fingerprint(adata):
    """Every key a call could add, in every slot and anywhere inside uns."""
    slots = {slot: sorted(map(str, getattr(adata, slot).keys())) for slot in ("obsm", "layers", "obsp", "varm")}
    return (sorted(adata.obs.columns), sorted(adata.var.columns), slots, sorted(_key_paths(adata.uns)))


@pytest.fixture(scope="module")
def copy_case():
    import sthisto

    adata = sthisto.datasets.synthetic(n_sections=2, n_spots=20, n_genes=12, seed=0)
    model = sthisto.tl.train(
        adata.copy(), "ridge", features_key="synthetic_morphology", n_components=4, progress=False, store=False
    )
    return adata, model


# How to call each function that has copy= on the tiny data (image-only input where it matters).
COPY_CALLS = {
    "pp.embed": lambda a, m: ((a,), {"encoder": "handcrafted", "libraries": ["S01"], "progress": False}),
    "pp.normalize": lambda a, m: ((a,), {}),
    "pp.select_genes": lambda a, m: ((a,), {"n_top_genes": 5, "min_spots": 1}),
    "pp.spatial_graph": lambda a, m: ((a,), {}),
    "pp.stain_normalize": lambda a, m: ((a,), {"reference": "S01", "image_key": "hires", "max_fit_side": 200}),
    "pp.tissue_mask": lambda a, m: ((a,), {}),
    "tl.predict": lambda a, m: ((a, m), {"device": "cpu"}),
    "tl.predict_distributed": lambda a, m: ((a, m), {"device": "cpu", "devices": 1}),
}
IMAGE_ONLY = {"tl.predict", "tl.predict_distributed"}


def test_every_function_with_copy_is_called_below():
    assert set(COPY_CALLS) == WITH_COPY, "add a call for each public function that has copy= to COPY_CALLS"


@pytest.mark.parametrize(
    ("name", "image_only"),
    [(n, False) for n in sorted(COPY_CALLS)] + [(n, True) for n in sorted(IMAGE_ONLY)],
)
def test_copy_false_returns_none_and_copy_true_the_new_object(name, image_only, copy_case):
    base, model = copy_case
    base = base[:, []].copy() if image_only else base

    adata = base.copy()
    args, kwargs = COPY_CALLS[name](adata, model)
    before = _fingerprint(adata)
    assert FUNCTIONS[name](*args, copy=False, **kwargs) is None, f"sthisto.{name}(copy=False) must return None"
    assert _fingerprint(adata) != before, f"sthisto.{name}(copy=False) must write into its input"

    adata = base.copy()
    args, kwargs = COPY_CALLS[name](adata, model)
    result = FUNCTIONS[name](*args, copy=True, **kwargs)
    assert type(result).__name__ == "AnnData" and result is not adata, f"sthisto.{name}(copy=True) must return it"
    assert _fingerprint(adata) == before, f"sthisto.{name}(copy=True) must leave its input unchanged"
    assert _fingerprint(result) != before


# ---- one name per knob -------------------------------------------------------------------------
# Alternative spellings of one knob -> the package's name (scanpy's where it has one; the design
# fixes seed= and device=). Old names survive only as deprecation shims that warn.
BANNED = {
    "progress_bar": "progress",
    "show_progress": "progress",
    "random_state": "seed",
    "random_seed": "seed",
    "rng": "seed",
    "accelerator": "device",
    "key_add": "key_added",
    "added_key": "key_added",
    "out_key": "key_added",
    "output_key": "key_added",
    "inplace": "copy",
    "n_neighbours": "n_neighbors",
}


# Renamed or removed this release; each old spelling keeps working, with a FutureWarning, until the next.
DEPRECATED = {
    "tl.train": {"progress_bar"},
    "tl.pretrain_autoencoder": {"progress_bar"},
    "tl.predict_distributed": {"progress_bar", "accelerator"},
    "tl.evaluate": {"copy"},
    "pp.stain_normalize": {"random_state"},
    "pp.tile": {"copy"},
    "pp.pool": {"copy"},
}


def test_deprecated_spellings_have_their_shims():
    shims = {n: set(getattr(f, "__deprecated_parameters__", {})) for n, f in FUNCTIONS.items()}
    assert {n: s for n, s in shims.items() if s} == DEPRECATED


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_one_name_per_knob(name):
    parameters = inspect.signature(FUNCTIONS[name]).parameters
    stray = {p: BANNED[p] for p in parameters if p in BANNED}
    assert not stray, f"sthisto.{name}: rename {stray} (old name kept as a deprecated shim)"
    for old, new in getattr(FUNCTIONS[name], "__deprecated_parameters__", {}).items():
        assert old not in parameters, f"sthisto.{name} shows its deprecated {old}= in the signature"
        assert new is None or new in parameters, f"sthisto.{name}: deprecated {old}= maps to missing {new}="


def test_cli_flags_use_the_same_names():
    from sthisto.cli import build_parser

    def flags(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from flags(sub)
            yield from (f.lstrip("-").replace("-", "_") for f in action.option_strings)

    stray = sorted(set(flags(build_parser())) & set(BANNED))
    assert not stray, f"CLI flags {stray} should be spelled {[BANNED[s] for s in stray]}"


def test_deprecated_spellings_still_work_and_warn():
    from sthisto._deprecate import removed_copy, renamed_parameters
    from sthisto._errors import InputError

    @renamed_parameters(random_state="seed")
    def draw(n: int, *, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).random(n)

    with pytest.warns(FutureWarning, match="use seed= instead"):
        old = draw(3, random_state=7)
    np.testing.assert_array_equal(old, draw(3, seed=7))
    assert "random_state" not in inspect.signature(draw).parameters
    with pytest.raises(InputError, match="pass seed= only"):
        draw(3, random_state=1, seed=1)

    @removed_copy("Use tile(copy_images=...).", on_copy=lambda f, args, kwargs: ("old copy", f(*args, **kwargs)))
    def tile(x: int) -> int:
        return x + 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tile(1) == 2  # the new spelling warns nothing
    with pytest.warns(FutureWarning, match="returns a new object by design. Use tile"):
        assert tile(1, copy=True) == ("old copy", 2)
