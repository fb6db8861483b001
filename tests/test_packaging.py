"""The installed package: a plain (non-editable) install ships the gin files, and its
`python -m calm_jax.train` / `calm-train` find them from any working directory."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.py", "pyproject.toml", "README.md", "calm_jax", "tasks", "gin")


def _repo_gin_files() -> list[str]:
    gin = os.path.join(REPO, "gin")
    return sorted(os.path.relpath(p, gin) for p in glob.glob(f"{gin}/**/*.gin", recursive=True))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the folder it was installed into with `pip install --target`)."""
    root = tmp_path_factory.mktemp("package")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info beside setup.py
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                    "-w", str(root / "dist"), str(src)], check=True, cwd=root)
    (wheel,) = glob.glob(str(root / "dist" / "*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site"),
                    wheel], check=True, cwd=root)
    return wheel, root / "site"


def _run(site, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd)


def test_the_wheel_ships_every_gin_file(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _repo_gin_files()
    assert "experiments/compose_kv.gin" in expected and "runs/base.gin" in expected
    missing = [f for f in expected if f"calm_jax/gin_configs/{f}" not in names]
    assert not missing, missing
    assert "calm_jax/train.py" in names and "tasks/kv_arithmetic.py" in names


def test_the_installed_command_finds_the_shipped_gin_files(installed, tmp_path):
    """Run from another directory (one holding a `runs/` folder, which must not shadow the
    shipped `include 'runs/base.gin'`): the installed copy is the one imported, `--help`
    works, and `--gin_file=experiments/compose_kv.gin` resolves inside the installed package."""
    _, site = installed
    (tmp_path / "runs").mkdir()
    help_ = _run(site, os.path.join(site, "bin", "calm-train"), "--help", cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert "--gin_file" in help_.stdout and os.path.join(str(site), "calm_jax") in help_.stdout
    check = ("import gin, calm_jax, calm_jax.train as t\n"
             "t.parse_gin(['experiments/compose_kv.gin'], [\"MODEL_DIR = '/tmp/x'\", "
             "\"ANCHOR_CHECKPOINT = 'a'\", \"AUGMENT_CHECKPOINT = 'b'\"])\n"
             "print(calm_jax.__file__)\nprint(t.GIN_DIR)\nprint(gin.query_parameter('%MODE'))\n")
    result = _run(site, sys.executable, "-c", check, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    package_file, gin_dir, mode = result.stdout.split()
    assert package_file == os.path.join(str(site), "calm_jax", "__init__.py")
    assert gin_dir == os.path.join(str(site), "calm_jax", "gin_configs")
    assert mode == "compose"
