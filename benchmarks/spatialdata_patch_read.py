"""Cost of reading one patch back from a SpatialData zarr written by ``sthisto.io.to_spatialdata``.

The her2st section C2 (9911 × 9274 px JPEG, ≈0.69 µm/px) is converted twice and written to a
temporary zarr store each time:

* ``chunked`` — the default: 1024-px chunks and a multiscale pyramid (factors of 2);
* ``single``  — ``chunk_size=None``: the image's own chunking, one chunk for a JPEG, one scale
  (the behaviour before chunking was added).

Then, in a fresh process per pass (spawned: nothing is cached, and zarr's event-loop thread
does not survive a fork), the store is opened with
``spatialdata.read_zarr``, converted with ``sthisto.io.from_spatialdata`` and one 224-px patch
(at the image's own resolution) is read for a spot with :class:`sthisto.pp.PatchDataset`. The
table gives per variant the chunks of level 0 the patch touches, the seconds to read it, the
peak Python-traced memory of the read (tracemalloc: NumPy and zarr buffers) and the seconds to
open and convert the store (imports included), medians over ``--repeats`` passes, and the
chunked / single ratios.

Writing images needs spatialdata >= 0.7.3. Run::

    python benchmarks/spatialdata_patch_read.py            # ~2-3 min on 2 cores
    python benchmarks/spatialdata_patch_read.py --repeats 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STHISTO_SHARED_DATA", REPO.parent / "shared" / "data"))


def _read_one_patch(store: str, spot: int, queue) -> None:
    import tracemalloc

    import numpy as np
    import spatialdata as sd
    import torch  # noqa: F401  (imported by read_batch; loaded first so its import is not timed)

    import sthisto
    from sthisto.pp import PatchDataset, PatchSpec

    tracemalloc.start()
    start = time.perf_counter()
    adata = sthisto.io.from_spatialdata(sd.read_zarr(store))
    opened = time.perf_counter() - start
    library = str(adata.obs["library_id"].iloc[spot])
    full = adata.uns["spatial"][library]["images"]["fullres"]
    mpp = adata.uns["spatial"][library]["scalefactors"]["microns_per_pixel"]
    x, y = np.rint(adata.obsm["spatial"][spot] - 112).astype(int)
    touched = int(np.prod(full[y : y + 224, x : x + 224].numblocks))
    dataset = PatchDataset(adata, spec=PatchSpec(size_px=224, size_um=224 * mpp), indices=[spot])
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    patch, _ = dataset.read_batch([0])
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    queue.put((touched, seconds, (peak - base) / 2**20, opened, int(patch.numpy().astype(np.int64).sum())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    her2st = SHARED / "her2st"
    if not her2st.is_dir():
        print(f"her2st data not found at {her2st}; nothing to measure (set STHISTO_SHARED_DATA).")
        return 0
    import spatialdata as sd

    if tuple(int(p) for p in sd.__version__.split(".")[:3]) < (0, 7, 3):
        print(f"spatialdata {sd.__version__} cannot write images; install spatialdata>=0.7.3.")
        return 1
    import sthisto

    adata = sthisto.io.read_her2st(her2st, sections="C2")
    spot = adata.n_obs // 2
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, options in (("chunked", {}), ("single", {"chunk_size": None})):
            store = str(Path(folder) / f"{name}.zarr")
            start = time.perf_counter()
            sthisto.io.to_spatialdata(adata, **options).write(store)
            print(f"{name}: written in {time.perf_counter() - start:.1f} s")
            results[name] = []
        context = multiprocessing.get_context("spawn")
        for _ in range(args.repeats):
            for name in results:
                queue = context.Queue()
                process = context.Process(
                    target=_read_one_patch, args=(str(Path(folder) / f"{name}.zarr"), spot, queue)
                )
                process.start()
                results[name].append(queue.get())
                process.join()
    checksums = {name: {r[4] for r in runs} for name, runs in results.items()}
    print(f"\nher2st C2, one 224-px patch, medians of {args.repeats} fresh processes")
    print(f"{'variant':10s} {'chunks':>7s} {'read s':>8s} {'peak MiB':>9s} {'open s':>8s}")
    medians = {}
    for name, runs in results.items():
        medians[name] = [statistics.median(r[i] for r in runs) for i in range(4)]
        chunks, seconds, peak, opened = medians[name]
        print(f"{name:10s} {chunks:7.0f} {seconds:8.3f} {peak:9.1f} {opened:8.2f}")
    ratio = [c / s if s else float("nan") for c, s in zip(medians["chunked"], medians["single"], strict=True)]
    print(f"{'ratio':10s} {ratio[0]:7.3f} {ratio[1]:8.3f} {ratio[2]:9.3f} {ratio[3]:8.3f}   (chunked / single)")
    print("identical patch pixels:", checksums["chunked"] == checksums["single"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
