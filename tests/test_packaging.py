"""The release artefacts: an sdist and a wheel that `twine check` accepts and that install beside
an existing torch into a fresh virtual environment, where a smoke test runs."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest
import torch

import khot

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = """
import importlib.metadata, pathlib, sys, torch, khot
assert pathlib.Path(khot.__file__).is_relative_to(sys.prefix), khot.__file__  # the installed copy
assert khot.__version__ == importlib.metadata.version("khot")
assert (pathlib.Path(khot.__file__).parent / "py.typed").is_file()
x = torch.tensor([[0.3, 0.9, 0.1, 0.9]])
assert khot.topk_mask(x, 2).tolist() == [[False, True, False, True]]
assert abs(float(khot.sigmoid_topk(x, 2.0).sum()) - 2) < 1e-5
print("ok", khot.__version__)
"""


def run(*args, **kwargs):
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_version_is_single_sourced():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "khot.__version__" }' in pyproject
    assert re.search(r"^version: ([\w.]+)$", (ROOT / "CITATION.cff").read_text(), re.M)[1] == khot.__version__
    assert re.search(rf"^## {re.escape(khot.__version__)} ", (ROOT / "CHANGELOG.md").read_text(), re.M)


@pytest.mark.skipif(
    importlib.util.find_spec("build") is None or importlib.util.find_spec("twine") is None,
    reason="needs `build` and `twine` (requirements-dev.txt installs them)",
)
def test_sdist_and_wheel_install_beside_torch_and_run(tmp_path):
    tree = tmp_path / "tree"  # a copy, so that building writes nothing into the repository
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, tree)  # the sdist, then a wheel built from it
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    assert sdist.name == f"khot-{khot.__version__}.tar.gz"
    run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "src/khot/py.typed", "src/khot/__init__.py"} <= names
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "khot/py.typed" in names and any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    env = tmp_path / "venv"  # fresh, without pip; torch comes from this interpreter's site-packages
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (pathlib.Path(purelib) / "existing_torch.pth").write_text(str(pathlib.Path(torch.__file__).parents[1]) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--quiet", wheel)  # torch>=2.4 already there
    assert run(python, "-c", SMOKE, cwd=tmp_path).startswith(f"ok {khot.__version__}")
    assert "bench" in run(env / "bin" / "khot", "--help", cwd=tmp_path)  # the console script
