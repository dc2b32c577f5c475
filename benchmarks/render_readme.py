"""Fill the README's result tables from benchmarks/results/ (never copy them by hand).

Each generated block in README.md sits between two markers naming its source::

    <!-- results: benchmarks/results/ops.md -->
    ... (replaced by that file, less a leading "# title" line) ...
    <!-- /results -->

    python benchmarks/render_readme.py           # rewrite README.md after a benchmark run
    python benchmarks/render_readme.py --check   # exit 1 if README.md is out of date

tests/test_readme_tables.py runs the check, so a stale or hand-edited table fails CI.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results: (?P<src>\S+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def rendered_block(root: Path, src: str) -> str:
    path = root / src
    if not path.is_file():
        raise FileNotFoundError(f"README names {src}, which does not exist")
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):  # the results file's own title
        lines = lines[1:]
    return "\n".join(lines).strip("\n") + "\n"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every results block replaced by its source file's current content."""
    return BLOCK.sub(lambda m: m.group(1) + rendered_block(root, m.group("src")) + m.group(4), text)


def sources(text: str) -> list[str]:
    return [m.group("src") for m in BLOCK.finditer(text)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report whether README.md is current")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args()
    readme = Path(args.readme)
    text = readme.read_text()
    new = render(text, readme.parent)
    if args.check:
        if new != text:
            print(f"{readme}: result tables differ from benchmarks/results/ "
                  "(run benchmarks/render_readme.py)", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print(f"{readme}: {len(sources(text))} result blocks from {', '.join(sources(text))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
