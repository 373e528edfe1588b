"""Time and memory of one HGGEF training step on a synthetic section, ours vs a naive baseline.

Each configuration (implementation × section size × distillation) runs in a fresh subprocess,
so its peak resident memory (``ru_maxrss``) is its own. A step is: forward over the whole
section, HGGEF loss (MSE + 0.25 ZINB [+ 0.5 self-distillation]), backward, Adam update. The
reported time is the median of the timed steps after one warm-up step.

Implementations (same architecture, same weights — both built from one seed):

``ours``
    :class:`sthisto.models.hggef.HGGEFNet` as shipped: recomputation in the backward pass
    chosen by activation budget (GEM + trunk in chunks and latent stages, then transformer
    blocks, then LSTM), the shared transformer's memory-bounded attention, tensor-only
    hypergraph construction, vectorised augmentations.
``naive``
    the same modules run the straightforward way: the whole section through GEM + trunk at
    once with every activation kept, attention as explicit ``softmax(QKᵀ/√d)·V`` matrices,
    the hypergraph built from dense ``N × N`` matrices with a Python loop over spots, and
    augmentations applied patch by patch.

Usage::

    python benchmarks/hggef_step.py                       # 180/300/700 spots, ± distillation
    python benchmarks/hggef_step.py --sizes 180 300 --repeats 3 --impls ours naive
    python benchmarks/hggef_step.py --repeats 2 --repeats-distill 1   # as reported

``torch.set_num_threads(2)``; workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless set, because
spinning OpenMP threads collapse when other processes share the cores. The naive baseline with
distillation is only run where its memory, extrapolated from the runs before it, stays under
``--naive-limit-gb``; otherwise the extrapolation is printed instead (without a run to
extrapolate from, it is only run at ≤ 180 spots). On a CUDA machine,
``--device cuda`` also reports ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types

from _arithmetic import floor_line

N_GENES = 785
#: The authors' code, one 300-spot step without distillation on 2 CPU cores (issue 4); the
#: target is a third of it.
REFERENCE_STEP_S_300 = 10.0


def _section(n_spots: int, seed: int = 0):
    import numpy as np
    import torch
    from scipy.spatial import cKDTree

    generator = torch.Generator().manual_seed(seed)
    side = math.ceil(math.sqrt(n_spots))
    index = torch.arange(n_spots)
    positions = torch.stack((index % side, index // side), dim=1).long()
    # Smooth-ish synthetic tissue: low-frequency colour fields plus noise, uint8 like real patches.
    base = torch.rand(n_spots, 3, 8, 8, generator=generator)
    patches = torch.nn.functional.interpolate(base, size=(112, 112), mode="bilinear", align_corners=False)
    patches = (patches * 200 + 30 + torch.rand(n_spots, 3, 112, 112, generator=generator) * 25).clamp(0, 255)
    patches = patches.to(torch.uint8)
    coords = positions.numpy().astype(float)
    distances, neighbours = cKDTree(coords).query(coords, k=min(9, n_spots))
    source = neighbours[:, 1:].reshape(-1)
    target = np.repeat(np.arange(n_spots), neighbours.shape[1] - 1)
    keep = distances[:, 1:].reshape(-1) <= 2.0
    edge_index = torch.from_numpy(np.stack((source[keep], target[keep]))).long()
    rates = torch.rand(n_spots, N_GENES, generator=generator) * 4
    counts = torch.poisson(rates, generator=generator)
    library = counts.sum(1, keepdim=True)
    target_expr = torch.log10(1 + counts / library.clamp_min(1) * 1e4)
    size_factors = library.squeeze(1) / library.median()
    return {
        "patches": patches,
        "positions": positions,
        "edge_index": edge_index,
        "target": target_expr,
        "counts": counts,
        "size_factors": size_factors,
    }


# ---------------------------------------------------------------------------- naive baseline
def _naive_attention_forward(self, x, attn_mask=None):
    batch, tokens, _ = x.shape
    q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
    return self.proj_drop(self.proj(out))


def _naive_hyperedges(features, positions, k):
    import torch

    n = features.shape[0]
    feature_distance = torch.cdist(features, features)
    position_distance = torch.cdist(positions, positions)
    score = feature_distance / feature_distance.max() + position_distance / position_distance.max()
    nodes, edges = [], []
    for spot in range(n):
        row = score[spot].clone()
        row[spot] = float("inf")
        chosen = torch.argsort(row)[: min(k, n - 1)].tolist()
        nodes += [spot, *chosen]
        edges += [spot] * (len(chosen) + 1)
    return torch.tensor([nodes, edges], dtype=torch.long, device=features.device)


def _naive_hypergraph_forward(self, x, positions, edge_index=None):
    import torch
    from torch.nn import functional as F

    with torch.no_grad():
        hyperedge_index = _naive_hyperedges(x.detach().float(), positions.float(), self.k)
    n = x.shape[0]
    h = self.conv1(x, hyperedge_index, None, num_edges=n)
    h = self.dropout(self.norm(F.relu(h)))
    return x + self.conv2(h, hyperedge_index, None, num_edges=n)


def _naive_stage_tokens(self, patches, augmentation=None, *, recompute=None):
    import torch

    from sthisto.models.hggef import augment_patches

    x = patches.to(torch.float32)
    if augmentation is not None:
        x = torch.cat([augment_patches(x[i : i + 1], augmentation[i : i + 1]) for i in range(x.shape[0])])
    stage4, conv5 = self.trunk(self.gem(x))
    return self._latent_stages(stage4, conv5)


def make_naive(net):
    """Turn an HGGEFNet into the naive baseline in place (same parameters)."""
    from sthisto._compat import import_timm

    attention_class = import_timm().layers.Attention
    net.chunk_size = None
    net.checkpointing = False
    net.stage_tokens = types.MethodType(_naive_stage_tokens, net)
    net.hypergraph.forward = types.MethodType(_naive_hypergraph_forward, net.hypergraph)
    patched = 0
    for module in net.modules():
        if isinstance(module, attention_class):
            module.forward = types.MethodType(_naive_attention_forward, module)
            patched += 1
    return patched


# ---------------------------------------------------------------------------- worker
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(impl: str, n_spots: int, distillation: bool, repeats: int, device: str) -> dict:
    import torch

    from sthisto.models.hggef import HGGEFNet, hggef_loss

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = HGGEFNet(N_GENES, backbone_weights=None, distillation=distillation).to(device)
    notes = {}
    if impl == "naive":
        notes["attention_modules_patched"] = make_naive(net)
    batch = {k: v.to(device) for k, v in _section(n_spots).items()}
    # Ours steps with the fused Adam kernel, as the training engine does
    # (ExpressionModel.configure_optimizers); the baseline with PyTorch's default Adam.
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-5, fused=True if impl == "ours" else None)
    net.train()
    rss_after_build = _peak_rss_mb()
    times, cpu_times = [], []
    for step in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        cpu_start = time.process_time()
        optimiser.zero_grad(set_to_none=True)  # as Lightning does, before the forward pass
        outputs = net(batch["patches"], batch["positions"], batch["edge_index"])
        losses = hggef_loss(outputs, batch)
        losses["loss"].backward()
        optimiser.step()
        del outputs
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0 or repeats == 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        loss_value = float(losses["loss"].detach())
        del losses
    result = {
        "impl": impl,
        "n_spots": n_spots,
        "distillation": distillation,
        "step_s_median": statistics.median(times),
        "step_s_all": [round(t, 3) for t in times],
        "cpu_s_median": statistics.median(cpu_times),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_build_mb": rss_after_build,
        "parameter_mb": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20,
        "final_loss": loss_value,
        **notes,
    }
    if device == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if impl == "ours" and not distillation and device == "cpu":
        # The step's arithmetic without any recomputation, after the measurements above.
        from _arithmetic import matmul_gflops, step_gflops

        counted = HGGEFNet(N_GENES, backbone_weights=None, distillation=False, checkpointing=False).train()

        def forward_backward() -> None:
            outputs = counted(batch["patches"], batch["positions"], batch["edge_index"])
            hggef_loss(outputs, batch)["loss"].backward()

        result["step_gflop"] = step_gflops(counted, forward_backward)
        result["matmul_gflops"] = matmul_gflops()
    return result


def _run_worker(impl, n_spots, distillation, repeats, device) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, __file__, "--worker", impl, str(n_spots), str(int(distillation)), str(repeats), device]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"impl": impl, "n_spots": n_spots, "distillation": distillation, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0:3].__repr__()
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[180, 300, 700])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument(
        "--repeats-distill", type=int, default=None, help="timed steps with distillation (default: --repeats)"
    )
    parser.add_argument("--impls", nargs="+", default=["ours", "naive"], choices=["ours", "naive"])
    parser.add_argument("--distillation", choices=["off", "on", "both"], default="both")
    parser.add_argument("--naive-limit-gb", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, n, distill, repeats, device = args.worker
        print(json.dumps(worker(impl, int(n), bool(int(distill)), int(repeats), device)))
        return

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.distillation]
    print(f"# HGGEF training step, {N_GENES} genes, torch threads 2, load average before: {_load()}", flush=True)
    results = {}
    for distillation in modes:
        for n in args.sizes:
            for impl in args.impls:
                if impl == "naive" and distillation:
                    estimate = _extrapolate_naive(results, n)
                    if estimate is None and n > 180:
                        print(f"naive  n={n:4d} distill=on : skipped, no measurement to extrapolate from", flush=True)
                        continue
                    if estimate is not None and estimate > args.naive_limit_gb * 1024:
                        results[(impl, n, distillation)] = {"skipped": True, "estimated_peak_rss_mb": estimate}
                        print(
                            f"naive  n={n:4d} distill=on : skipped, estimated peak RSS {estimate / 1024:.1f} GB",
                            flush=True,
                        )
                        continue
                repeats = args.repeats if not distillation or args.repeats_distill is None else args.repeats_distill
                r = _run_worker(impl, n, distillation, repeats, args.device)
                results[(impl, n, distillation)] = r
                if "error" in r:
                    print(
                        f"{impl:6s} n={n:4d} distill={'on ' if distillation else 'off'}: FAILED\n{r['error']}",
                        flush=True,
                    )
                    continue
                cuda = f", CUDA max {r['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in r else ""
                print(
                    f"{impl:6s} n={n:4d} distill={'on ' if distillation else 'off'}: step {r['step_s_median']:7.2f} s "
                    f"(all {r['step_s_all']}), CPU {r['cpu_s_median']:7.2f} s, peak RSS {r['peak_rss_mb']:7.0f} MB{cuda}, load {_load()}",
                    flush=True,
                )
    print("\n# ratios naive / ours (wall time, process CPU time, peak RSS)")
    for distillation in modes:
        for n in args.sizes:
            ours = results.get(("ours", n, distillation), {})
            naive = results.get(("naive", n, distillation), {})
            if "step_s_median" in ours and "step_s_median" in naive:
                print(
                    f"n={n:4d} distill={'on ' if distillation else 'off'}: wall x{naive['step_s_median'] / ours['step_s_median']:.2f}, "
                    f"CPU x{naive['cpu_s_median'] / ours['cpu_s_median']:.2f}, memory x{naive['peak_rss_mb'] / ours['peak_rss_mb']:.2f}"
                )
            elif "step_s_median" in ours and naive.get("skipped"):
                print(
                    f"n={n:4d} distill={'on ' if distillation else 'off'}: naive not run; memory x"
                    f"{naive['estimated_peak_rss_mb'] / ours['peak_rss_mb']:.2f} (extrapolated)"
                )
    print("\n# arithmetic floor (benchmarks/_arithmetic.py), no distillation")
    for n in args.sizes:
        ours = results.get(("ours", n, False), {})
        if "step_gflop" in ours:
            target = REFERENCE_STEP_S_300 / 3 if n == 300 else None
            print(f"n={n:4d}: " + floor_line(ours["step_gflop"], ours["matmul_gflops"], ours["step_s_median"], target))
    print(f"\n# load average after: {_load()}")


def _extrapolate_naive(results: dict, n: int) -> float | None:
    """Estimate the naive baseline's peak RSS with distillation at ``n`` spots.

    Linear in ``n`` through the last two naive distillation runs; with one such run at
    ``n0``, that run plus six times the growth of the run without distillation from ``n0`` to
    ``n`` (six passes hold six sets of activations); with none, the run without distillation
    at ``n``: fixed part (built model, gradients, two Adam moments) + 6 × the rest.
    """
    measured = [
        (m, r["peak_rss_mb"]) for (impl, m, d), r in results.items() if impl == "naive" and d and "peak_rss_mb" in r
    ]
    plain = {m: r for (impl, m, d), r in results.items() if impl == "naive" and not d and "peak_rss_mb" in r}
    if len(measured) >= 2:
        (n0, r0), (n1, r1) = measured[-2], measured[-1]
        return r1 + (r1 - r0) / (n1 - n0) * (n - n1)
    if len(measured) == 1 and n in plain and measured[0][0] in plain:
        n0, r0 = measured[0]
        return r0 + 6 * (plain[n]["peak_rss_mb"] - plain[n0]["peak_rss_mb"])
    if n in plain:
        fixed = plain[n]["rss_after_build_mb"] + 3 * plain[n]["parameter_mb"]
        return fixed + 6 * (plain[n]["peak_rss_mb"] - fixed)
    return None


if __name__ == "__main__":
    main()
