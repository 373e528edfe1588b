"""Whole-slide prediction: peak memory and throughput of tiling + prediction at 1×, 4×, 16× tissue.

For every size a synthetic H&E slide (tissue piece of radius 1×, 2×, 4× the base) is written as
a tiled pyramidal OME-TIFF tile row by tile row (``synthetic_he_image(..., origin=...)``), then,
for every method, a **fresh process** reads it lazily (``sthisto.io.read_image``), detects the
tissue (``pp.tissue_mask``), places Visium-like pseudo-spots (``pp.tile``: 100 µm hexagonal grid,
55 µm spots) and predicts (``tl.predict``). Each child reports the time of each stage and its
peak resident memory (sampled every 5 ms), with the resident memory after imports and model
loading as baseline. Memory must stay flat while time grows with the tissue area.

Methods: ``ridge`` (handcrafted features), ``histosge_tiny`` (handcrafted features),
``histospace_tiny`` (pixels, per spot), and a THItoGene-sized-down section-wide model built here
from :class:`sthisto.models.thitogene.THItoGeneNet` (pixels, positions, kNN graph, attention over
the section; predicted in neighbourhoods of ``--chunk`` spots with a 3-spacing halo). The
registered ``thitogene_tiny`` / ``hggef_tiny`` are added when they exist. Neural methods use their
tiny variants, trained for a few epochs: throughput, not accuracy, is measured. CPU runs use one
torch thread (``--threads``); with CUDA present, ``--device cuda`` runs the GPU path.

A second part measures what neighbourhoods change against whole-section attention: the
section-wide model predicts a held-out section whole and in neighbourhoods of ``--chunk`` spots
with halos of 0–5 spot spacings (Pearson r over all values, max |difference|, and that max
relative to the predictions' standard deviation).

Run::

    python benchmarks/slide_prediction.py                 # all methods, sizes 1 4 16
    python benchmarks/slide_prediction.py --methods ridge --sizes 1 4
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASE_RADIUS_UM = 500.0
MICRONS_PER_PIXEL = 1.0
MARGIN_UM = 300.0


# ----------------------------------------------------------------------------- the section-wide model
def _register_thitogene_like():
    from sthisto.models import ExpressionModel
    from sthisto.models._registry import _METHODS, register_method
    from sthisto.models.thitogene import THItoGeneNet

    class THItoGeneLike(ExpressionModel):
        """THItoGene's network sized down (not the registered method): section-wide attention + GAT."""

        name = "bench_thitogene_like"
        input_kind = "pixels"
        network_class = THItoGeneNet
        section_wide = True
        uses_positions = True
        needs_graph = True
        batching = "section"
        data_defaults = {"patch_size_px": 112, "patch_size_um": 77.0, "graph_neighbors": 4, "target": "log10_1e4"}
        training_defaults = {"lr": 1e-3, "max_epochs": 3}

    if THItoGeneLike.name not in _METHODS:
        register_method(THItoGeneLike)
    return _METHODS[THItoGeneLike.name]


TINY_THITOGENE = {
    "depth": 1,
    "heads": 2,
    "dim_head": 16,
    "mlp_dim": 64,
    "capsules": 4,
    "capsule_dim": 8,
    "odconv_channels": 4,
    "capsnet_channels": (8, 8, 8, 16),
    "gat_heads": 2,
    "gat_dim": 16,
    "gat_out": 16,
    "head_hidden": 32,
    "dropout": 0.0,
    "token_dropout": 0.0,
    "gat_dropout": 0.0,
}


# ----------------------------------------------------------------------------- slides
def slide_geometry(area_factor: float) -> tuple[tuple[int, int], dict]:
    radius = BASE_RADIUS_UM * np.sqrt(area_factor)
    side_um = 2 * (radius * 1.35 + MARGIN_UM)
    side = int(np.ceil(side_um / MICRONS_PER_PIXEL))
    tissue = {"seed": 21, "tissue_center_um": (side_um / 2, side_um / 2), "tissue_radius_um": radius}
    return (side, side), tissue


