"""Sphinx configuration: myst-nb for Markdown pages and the tutorial notebooks."""

from __future__ import annotations

import shutil
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).parent

project = "sthisto"
author = "sthisto developers"
copyright = "2026, sthisto developers"
release = _version("sthisto")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
typehints_defaults = "comma"
always_document_param_types = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
# CI executes the notebooks separately (.ci/run); Read the Docs executes them here.
nb_execution_mode = "auto"
nb_execution_timeout = 900
nb_execution_raise_on_error = True

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path = ["_templates"]
html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_title = "sthisto"
suppress_warnings = ["mystnb.unknown_mime_type"]


def _copy_tutorials(app) -> None:
    """Render the notebooks of ``tutorials/`` (kept at the repository root for users)."""
    target = HERE / "tutorials"
    target.mkdir(exist_ok=True)
    for notebook in sorted((HERE.parent / "tutorials").glob("*.ipynb")):
        shutil.copy2(notebook, target / notebook.name)


def setup(app) -> None:
    app.connect("builder-inited", _copy_tutorials)
