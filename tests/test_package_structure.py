"""The public API follows one contract (after scanpy's test_package_structure).

- every public name is documented in ``docs/api.md`` and has a numpydoc docstring;
- functions take the data object first, at most three positional parameters, everything
  else keyword-only;
- functions writing results name them with ``key_added`` and refuse to overwrite unless
  ``overwrite=True``; their Returns section says where results land;
- every parameter and return value is annotated;
- plots take ``show=`` / ``return_fig=`` / ``save=`` as scanpy's do.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

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