def write_slide(path: Path, area_factor: float) -> tuple[int, int]:
    from sthisto.datasets import synthetic_he_image
    from sthisto.io._image import _write_pyramidal_tiff

    shape, tissue = slide_geometry(area_factor)

    def draw(origin, region, mpp):
        return synthetic_he_image(region, origin=origin, microns_per_pixel=mpp, **tissue)

    _write_pyramidal_tiff(path, shape, draw, microns_per_pixel=MICRONS_PER_PIXEL, n_levels=4)
    return shape


# ----------------------------------------------------------------------------- models
def train_models(folder: Path, methods: list[str], chunk: int) -> dict[str, Path]:
    import sthisto

    data = sthisto.datasets.synthetic(n_sections=2, n_spots=150, n_genes=50, geometry="visium", seed=3)
    paths = {}
    for method in methods:
        started = time.perf_counter()
        params: dict = {"progress": False, "store": False}
        if method in ("ridge", "histosge_tiny"):
            params["encoder"] = "handcrafted"
        if method == "histosge_tiny":
            params["max_epochs"] = 20
        if method == "histospace_tiny":
            params["max_epochs"] = 2
        if method == "bench_thitogene_like":
            _register_thitogene_like()
            params.update(TINY_THITOGENE, max_epochs=3)
        if method in ("thitogene_tiny", "hggef_tiny"):
            params["max_epochs"] = 2
        model = sthisto.tl.train(data, method, **params)
        if model.section_wide:
            model.data_params["prediction_chunk_spots"] = chunk
        paths[method] = model.save(folder / method)
        print(f"  trained {method} in {time.perf_counter() - started:.1f} s", flush=True)
    return paths


def registered_extras() -> list[str]:
    try:
        import sthisto

        names = sthisto.models.list_models()
    except Exception:  # a method module still being written may fail to import
        return []
    return [n for n in ("thitogene_tiny", "hggef_tiny") if n in names]


