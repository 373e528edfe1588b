"""The README's promises: its quickstart runs as written, and CI runs its set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_runs_and_predicts_the_image_dependent_genes():
    namespace: dict = {}
    exec(compile(_blocks("python")[0], "README quickstart", "exec"), namespace)
    test = namespace["test"]
    assert "ridge" in test.layers and "sthisto_target" in test.layers
    import sthisto

    per_gene = sthisto.tl.get_metrics(test, "ridge", per_gene=True).set_index("gene")["pearson"]
    dependent = per_gene[per_gene.index.str.startswith("SYN_DEP")]
    independent = per_gene[per_gene.index.str.startswith("SYN_IND")]
    assert dependent.mean() > 0.3 and abs(independent.mean()) < 0.1
    assert np.isfinite(np.asarray(test.layers["ridge"])).all()
    plt.close("all")


def test_ci_runs_the_readme_set_up_commands():
    install, run_tests = (line.strip() for line in _blocks("bash")[0].strip().splitlines()[:2])
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install" in install and "-c constraints.txt" in install and '".[test]"' in install
    assert install.endswith("&& .venv/bin/sthisto demo --out demo_report")  # set-up ends in the main job
    assert install in ci.splitlines()
    assert run_tests in ci
    assert "ruff check" in ci
    # The docs build executes the tutorials (their only run in CI) and fails on any warning.
    assert "sphinx-build -W --keep-going" in ci and "check_docs_figures.py" in ci
    assert '"cache"' in (REPO / "docs" / "conf.py").read_text()
