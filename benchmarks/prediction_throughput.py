"""Prediction (evaluation) throughput per method, sthisto's predict path against a plain forward.

For every method and size (``tiny`` variant or the full network) a fresh process builds a
synthetic cohort of two sections, trains on the first for one epoch (throughput, not accuracy, is
measured; the weights do not change the cost) and predicts the second:

* ``sthisto``: ``model.predict(adata, index)``, the path ``sthisto.tl.predict`` runs: checks,
  prediction plan, patches cut (and resampled to the method's field of view) from the section
  image, kNN graph, network in evaluation mode under ``torch.inference_mode``;
* ``forward``: the network call alone inside ``predict`` (``predict_section`` on inputs built
  beforehand);
* ``naive``: the naive baseline, a plain forward in evaluation mode under ``torch.no_grad``
  on the whole section's inputs built beforehand — what a training script does with a
  dataset of pre-cut patches (the authors' code). For ridge: the fitted estimator's
  ``predict`` on the feature matrix.

``sthisto / naive`` below 1 is sthisto's overhead (inputs, planning); the input time is
reported separately (``inputs s``: patches, positions and graph of the section).
Feature-based methods (ridge, HisToSGE) use the handcrafted encoder, also at full size (the
paper's UNI needs weights that may not be present), and their features are embedded before
timing, as ``tl.predict`` reuses stored features.

Usage::

    python benchmarks/prediction_throughput.py                         # all methods, tiny and full
    python benchmarks/prediction_throughput.py --methods hggef --sizes full --n-spots 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("ridge", "histosge", "histospace", "thitogene", "hggef")
THREADS = int(os.environ.get("STHISTO_BENCH_THREADS", "2"))


def _median(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(method: str, size: str, n_spots: int, repeats: int) -> dict:
    import numpy as np
    import torch

    import sthisto

    torch.set_num_threads(THREADS)
    data = sthisto.datasets.synthetic(n_sections=2, n_spots=n_spots, n_genes=50, seed=0)
    libraries = data.obs["library_id"].astype(str).to_numpy()
    name = method if size == "full" or method == "ridge" else f"{method}_tiny"
    params: dict = {"progress_bar": False, "store": False, "max_epochs": 1}
    if method in ("ridge", "histosge"):
        params["encoder"] = "handcrafted"
    started = time.perf_counter()
    model = sthisto.tl.train(data, name, train_mask=[libraries[0]], **params)
    result = {"method": method, "size": size, "name": name, "train_s": time.perf_counter() - started}
    index = np.flatnonzero(libraries != libraries[0])
    result["n_spots"] = int(len(index))

    model.predict(data, index)  # warm-up: first-call allocations, lazy imports
    result["sthisto_s"] = _median(lambda: model.predict(data, index), repeats)

    if method == "ridge":
        features = model._features_cache(data)[index]
        model._feature_cache = None
        result["naive_s"] = _median(lambda: model.estimator.predict(features), repeats)
        result["inputs_s"] = result["forward_s"] = None
        return result

    network = model.network
    result["parameters"] = int(sum(p.numel() for p in network.parameters()))
    plan = model.prediction_plan(data, index)
    result["units"] = len(plan.units)
    start = time.perf_counter()
    sections = [model.unit_section(data, unit) for unit in plan.units]
    result["inputs_s"] = time.perf_counter() - start
    model._feature_cache = None

    def forward_only():
        for section in sections:
            model.predict_section(section, device="cpu")

    result["forward_s"] = _median(forward_only, repeats)

    if method == "histosge":  # its network takes padded sequences; predict_section pads once
        result["naive_s"] = result["forward_s"]
        return result
    whole = model.sections(data, index)
    batches = [model.network_inputs(dict(section.tensors)) for section in whole]
    network.eval()

    def naive():
        with torch.no_grad():
            for batch in batches:
                network(**batch)

    naive()
    result["naive_s"] = _median(naive, repeats)
    return result


def _run(method: str, size: str, n_spots: int, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, __file__, "--worker", method, size, str(n_spots), str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        return {"method": method, "size": size, "error": done.stderr.strip().splitlines()[-3:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sizes", nargs="*", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--n-spots", type=int, default=200, help="spots per section (the predicted one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()}, threads per run: {THREADS})")
    rows = []
    for size in args.sizes:
        for method in args.methods:
            if method == "ridge" and size == "full":
                continue  # one ridge: it has no network size
            res = _run(method, size, args.n_spots, args.repeats)
            rows.append(res)
            print(json.dumps(res), flush=True)
    print(f"load average after: {os.getloadavg()}")

    print("\nmethod      size  spots  sthisto spots/s  forward spots/s  naive spots/s  sthisto/naive  inputs s")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:10s}  {r['size']:4s}  failed: {r['error']}")
            continue
        n = r["n_spots"]
        forward = f"{n / r['forward_s']:15.1f}" if r.get("forward_s") else f"{'-':>15s}"
        inputs = f"{r['inputs_s']:8.2f}" if r.get("inputs_s") is not None else f"{'-':>8s}"
        print(
            f"{r['method']:10s}  {r['size']:4s}  {n:5d}  {n / r['sthisto_s']:15.1f}  {forward}  "
            f"{n / r['naive_s']:13.1f}  {r['naive_s'] / r['sthisto_s']:13.2f}  {inputs}"
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, size, n_spots, repeats = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(_worker(method, size, n_spots, repeats)))
    else:
        main()
