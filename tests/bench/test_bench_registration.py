"""The product does not depend on bench/: `instructrec bench` is registered through the
`instructrec.commands` entry-point group, no product module imports instructrec.bench, a product
command never loads it, and the built wheel carries no test files (the pytest-benchmark suites
live in benchmarks/, outside the package)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT_FOLDERS = ("instructrec", "engine", "kernels", "training", "export")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_help_lists_bench():
    out = subprocess.run([sys.executable, "-m", "instructrec", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(line.split()[:1] == ["bench"] for line in out.stdout.splitlines()), out.stdout


def test_bench_help_runs_through_the_entry_point():
    out = subprocess.run([sys.executable, "-m", "instructrec", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--models" in out.stdout and "random:" in out.stdout, out.stderr


def test_a_product_command_never_imports_bench():
    code = ("import sys, contextlib, io\n"
            "from instructrec.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n"
            "        main(['rerank', '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('instructrec.bench')))")
    assert _run(code) == "[]"


def test_no_product_module_imports_bench():
    offenders = []
    for folder in PRODUCT_FOLDERS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("instructrec.bench")]
    assert offenders == []


def test_wheel_ships_no_test_files(tmp_path):
    """Build the wheel from a copy of the sources (nothing written into the checkout) and read
    its file names."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in set(pyproject["tool"]["setuptools"]["package-dir"].values()):
        top = folder.split("/")[0]
        if not (src / top).exists():
            shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("instructrec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tests = [n for n in names if Path(n).name.startswith("test_") or Path(n).name == "conftest.py"
             or "/tests/" in f"/{n}"]
    assert tests == []
    assert "instructrec/bench/cli.py" in names and "instructrec/engine/reranker.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[instructrec.commands]" in text and "bench = instructrec.bench.cli:register" in text


@pytest.mark.parametrize("suite", ["test_bench_kernels.py", "test_bench_packing.py", "test_bench_tokenization.py"])
def test_benchmark_suites_live_outside_the_package(suite):
    assert (REPO / "benchmarks" / suite).exists() and not (REPO / "bench" / suite).exists()
