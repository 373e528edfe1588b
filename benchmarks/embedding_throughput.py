"""Embedding throughput: patches/s and peak memory of sthisto.pp.embed against a naive per-patch loop.

Three encoders from the registry's model cards (``sthisto.encoders.list_encoders()``), one code
path (``Encoder.encode``: uint8 patches → device → normalise → model under
``torch.inference_mode``, bf16 autocast and channels-last on CUDA, pinned host memory):

* ``handcrafted``       — 93 colour/texture features, 112 px, no weights;
* ``resnet50_imagenet`` — HEST's CNN baseline (ResNet50 up to layer3, 224 px, 1024-d average
  pool), random weights;
* ``uni``               — ViT-L/16 (224 px, 1024-d class token), random weights.

Any other card can be measured with ``--cards cnn=ctranspath,vit=virchow2``.

For each encoder it measures

* ``model``    — the encoder alone on patches already in memory (compute ceiling);
* ``pipeline`` — ``sthisto.pp.embed`` end to end (lazy patch cutting + resampling + encoder,
  batched, streamed), on a synthetic slide held in memory;
* ``naive``    — one patch at a time: cut it, encode it, store it (what a simple loop does);

and prints patches/s, the pipeline/naive ratio, and the peak resident memory during each phase
(sampled every 5 ms; peak GPU memory on CUDA). The CPU run uses few batches for ViT-L (it is slow
on CPU): numbers are measured, never extrapolated.

Run::

    python benchmarks/embedding_throughput.py               # CPU here, CUDA where present
    python benchmarks/embedding_throughput.py --device cuda --compile --vit-patches 16384
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import warnings
from contextlib import contextmanager

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import torch

import sthisto
from sthisto._device import resolve_device
from sthisto.encoders import Encoder, RandomWeightsWarning, get_encoder
from sthisto.pp import PatchDataset, PatchSpec
from sthisto.pp._embed import DEFAULT_BATCH_SIZE

MICRONS_PER_PIXEL = 0.5


# --------------------------------------------------------------------------- data
def synthetic_slide(side: int, n_spots: int, seed: int = 0) -> ad.AnnData:
    """One library: a ``side`` × ``side`` px H&E-like image at 0.5 µm/px and spots on a grid."""
    datasets = sthisto.datasets
    if "synthetic_he_image" in dir(datasets):
        image = datasets.synthetic_he_image((side, side), microns_per_pixel=MICRONS_PER_PIXEL, seed=seed)
        image = np.asarray(image[0] if isinstance(image, tuple) else image)
    else:  # a stand-in with colour and texture variation
        rng = np.random.default_rng(seed)
        coarse = rng.integers(60, 255, (side // 64 + 1, side // 64 + 1, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((64, 64, 1), dtype=np.uint8))[:side, :side]
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    per_side = int(np.ceil(np.sqrt(n_spots)))
    margin = 130  # > half of the largest crop (112 µm = 224 px)
    axis = np.linspace(margin, side - margin, per_side)
    grid = np.array([(x, y) for y in axis for x in axis])[:n_spots]
    obs = pd.DataFrame({"library_id": pd.Categorical(["slide"] * len(grid))}, index=[f"s{i}" for i in range(len(grid))])
    adata = ad.AnnData(X=np.zeros((len(grid), 1), dtype=np.float32), obs=obs)
    adata.obsm["spatial"] = grid
    adata.uns["spatial"] = {
        "slide": {
            "images": {"fullres": image},
            "scalefactors": {"microns_per_pixel": MICRONS_PER_PIXEL},
            "metadata": {},
        }
    }
    return adata


# --------------------------------------------------------------------------- encoders
DEFAULT_CARDS = {"handcrafted": "handcrafted", "cnn": "resnet50_imagenet", "vit": "uni"}
"""The three measured roles and the card measured in each (override with ``--cards``)."""


# --------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak resident set size of this process (and peak CUDA allocation) inside a ``with`` block."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_cuda = 0

    @contextmanager
    def watch(self):
        process = psutil.Process(os.getpid())
        stop = threading.Event()
        self.peak_rss = process.memory_info().rss

        def sample():
            while not stop.is_set():
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)
                stop.wait(self.interval)

        thread = threading.Thread(target=sample, daemon=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            if torch.cuda.is_available():
                self.peak_cuda = torch.cuda.max_memory_allocated()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(encoder: Encoder, patches: torch.Tensor, batch_size: int, repeats: int, device) -> float:
    """Patches/s of ``encoder.encode`` on patches already in (pinned) memory, after one warm-up batch."""
    if device.type == "cuda":
        patches = patches.pin_memory()
    encoder.encode(patches[:batch_size].to(device, non_blocking=True))
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        for start in range(0, len(patches), batch_size):
            encoder.encode(patches[start : start + batch_size].to(device, non_blocking=True))
    _sync(device)
    return repeats * len(patches) / (time.perf_counter() - started)


def time_pipeline(adata, encoder: Encoder, n: int, batch_size: int, device, num_workers: int) -> float:
    subset = adata[:n].copy()
    subset.uns["spatial"] = adata.uns["spatial"]  # keep the image by reference
    started = time.perf_counter()
    sthisto.pp.embed(
        subset,
        encoder=encoder,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        key_added="bench",
        progress=False,
    )
    _sync(device)
    elapsed = time.perf_counter() - started
    assert np.isfinite(subset.obsm["bench"]).all()
    return n / elapsed


def time_naive(adata, encoder: Encoder, n: int, device) -> float:
    """One patch at a time: cut, convert, encode, copy back — no batching, no streaming."""
    dataset = PatchDataset(adata, spec=PatchSpec(size_px=encoder.input_size, size_um=encoder.patch_size_um))
    out = np.empty((n, encoder.output_dim), dtype=np.float32)
    encoder.encode(dataset.read_batch([0])[0].to(device))
    started = time.perf_counter()
    for i in range(n):
        patch, _ = dataset.read_batch([i])
        out[i] = encoder.encode(patch.to(device)).cpu().numpy()[0]
    _sync(device)
    return n / (time.perf_counter() - started)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--side", type=int, default=3072, help="synthetic slide side in px")
    parser.add_argument("--patches", type=int, default=0, help="patches, handcrafted / CNN (0: 256 CPU, 8192 CUDA)")
    parser.add_argument("--vit-patches", type=int, default=0, help="patches, ViT-L (0: 16 CPU, 8192 CUDA)")
    parser.add_argument("--naive", type=int, default=0, help="patches, naive loops (0: 64 CPU, 512 CUDA; ViT-L /16)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: pp.embed's default (16 CPU, 256 CUDA)")
    parser.add_argument("--vit-batch-size", type=int, default=0, help="0: 8 CPU, 256 CUDA")
    parser.add_argument("--num-workers", type=int, default=-1, help="-1: 0 on CPU, 8 on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA)")
    parser.add_argument("--only", default="", help="comma-separated subset: handcrafted,cnn,vit")
    parser.add_argument("--cards", default="", help="role=card overrides, e.g. cnn=ctranspath,vit=virchow2")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="", help="write the results to this JSON file too")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    print(f"device {device}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    args.patches = args.patches or (8192 if on_gpu else 256)
    args.vit_patches = args.vit_patches or (8192 if on_gpu else 16)
    args.naive = args.naive or (512 if on_gpu else 64)
    args.batch_size = args.batch_size or DEFAULT_BATCH_SIZE[device.type]
    args.vit_batch_size = args.vit_batch_size or (256 if on_gpu else 8)
    if args.num_workers < 0:
        args.num_workers = 8 if on_gpu else 0
    if on_gpu:
        print(f"GPU {torch.cuda.get_device_name(device)}; bf16 autocast, channels_last, pinned memory")
    t0 = time.perf_counter()
    adata = synthetic_slide(args.side, max(args.patches, args.vit_patches, args.naive))
    print(f"synthetic slide {args.side}² px, {adata.n_obs} spots ({time.perf_counter() - t0:.1f} s)")

    cards = dict(DEFAULT_CARDS)
    cards.update(dict(item.split("=", 1) for item in args.cards.split(",") if item))
    # random weights are the point here (speed, not features): keep the output readable
    warnings.simplefilter("ignore", RandomWeightsWarning)
    builders = {
        "handcrafted": (cards["handcrafted"], args.patches, args.batch_size, args.naive),
        "cnn": (cards["cnn"], args.patches, args.batch_size, max(2, args.naive // 4)),
        "vit": (cards["vit"], args.vit_patches, args.vit_batch_size, max(2, args.naive // 16)),
    }
    chosen = [k for k in builders if not args.only or k in args.only.split(",")]
    results = []
    memory = PeakMemory()
    for key in chosen:
        card, n, batch_size, n_naive = builders[key]
        encoder: Encoder = get_encoder(card)
        if encoder.patch_size_um is None:
            encoder = encoder.replace(patch_size_um=encoder.input_size * MICRONS_PER_PIXEL)
        encoder.to(device)
        if args.compile and on_gpu:
            encoder.compile(mode="max-autotune-no-cudagraphs")
        patches = PatchDataset(
            adata, spec=PatchSpec(size_px=encoder.input_size, size_um=encoder.patch_size_um)
        ).read_batch(range(n))[0]
        row = {"encoder": encoder.name, "input_px": encoder.input_size, "dim": encoder.output_dim}
        row["precision"] = encoder.resolve_precision("auto")
        with memory.watch():
            row["model_patches_per_s"] = time_model(encoder, patches, batch_size, 1, device)
        row["model_peak_rss_mb"] = memory.peak_rss / 2**20
        with memory.watch():
            row["pipeline_patches_per_s"] = time_pipeline(adata, encoder, n, batch_size, device, args.num_workers)
        row["pipeline_peak_rss_mb"] = memory.peak_rss / 2**20
        if on_gpu:
            row["pipeline_peak_cuda_mb"] = memory.peak_cuda / 2**20
        with memory.watch():
            row["naive_patches_per_s"] = time_naive(adata, encoder, n_naive, device)
        row["naive_peak_rss_mb"] = memory.peak_rss / 2**20
        row["pipeline_over_naive"] = row["pipeline_patches_per_s"] / row["naive_patches_per_s"]
        row.update(n_patches=n, n_naive=n_naive, batch_size=batch_size, device=str(device))
        results.append(row)
        print(
            f"{row['encoder']:>12s} ({row['input_px']} px → {row['dim']}-d, {row['precision']}): "
            f"model {row['model_patches_per_s']:8.3g}/s | pipeline {row['pipeline_patches_per_s']:8.3g}/s | "
            f"naive {row['naive_patches_per_s']:7.3g}/s | pipeline/naive ×{row['pipeline_over_naive']:.1f} | "
            f"peak RSS {row['pipeline_peak_rss_mb']:.0f} MB"
            + (f", CUDA {row['pipeline_peak_cuda_mb']:.0f} MB" if on_gpu else ""),
            flush=True,
        )
        del encoder, patches
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
