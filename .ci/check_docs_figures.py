"""Fail unless every tutorial page of the built documentation shows figures.

Used by ``.ci/run`` after the documentation build, which executes the tutorials: a page
without an ``<img>`` means its notebook ran without producing its figures (for instance with
a non-inline matplotlib backend), which a warnings-as-errors build alone does not catch.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def main(html: str) -> int:
    """Print the number of images on each built tutorial page; return the process exit code."""
    pages = sorted((Path(html) / "tutorials").glob("*.html"))
    if not pages:
        print(f"no tutorial pages under {html}/tutorials; build the documentation first")
        return 1
    missing = []
    for page in pages:
        count = len(re.findall(r"<img\b", page.read_text(encoding="utf-8")))
        print(f"{page.name}: {count} images")
        if count == 0:
            missing.append(page.name)
    if missing:
        print(f"tutorial pages without figures: {', '.join(missing)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html"))
