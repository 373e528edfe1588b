"""Patch throughput: patches/s and peak memory of sthisto.pp.PatchDataset against a naive crop loop.

Geometry is THItoGene's: 112 × 112 px patches over 77 µm (``PatchSpec(size_px=112, size_um=77.0)``).
Two slides are used when available:

* ``her2st-C2`` — the real her2st section C2 image (9274 × 9911 px at its fitted ≈0.688 µm/px, so
  the crop is 112 native pixels and nothing is resampled: THItoGene's case exactly), read with
  :func:`sthisto.io.read_her2st` from ``../shared/data/her2st`` (skipped when absent);
* ``synthetic`` — :func:`sthisto.datasets.synthetic_he_image` at 0.5 µm/px (a 20x scan), so each
  77 µm crop is 154 px and is resampled to 112 (the physical-scale case).

On each slide ``--spots`` spot centres lie on a row-major grid over the whole image (the outer
ring reaches past the border, so padding is exercised too), and each slide is served from these
image sources (``--sources``; the first two by default):

* ``memory`` — the decoded image held as a NumPy array in ``images['fullres']``;
* ``tiff``   — a tiled (256 px, JPEG), pyramidal TIFF written to a temporary folder and opened
  with :func:`sthisto.io.read_image`: a lazy dask view, which PatchDataset reads region by
  region straight through tifffile's zarr store;
* ``dask``   — the same TIFF as a plain user-made dask array (``dask.array.from_zarr``), which
  PatchDataset reads through dask slicing (about 3x slower than ``tiff``, so not by default).

Two ways to get the patches of every spot, each consumed in batches by the same stand-in for a
model (per-patch mean):

* ``PatchDataset`` — ``PatchDataset(adata, spec=...)`` then ``read_batch`` over consecutive
  batches of ``--batch-size`` spots: patches are cut on request and never all held at once;
* ``naive`` — a per-spot loop: crop the window from the full-resolution NumPy image (padding
  with white at the border), resize it to 112 px with PIL (bilinear), then ``np.stack`` all
  patches. For the lazy sources the loop first reads the whole TIFF into memory
  (``tifffile.imread``), as a simple script would.

Every pass runs in a process forked from this one (Linux), so its peak resident memory above
the RSS at its start (sampled every 2 ms) is its own; images held in memory are inherited and
count in the baseline, not in the peak. PatchDataset and naive passes alternate, ``--repeats``
times, and the table gives medians and the PatchDataset / naive ratios of the same run. A
further pass checks that both paths give the same patches (max and mean absolute difference per
pixel; they differ by resampling: torch's antialiased bilinear vs PIL's bilinear filter).

Run::

    python benchmarks/patch_throughput.py                      # both slides, 3000 spots, memory + tiff
    python benchmarks/patch_throughput.py --sources memory tiff dask --repeats 3
    python benchmarks/patch_throughput.py --images synthetic --synthetic-side 8000 --order random

Target: PatchDataset at least as fast as the naive loop on in-memory images, and its extra peak
memory bounded by the batch (tens of MB) while the naive loop's grows with the number of spots
(and, on lazy sources, with the whole image).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on shared cores

import anndata as ad
import numpy as np
import pandas as pd
import psutil

PATCH_PX = 112
PATCH_UM = 77.0
SYNTHETIC_MPP = 0.5
TIFF_TILE = 256
MiB = 1024**2
DEFAULT_HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


# ----------------------------------------------------------------------------- slides
def load_her2st_c2(root: Path) -> tuple[np.ndarray, float]:
    """The C2 image as decoded by sthisto and its µm/px fitted by ``read_her2st``."""
    from PIL import Image

    import sthisto

    adata = sthisto.io.read_her2st(root, sections="C2")
    entry = adata.uns["spatial"]["C2"]
    Image.MAX_IMAGE_PIXELS = None  # a whole section is legitimately large
    with Image.open(entry["metadata"]["image_path"]) as file:
        image = np.asarray(file.convert("RGB"))
    return image, float(entry["scalefactors"]["microns_per_pixel"])


def synthetic_slide(side: int, seed: int) -> tuple[np.ndarray, float]:
    import sthisto

    return sthisto.datasets.synthetic_he_image((side, side), microns_per_pixel=SYNTHETIC_MPP, seed=seed), SYNTHETIC_MPP


def spot_grid(height: int, width: int, n_spots: int, crop_side: int, order: str, seed: int) -> np.ndarray:
    """``n_spots`` (x, y) centres on a row-major grid; the outer ring's patches cross the border."""
    per_row = max(1, int(np.ceil(np.sqrt(n_spots * width / height))))
    rows = int(np.ceil(n_spots / per_row))
    edge = crop_side / 4.0
    xs = np.linspace(edge, width - 1 - edge, per_row)
    ys = np.linspace(edge, height - 1 - edge, rows)
    grid = np.array([(x, y) for y in ys for x in xs])[:n_spots]
    if order == "random":
        grid = grid[np.random.default_rng(seed).permutation(len(grid))]
    return grid


