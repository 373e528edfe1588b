"""Stain normalisation: sthisto's Macenko / Reinhard against torchstain's, time per image.

Both normalise a synthetic H&E image (tissue on glass) to a reference fitted beforehand: the
timed call fits the image's own statistics and transforms every pixel, as
``torchstain...normalize(image)`` does. sthisto runs its in-memory path (what
``sthisto.pp.stain_normalize`` uses for an in-memory image). torchstain runs its numpy
backend and, when torch is importable, its torch backend on the CPU. Prints the median of a
few repeats and the ratio torchstain / sthisto (above 1: sthisto is faster).

Usage::

    python benchmarks/stain_torchstain.py                 # 1024² and 2048² pixels
    python benchmarks/stain_torchstain.py --sizes 512 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _median_time(function, repeats: int) -> float:
    function()  # warm-up: lookup tables, thread pools, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    from sthisto.datasets import synthetic_he_image
    from sthisto.pp import _stain

    try:
        import torch
        from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer
    except ImportError:
        torch = None

    print(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()})")
    print("   size  method    sthisto s   torchstain-numpy s  ratio   torchstain-torch s  ratio")
    for size in args.sizes:
        centre, radius = (size / 2, size / 2), size * 0.45
        image = synthetic_he_image((size, size), seed=0, tissue_center_um=centre, tissue_radius_um=radius)
        reference = synthetic_he_image(
            (size, size), seed=1, style_seed=5, tissue_center_um=centre, tissue_radius_um=radius
        )
        for method in ("macenko", "reinhard"):
            target = _stain._target_from(_stain.fit_stain_parameters(reference, method=method))

            def ours(method=method, target=target, image=image):
                source = _stain.fit_stain_parameters(image, method=method)
                return _stain._apply_in_memory(image, source, target, keep_background=False)

            if method == "macenko":
                numpy_normalizer = NumpyMacenkoNormalizer()
                numpy_normalizer.fit(reference, Io=255)

                def theirs_numpy(normalizer=numpy_normalizer, image=image):
                    return normalizer.normalize(image, Io=255, stains=False)

            else:
                numpy_normalizer = NumpyReinhardNormalizer()
                numpy_normalizer.fit(reference)

                def theirs_numpy(normalizer=numpy_normalizer, image=image):
                    return normalizer.normalize(image)

            t_ours = _median_time(ours, args.repeats)
            t_numpy = _median_time(theirs_numpy, args.repeats)
            line = f"{size:7d}  {method:8s}  {t_ours:9.3f}   {t_numpy:18.3f}  {t_numpy / t_ours:5.2f}"
            if torch is not None:
                chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
                ref_chw = torch.from_numpy(np.ascontiguousarray(reference.transpose(2, 0, 1))).float()
                if method == "macenko":
                    torch_normalizer = TorchMacenkoNormalizer()
                    torch_normalizer.fit(ref_chw, Io=255)

                    def theirs_torch(normalizer=torch_normalizer, chw=chw):
                        return normalizer.normalize(chw, Io=255, stains=False)

                else:
                    torch_normalizer = TorchReinhardNormalizer()
                    torch_normalizer.fit(ref_chw)

                    def theirs_torch(normalizer=torch_normalizer, chw=chw):
                        return normalizer.normalize(chw)

                t_torch = _median_time(theirs_torch, args.repeats)
                line += f"   {t_torch:18.3f}  {t_torch / t_ours:5.2f}"
            print(line, flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
