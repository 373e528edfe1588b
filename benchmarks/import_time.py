"""Import time: ``import sthisto`` against the importlib.metadata version lookup it used to make.

Each measurement runs in a fresh interpreter (``python -X importtime`` for the import, a timer
around the call for the lookup), alternating the two, and the script prints medians and their
ratio. Run from the repository root; with ``PYTHONPATH=src`` to measure a source tree.

* ``import sthisto`` — the package's own import (cumulative microseconds of the ``sthisto``
  line of ``-X importtime``): it loads no sub-package, no torch and, since the version is
  written at build time into ``sthisto/_version.py``, no importlib.metadata;
* ``metadata lookup`` — ``importlib.metadata.version("sthisto")`` including the import of
  importlib.metadata: what ``import sthisto`` paid before the version file existed;
* ``python -c pass`` — the interpreter's own start-up, for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

_LOOKUP = (
    "import time; t = time.perf_counter(); from importlib.metadata import version; version('sthisto'); "
    "print((time.perf_counter() - t) * 1e3)"
)


def _import_ms() -> float:
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sthisto"], capture_output=True, text=True, env=os.environ
    )
    line = [row for row in run.stderr.splitlines() if row.rstrip().endswith("| sthisto")][-1]
    return int(line.split("|")[1]) / 1e3


def _lookup_ms() -> float:
    run = subprocess.run([sys.executable, "-c", _LOOKUP], capture_output=True, text=True, env=os.environ, check=True)
    return float(run.stdout)


def _startup_ms() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    imports, lookups, startups = [], [], []
    for _ in range(args.repeats):
        imports.append(_import_ms())
        lookups.append(_lookup_ms())
        startups.append(_startup_ms())
    import_ms, lookup_ms, startup_ms = map(statistics.median, (imports, lookups, startups))
    import sthisto

    has_file = os.path.exists(os.path.join(os.path.dirname(sthisto.__file__), "_version.py"))
    print(f"sthisto {sthisto.__version__} from {sthisto.__file__} (version file: {'yes' if has_file else 'no'})")
    print(f"median of {args.repeats}: import sthisto {import_ms:.1f} ms, metadata lookup {lookup_ms:.1f} ms,")
    print(f"  python -c pass {startup_ms:.1f} ms (wall)")
    print(f"ratio import sthisto / metadata lookup: {import_ms / lookup_ms:.2f}")


if __name__ == "__main__":
    main()
