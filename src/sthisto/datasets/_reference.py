"""Reference gene lists shipped with sthisto."""

from __future__ import annotations

from importlib import resources


def _read_gene_list(name: str) -> list[str]:
    text = resources.files("sthisto.datasets").joinpath("_data", name).read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def her2st_785_genes() -> list[str]:
    """The 785 genes predicted on the her2st data by Hist2ST, THItoGene and HGGEF.

    The authors took the top-1000 highly variable genes of each her2st section and dropped
    genes non-zero in fewer than 1000 spots. That list cannot be recomputed exactly with
    scanpy, so sthisto ships it as released (Andersson et al., Nat Commun 12, 6012, 2021,
    data; gene list as used by the THItoGene and HGGEF papers), in the released order.

    Returns
    -------
    The 785 gene symbols, a new list on each call.

    Examples
    --------
    >>> genes = sthisto.datasets.her2st_785_genes()
    >>> adata = adata[:, genes]  # all 785 are measured in every her2st section
    """
    return _read_gene_list("her2st_785_genes.txt")
