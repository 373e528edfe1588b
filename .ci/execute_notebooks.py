"""Execute every notebook in a folder top to bottom; fail on the first error.

Used by ``.ci/run``. Notebooks run in their own folder with the current interpreter's kernel
and write nothing back (the committed notebooks stay output-free).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

CELL_TIMEOUT_S = 600


def main(folder: str) -> int:
    """Execute the notebooks of ``folder`` in name order; return the process exit code."""
    notebooks = sorted(Path(folder).glob("*.ipynb"))
    if not notebooks:
        print(f"no notebooks in {folder}")
        return 1
    for path in notebooks:
        start = time.perf_counter()
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
        print(f"{path.name}: ok in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "tutorials"))