def write_tiff(path: Path, image: np.ndarray, compression: str) -> None:
    """Tiled TIFF with a 4x-reduced sub-resolution (as whole-slide scanners write them)."""
    import tifffile

    options = {"tile": (TIFF_TILE, TIFF_TILE), "photometric": "rgb"}
    if compression == "jpeg":
        options |= {"compression": "jpeg", "compressionargs": {"level": 90}}
    elif compression == "zlib":
        options |= {"compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        tif.write(image, subifds=1, **options)
        tif.write(np.ascontiguousarray(image[::4, ::4]), subfiletype=1, **options)


# ----------------------------------------------------------------------------- the two paths
def naive_patches(image: np.ndarray, centres: np.ndarray, crop_side: int, size: int) -> np.ndarray:
    """Per spot: pad-crop the window, resize with PIL, keep it; then stack. ``(n, size, size, 3)``."""
    from PIL import Image

    height, width = image.shape[:2]
    patches = []
    for x, y in centres:
        x0 = int(np.rint(x - crop_side / 2.0))
        y0 = int(np.rint(y - crop_side / 2.0))
        window = np.full((crop_side, crop_side, 3), 255, dtype=np.uint8)
        ya, yb, xa, xb = max(y0, 0), min(y0 + crop_side, height), max(x0, 0), min(x0 + crop_side, width)
        window[ya - y0 : yb - y0, xa - x0 : xb - x0] = image[ya:yb, xa:xb, :3]
        patches.append(np.asarray(Image.fromarray(window).resize((size, size), Image.BILINEAR)))
    return np.stack(patches)


def consume(batch) -> np.ndarray:
    """Stand-in for a model: per-patch mean of a uint8 ``(b, 3, h, w)`` batch."""
    return batch.float().mean(dim=(1, 2, 3)).numpy()


def spots_adata(centres: np.ndarray, library: str, entry: dict) -> ad.AnnData:
    obs = pd.DataFrame(
        {"library_id": pd.Categorical([library] * len(centres))}, index=[f"s{i}" for i in range(len(centres))]
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["spatial"] = np.asarray(centres, dtype=float)
    adata.uns["spatial"] = {library: entry}
    return adata


def open_source(slide: dict, source: str) -> ad.AnnData:
    """AnnData of the slide's spots whose full-resolution image comes from ``source``."""
    import sthisto

    if source == "memory":
        entry = {
            "images": {"fullres": slide["image"]},
            "scalefactors": {"microns_per_pixel": slide["mpp"]},
            "metadata": {"has_image": True},
        }
        return spots_adata(slide["centres"], slide["name"], entry)
    library = "slide"
    entry = sthisto.io.read_image(slide["tiff"], microns_per_pixel=slide["mpp"], library_id=library).uns["spatial"][
        library
    ]
    if source == "dask":
        import dask.array as da
        import tifffile
        import zarr

        level = zarr.open(tifffile.imread(slide["tiff"], aszarr=True, level=0), mode="r")
        entry["images"]["fullres"] = da.from_zarr(level if hasattr(level, "shape") else level["0"])
    return spots_adata(slide["centres"], library, entry)


def run_patchdataset(adata, spec, batch_size: int) -> np.ndarray:
    from sthisto.pp import PatchDataset

    dataset = PatchDataset(adata, spec=spec)
    means = np.empty(len(dataset))
    for start in range(0, len(dataset), batch_size):
        stop = min(start + batch_size, len(dataset))
        patches, _ = dataset.read_batch(range(start, stop))
        means[start:stop] = consume(patches)
    return means


def run_naive(slide: dict, source: str, batch_size: int) -> np.ndarray:
    import tifffile
    import torch

    image = slide["image"] if source == "memory" else tifffile.imread(slide["tiff"], level=0)
    stacked = torch.from_numpy(naive_patches(image, slide["centres"], slide["crop_side"], PATCH_PX)).permute(0, 3, 1, 2)
    means = np.empty(len(stacked))
    for start in range(0, len(stacked), batch_size):
        means[start : start + batch_size] = consume(stacked[start : start + batch_size])
    return means


# ----------------------------------------------------------------------------- measurement
class PeakRSS:
    """Peak resident memory of this process above its value at ``start``, sampled in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.process = psutil.Process(os.getpid())
        self.interval = interval
        self.stop = threading.Event()
        self.baseline = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.stop.wait(self.interval)

    def __enter__(self):
        self.baseline = self.peak = self.process.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def _pass(slide: dict, source: str, method: str, batch_size: int, threads: int) -> dict:
    import torch

    from sthisto.pp import PatchDataset, PatchSpec

    torch.set_num_threads(threads)
    spec = PatchSpec(size_px=PATCH_PX, size_um=PATCH_UM)
    adata = open_source(slide, source) if method == "PatchDataset" else None
    # Warm both paths up on two spots first, so one-off costs (kernels, thread pools, file
    # handles) stay out of the measured pass.
    if method == "PatchDataset":
        consume(PatchDataset(adata, spec=spec, indices=[0, 1]).read_batch([0, 1])[0])
    else:
        warm = naive_patches(slide["image"], slide["centres"][:2], slide["crop_side"], PATCH_PX)
        consume(torch.from_numpy(warm).permute(0, 3, 1, 2))
    gc.collect()
    with PeakRSS() as memory:
        start = time.perf_counter()
        if method == "PatchDataset":
            means = run_patchdataset(adata, spec, batch_size)
        else:
            means = run_naive(slide, source, batch_size)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_rss": memory.extra, "means": means}


def _check(slide: dict, source: str, n_check: int, threads: int) -> dict:
    """Both paths on the same spots (up to a quarter of them padded at the border): pixel differences."""
    import tifffile
    import torch

    from sthisto.pp import PatchDataset, PatchSpec

    torch.set_num_threads(threads)
    dataset = PatchDataset(open_source(slide, source), spec=PatchSpec(size_px=PATCH_PX, size_um=PATCH_UM))
    clipped = np.flatnonzero(dataset.clipped)
    rng = np.random.default_rng(0)
    chosen = np.unique(np.concatenate([clipped[: n_check // 4], rng.choice(len(dataset), n_check, replace=False)]))
    ours, _ = dataset.read_batch(chosen)
    image = slide["image"] if source == "memory" else tifffile.imread(slide["tiff"], level=0)
    naive = naive_patches(image, slide["centres"][chosen], slide["crop_side"], PATCH_PX).transpose(0, 3, 1, 2)
    difference = np.abs(ours.numpy().astype(np.int16) - naive.astype(np.int16))
    return {
        "n": len(chosen),
        "n_clipped": int(dataset.clipped[chosen].sum()),
        "n_clipped_all": int(dataset.clipped.sum()),
        "max": int(difference.max()),
        "mean": float(difference.mean()),
        "above_1": float((difference > 1).mean()),
    }


def _child(connection, function, args) -> None:
    try:
        connection.send(("ok", function(*args)))
    except BaseException:  # report, then let the parent decide
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def in_fork(function, *args):
    """Run ``function(*args)`` in a forked process: fresh peak memory, the parent's data inherited."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, function, args))
    process.start()
    send.close()
    status, value = receive.recv()
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark pass failed in the child process:\n{value}")
    return value


# ----------------------------------------------------------------------------- driver
def prepare_slides(args, folder: Path) -> list[dict]:
    names = args.images
    if names == ["auto"]:
        names = (["her2st"] if (args.her2st_dir / "ST-cnts").is_dir() else []) + ["synthetic"]
    slides = []
    for name in names:
        start = time.perf_counter()
        if name == "her2st":
            if not (args.her2st_dir / "ST-cnts").is_dir():
                print(f"her2st data not found under {args.her2st_dir}; skipping the her2st slide.")
                continue
            image, mpp = load_her2st_c2(args.her2st_dir)
            label = "her2st-C2"
        else:
            image, mpp = synthetic_slide(args.synthetic_side, args.seed)
            label = "synthetic"
        crop_side = max(1, int(round(PATCH_UM / mpp)))
        tiff = folder / f"{label}.tif"
        if set(args.sources) - {"memory"}:
            write_tiff(tiff, image, args.compression)
        centres = spot_grid(*image.shape[:2], args.spots, crop_side, args.order, args.seed)
        slides.append(
            {"name": label, "image": image, "mpp": mpp, "crop_side": crop_side, "tiff": str(tiff), "centres": centres}
        )
        print(
            f"{label}: {image.shape[0]} × {image.shape[1]} px ({image.nbytes / MiB:.0f} MiB) at {mpp:.4g} µm/px, "
            f"crop {crop_side} px → {PATCH_PX} px, {len(centres)} spots ({args.order} order), "
            f"prepared in {time.perf_counter() - start:.1f} s"
            + (f"; TIFF {tiff.stat().st_size / MiB:.0f} MiB ({args.compression})" if tiff.exists() else "")
        )
    return slides


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", default=["auto"], choices=["auto", "her2st", "synthetic"])
    parser.add_argument("--sources", nargs="+", default=["memory", "tiff"], choices=["memory", "tiff", "dask"])
    parser.add_argument("--spots", type=int, default=3000, help="spots per slide")
    parser.add_argument("--synthetic-side", type=int, default=6000, help="side of the synthetic slide in px")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes per method")
    parser.add_argument("--order", choices=["grid", "random"], default="grid", help="spot order in the batches")
    parser.add_argument("--compression", choices=["jpeg", "zlib", "none"], default="jpeg", help="TIFF tiles")
    parser.add_argument("--check-spots", type=int, default=256, help="spots compared pixel by pixel")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--her2st-dir", type=Path, default=DEFAULT_HER2ST)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if sys.platform != "linux":
        parser.error("this benchmark forks a process per pass to isolate its memory; it runs on Linux.")
    if args.spots < 1 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--spots, --repeats and --batch-size must be positive.")

    # Imported once here (not in every forked pass), so every pass runs the same code; no torch
    # work runs in this process, which keeps forking safe.
    import torch  # noqa: F401

    import sthisto.pp._patches  # noqa: F401

    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    print(f"cpus {os.cpu_count()}, torch threads {args.threads}, batch {args.batch_size}, load {load_before:.2f}")
    with tempfile.TemporaryDirectory(prefix="sthisto-patch-bench-") as folder:
        slides = prepare_slides(args, Path(folder))
        rows, checks = [], {}
        for slide in slides:
            for source in args.sources:
                checks[slide["name"], source] = in_fork(
                    _check, slide, source, min(args.check_spots, len(slide["centres"])), args.threads
                )
                results = {"PatchDataset": [], "naive": []}
                for _ in range(args.repeats):
                    for method in results:
                        results[method].append(in_fork(_pass, slide, source, method, args.batch_size, args.threads))
                rows.append((slide, source, results))
        load_after = os.getloadavg()[0]

    print()
    print("Patch equivalence (PatchDataset vs naive on the same spots, uint8 levels):")
    for (name, source), check in checks.items():
        print(
            f"  {name:<10} {source:<6} {check['n']} spots ({check['n_clipped']} padded; "
            f"{check['n_clipped_all']} padded in all): max |Δ| {check['max']}, mean |Δ| {check['mean']:.3f}, "
            f"{100 * check['above_1']:.2f} % of values differ by > 1"
        )
    print()
    header = (
        f"{'slide':<10} {'source':<6} {'patches/s PD':>13} {'naive':>8} {'PD/naive':>9} {'(min–max)':>11}"
        f" {'peak MiB PD':>12} {'naive':>8} {'PD/naive':>9} {'Δ patch mean':>13}"
    )
    print(header)
    print("-" * len(header))
    for slide, source, results in rows:
        n = len(slide["centres"])
        rate = {m: [n / r["seconds"] for r in runs] for m, runs in results.items()}
        # Ratios of passes run back to back, so load changes between pairs cancel.
        ratios = [a / b for a, b in zip(rate["PatchDataset"], rate["naive"], strict=True)]
        peak = {m: statistics.median(r["extra_rss"] for r in runs) / MiB for m, runs in results.items()}
        mean_gap = np.abs(results["PatchDataset"][-1]["means"] - results["naive"][-1]["means"]).max()
        print(
            f"{slide['name']:<10} {source:<6} {statistics.median(rate['PatchDataset']):>13.0f} "
            f"{statistics.median(rate['naive']):>8.0f} {statistics.median(ratios):>9.2f} "
            f"{f'{min(ratios):.2f}–{max(ratios):.2f}':>11} {peak['PatchDataset']:>12.1f} {peak['naive']:>8.1f} "
            f"{peak['PatchDataset'] / max(peak['naive'], 1e-9):>9.3f} {mean_gap:>13.3f}"
        )
    print()
    print(
        "patches/s: median of the passes (PatchDataset includes building the dataset; naive on lazy sources "
        "includes reading the whole TIFF). PD/naive > 1: PatchDataset faster. peak MiB: resident memory above "
        "the pass's start (images held in memory are in the baseline). Δ patch mean: max over all spots of the "
        "difference of per-patch mean values (0–255)."
    )
    print(f"load average {load_before:.2f} → {load_after:.2f}; total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
