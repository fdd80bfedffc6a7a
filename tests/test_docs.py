"""The documentation site builds with `mkdocs build --strict` (a broken reference fails), its API
reference covers the public API, and the Python examples on its pages run as written."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "report-example" not in p.parts)

needs_mkdocs = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings_handlers.python")),
    reason="needs mkdocs, mkdocs-material and mkdocstrings[python] (requirements-dev.txt installs them)",
)


@needs_mkdocs
def test_site_builds_strict_with_the_api_reference(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    pages = ("khot", "nn", "relaxed", "sampling", "losses", "metrics", "distributed")
    api = {page: (tmp_path / "api" / page / "index.html").read_text() for page in pages}
    for page, name in [
        ("khot", "khot.topk_mask"), ("khot", "khot.sigmoid_topk"), ("khot", "khot.soft_select"), ("khot", "khot.sample_khot"),
        ("nn", "khot.nn.TokenPruning"), ("nn", "khot.nn.TopKRouter"), ("sampling", "khot.sampling.pips_sample"),
        ("losses", "khot.losses.topk_loss"), ("metrics", "khot.metrics.nccs"), ("distributed", "khot.distributed.sharded_topk"),
    ]:
        assert f'id="{name}"' in api[page], f"the API reference lacks {name}"
    choosing = (tmp_path / "choosing" / "index.html").read_text()
    assert "<!-- khot:" not in choosing and "<table>" in choosing  # the registry's table and the report's summary went in


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()], ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page):
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        exec(compile(block, str(page), "exec"), namespace)
