"""Draw ``docs/_static/overview.png``, the README's picture, by running the README quickstart.

Run from the repository root: ``python docs/_scripts/overview_figure.py``.
"""

from __future__ import annotations

from pathlib import Path

import sthisto

OUT = Path(__file__).resolve().parents[1] / "_static" / "overview.png"


def main() -> None:
    """Train on two synthetic sections, predict the third, save observed vs predicted maps."""
    adata = sthisto.datasets.synthetic(n_sections=3, n_spots=300, seed=0)
    sections = list(adata.obs["library_id"].cat.categories)
    model = sthisto.tl.train(adata, method="ridge", train_mask=sections[:2])
    test = adata[adata.obs["library_id"] == sections[2]].copy()
    sthisto.tl.predict(test, model)
    sthisto.tl.evaluate(test, predicted="ridge")
    per_gene = sthisto.tl.get_metrics(test, "ridge", per_gene=True).set_index("gene")["pearson"]
    genes = list(per_gene.sort_values(ascending=False).index[:2])
    sthisto.pp.normalize(test)
    figure = sthisto.pl.gene_maps(
        test,
        genes,
        layers=["sthisto_target", "ridge"],
        titles=["measured (held-out section)", "predicted from H&E"],
        panel_size=2.6,
        spot_scale=1.8,
        return_fig=True,
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}; genes {genes}, Pearson {[round(float(per_gene[g]), 3) for g in genes]}")


if __name__ == "__main__":
    main()
