"""The README's result tables are generated from benchmarks/results/ (benchmarks/render_readme.py)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_readme", ROOT / "benchmarks" / "render_readme.py")
render_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_readme)


def test_readme_tables_are_current():
    text = (ROOT / "README.md").read_text()
    assert len(render_readme.sources(text)) >= 8  # ops, serve x2, profile x2, roofline x2, spec
    assert render_readme.render(text) == text, "run benchmarks/render_readme.py"


def test_a_hand_edited_or_stale_table_is_caught(tmp_path):
    (tmp_path / "r.md").write_text("# title\n| a |\n|---|\n| 1.0 |\n")
    block = "<!-- results: r.md -->\n| a |\n|---|\n| 1.0 |\n<!-- /results -->\n"
    assert render_readme.render("x\n" + block, tmp_path) == "x\n" + block
    edited = block.replace("1.0", "0.9")  # hand-edited in the README
    assert render_readme.render(edited, tmp_path) == block
    (tmp_path / "r.md").write_text("| a |\n|---|\n| 2.0 |\n")  # results re-measured
    assert "2.0" in render_readme.render(block, tmp_path)
    with pytest.raises(FileNotFoundError):
        render_readme.render(block.replace("r.md", "gone.md"), tmp_path)
