"""Sphinx configuration: myst-nb for Markdown pages and the tutorial notebooks."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from importlib.metadata import version as _version
from pathlib import Path

from sphinx.ext.napoleon.docstring import NumpyDocstring
from sphinx.pycode import ModuleAnalyzer

HERE = Path(__file__).parent

# sphinx-autodoc-typehints 3.6 calls a Sphinx API deprecated for Sphinx 10 once per docstring.
warnings.filterwarnings("ignore", message=".*_RstSnippetParser.set_application", module="sphinx_autodoc_typehints")

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
# The tutorials are committed without outputs; the build executes them, so that the pages show
# their figures, and this execution is also CI's check that every notebook runs (.ci/run runs
# no other). "cache" (jupyter-cache, in _build/.jupyter_cache) re-executes a notebook only when
# its code changed; STHISTO_DOCS_EXECUTE=off renders them unexecuted, for a quick look at text.
nb_execution_mode = os.environ.get("STHISTO_DOCS_EXECUTE", "cache")
# Seconds per cell: the longest (her2st training) takes about a minute on 2 cores. A slower
# machine can raise it with sphinx-build -D nb_execution_timeout=<seconds>.
nb_execution_timeout = 600
# A failing or timed-out cell is a warning (an error under -W, as in CI) with its traceback in
# the log; the other notebooks still run, so one build reports every broken notebook.
nb_execution_raise_on_error = False
nb_execution_show_tb = True
# A kernel keeps a backend named in the environment (CI exports MPLBACKEND=Agg), and Agg
# figures are never sent to the notebook: the pages would show no figure at all.
if not os.environ.get("MPLBACKEND", "").endswith("backend_inline"):
    os.environ.pop("MPLBACKEND", None)

# autosummary writes its pages as reStructuredText.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
# generated/cli holds the command-line help pulled into api.md with {include}, not pages.
exclude_patterns = ["_build", "**.ipynb_checkpoints", "generated/cli"]
templates_path = ["_templates"]
html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_title = "sthisto"
suppress_warnings = ["mystnb.unknown_mime_type"]


def _prose_section(field: str):
    """A napoleon section parser that keeps the section's text as written, as one ``field``."""

    def parse(self, section: str) -> list[str]:
        lines = self._strip_empty(self._dedent(self._consume_to_next_section()))
        # sphinx-autodoc-typehints marks the section with a lone ":" line (an empty numpydoc type).
        if lines and lines[0].strip() == ":":
            lines = self._strip_empty(lines[1:])
        return [f":{field}:", *self._indent(lines, 4), ""] if lines else []

    return parse


# sthisto's Returns / Yields sections are prose (what comes back, which keys are written), not
# numpydoc's "name : type" lists, which napoleon would split at every colon. Keep them as
# written, inside a :returns: field so sphinx-autodoc-typehints puts the return type beside it.
NumpyDocstring._parse_returns_section = _prose_section("returns")
NumpyDocstring._parse_yields_section = _prose_section("Yields")


def _constant_docstring(app, what, name, obj, options, lines) -> None:
    """Document a lazily exported constant with the docstring written beside its definition.

    autodoc looks for a constant's docstring in the package that exports it, finds none there
    (the sub-packages export names lazily) and falls back to the docstring of the value's type
    (``float``, ``tuple``). The defining module is one of the package's private modules.
    """
    if what != "data":
        return
    package, _, attribute = name.rpartition(".")
    for module_name in sorted(m for m in sys.modules if m.startswith(f"{package}._")):
        try:
            attribute_docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except Exception:  # a compiled or source-less module: nothing to read
            continue
        if ("", attribute) in attribute_docs:
            lines[:] = [line for line in attribute_docs["", attribute] if line is not None]
            return


def _copy_tutorials(app, config) -> None:
    """Render the notebooks of ``tutorials/`` (kept at the repository root for users).

    They are copied into ``docs/tutorials/`` (git-ignored) before Sphinx looks for sources;
    copies whose notebook is gone are removed so that no stale page is built.
    """
    source = HERE.parent / "tutorials"
    target = HERE / "tutorials"
    target.mkdir(exist_ok=True)
    notebooks = {notebook.name: notebook for notebook in source.glob("*.ipynb")}
    for stale in target.glob("*.ipynb"):
        if stale.name not in notebooks:
            stale.unlink()
    for name, notebook in notebooks.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != notebook.read_bytes():
            shutil.copy2(notebook, copy)


def _point_tutorials_at_shared_data(app, config) -> None:
    """Let the executed copies find the data the notebooks in ``tutorials/`` find.

    The notebooks look for ``../../shared/data`` (beside the repository) unless
    ``STHISTO_SHARED_DATA`` is set; their copies run one folder deeper, in ``docs/tutorials/``.
    """
    shared = HERE.parent.parent / "shared" / "data"
    if "STHISTO_SHARED_DATA" not in os.environ and shared.is_dir():
        os.environ["STHISTO_SHARED_DATA"] = str(shared.resolve())


def _write_cli_help(app, config) -> None:
    """Write ``sthisto [<command>] --help`` of the installed package for ``api.md`` to include."""
    from sthisto.cli import build_parser

    target = HERE / "generated" / "cli"
    target.mkdir(parents=True, exist_ok=True)
    # argparse wraps help to the terminal width; fix it so the pages do not depend on where they are built.
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        blocks = [("sthisto --help", parser.format_help())]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, subparser in action.choices.items():
                    blocks.append((f"sthisto {name} --help", subparser.format_help()))
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    text = "".join(
        f"````{{code-block}} text\n:caption: `{caption}`\n\n{body.rstrip()}\n````\n\n" for caption, body in blocks
    )
    help_file = target / "help.md"
    if not help_file.exists() or help_file.read_text() != text:
        help_file.write_text(text)


def setup(app) -> None:
    # After napoleon (500), which would read "text: more text" in these docstrings as "type: description".
    app.connect("autodoc-process-docstring", _constant_docstring, priority=600)
    # config-inited comes before Sphinx discovers the source files.
    app.connect("config-inited", _copy_tutorials)
    app.connect("config-inited", _point_tutorials_at_shared_data)
    app.connect("config-inited", _write_cli_help)