# ----------------------------------------------------------------------------- one measurement (child)
class _PeakRSS:
    """Resident memory of this process, sampled every 5 ms on a thread; the peak in MB."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0.0
        self.running = False

    def current(self) -> float:
        return self.process.memory_info().rss / 2**20

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def start(self) -> None:
        import threading

        self.running = True
        self.peak = self.current()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, self.current())


def child(model_path: str, slide_path: str, device: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import sthisto

    _register_thitogene_like()
    model = sthisto.io.load_model(model_path)
    # Modules the pipeline imports on first use count in the baseline, not as per-slide memory.
    for module in (
        "skimage.filters",
        "skimage.morphology",
        "sthisto.encoders",
        "sthisto.pp._embed",
        "sthisto.pp._tile",
    ):
        importlib.import_module(module)

    monitor = _PeakRSS()
    baseline = monitor.current()
    monitor.start()
    times = {}
    started = time.perf_counter()
    slide = sthisto.io.read_image(slide_path)
    times["read"] = time.perf_counter() - started
    started = time.perf_counter()
    sthisto.pp.tissue_mask(slide)
    times["mask"] = time.perf_counter() - started
    started = time.perf_counter()
    spots = sthisto.pp.tile(slide, spacing_um=100, diameter_um=55, grid="hex")
    times["tile"] = time.perf_counter() - started
    started = time.perf_counter()
    predicted = sthisto.tl.predict(spots, model, device=device, copy=True)
    times["predict"] = time.perf_counter() - started
    peak = monitor.stop()
    print(
        "RESULT "
        + json.dumps(
            {
                "n_spots": int(predicted.n_obs),
                "times": times,
                "baseline_mb": baseline,
                "peak_mb": peak,
                "streaming": json.loads(predicted.uns["sthisto"]["predict"][model.name]["streaming"] or "null"),
            }
        ),
        flush=True,
    )


def run_child(model_path: Path, slide_path: Path, device: str, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(model_path), str(slide_path), device, str(threads)],
        capture_output=True,
        text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"child failed:\n{done.stderr[-3000:]}")


# ----------------------------------------------------------------------------- neighbourhoods vs whole
def neighbourhood_effect(chunk: int, halos: list[float], methods: list[str]) -> None:
    import sthisto

    data = sthisto.datasets.synthetic(n_sections=3, n_spots=400, n_genes=30, geometry="visium", seed=8)
    train = data[data.obs["library_id"] != "S03"].copy()
    test = data[data.obs["library_id"] == "S03"].copy()
    for method in methods:
        params: dict = {"progress": False, "store": False, "max_epochs": 3}
        if method == "bench_thitogene_like":
            _register_thitogene_like()
            params.update(TINY_THITOGENE)
        model = sthisto.tl.train(train, method, **params)
        started = time.perf_counter()
        whole = model.predict(test)
        whole_s = time.perf_counter() - started
        spread = float(whole.std())
        print(f"\n{method}: held-out section of {test.n_obs} spots, whole-section attention {whole_s:.2f} s")
        print(
            f"  {'chunk':>6} {'halo':>5} {'units':>6} {'overhead':>9} {'pearson r':>10} {'max|diff|':>10} {'/sd':>6} {'s':>6}"
        )
        for halo in halos:
            model.data_params.update(prediction_chunk_spots=chunk, prediction_halo=halo)
            started = time.perf_counter()
            parts = model.predict(test)
            seconds = time.perf_counter() - started
            summary = model.prediction_summary
            r = float(np.corrcoef(parts.ravel(), whole.ravel())[0, 1])
            diff = float(np.abs(parts - whole).max())
            print(
                f"  {chunk:>6} {halo:>5g} {summary['n_units']:>6} {summary['context_overhead']:>9.2f} {r:>10.5f} "
                f"{diff:>10.4g} {diff / spread:>6.3f} {seconds:>6.2f}"
            )


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--chunk", type=int, default=128, help="core spots per neighbourhood (section-wide)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-neighbourhoods", action="store_true")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "SLIDE", "DEVICE", "THREADS"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    import torch

    torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = args.methods or [
        "ridge",
        "histosge_tiny",
        "histospace_tiny",
        "bench_thitogene_like",
        *registered_extras(),
    ]
    print(f"device: {device} (CUDA available: {torch.cuda.is_available()}), torch threads: {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("training models on synthetic Visium-like sections ...", flush=True)
        models = train_models(tmp, methods, args.chunk)
        slides = {}
        for size in args.sizes:
            started = time.perf_counter()
            shape = write_slide(tmp / f"slide_{size:g}x.ome.tif", size)
            slides[size] = tmp / f"slide_{size:g}x.ome.tif"
            mb = slides[size].stat().st_size / 2**20
            print(
                f"  wrote {size:g}x slide: {shape[0]} x {shape[1]} px, {mb:.0f} MB, {time.perf_counter() - started:.1f} s"
            )
        header = (
            f"\n{'method':<22} {'size':>5} {'spots':>6} {'tile s':>7} {'predict s':>10} {'spots/s':>8} "
            f"{'base MB':>8} {'peak MB':>8} {'peak-base':>9} {'units':>6}"
        )
        print(header)
        for method in methods:
            rows = []
            for size in args.sizes:
                result = run_child(models[method], slides[size], device, args.threads)
                rows.append(result)
                t = result["times"]
                tiling = t["read"] + t["mask"] + t["tile"]
                streaming = result["streaming"] or {}
                print(
                    f"{method:<22} {size:>4g}x {result['n_spots']:>6} {tiling:>7.2f} {t['predict']:>10.2f} "
                    f"{result['n_spots'] / t['predict']:>8.1f} {result['baseline_mb']:>8.0f} {result['peak_mb']:>8.0f} "
                    f"{result['peak_mb'] - result['baseline_mb']:>9.0f} {streaming.get('n_units', '-')!s:>6}",
                    flush=True,
                )
            peaks = [r["peak_mb"] for r in rows]
            per_spot = [r["times"]["predict"] / r["n_spots"] for r in rows]
            print(
                f"{'':<22} peak memory largest/smallest: {max(peaks) / min(peaks):.3f}; "
                f"predict time per spot largest/smallest size: {per_spot[-1] / per_spot[0]:.2f}"
            )
    if not args.skip_neighbourhoods:
        section_wide = [m for m in methods if m in ("bench_thitogene_like", "thitogene_tiny", "hggef_tiny")]
        neighbourhood_effect(args.chunk // 2, [0, 1, 2, 3, 5], section_wide)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
