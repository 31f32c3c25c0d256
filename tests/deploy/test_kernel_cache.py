"""The kernel's build cache: each build records its library (size, sha256); a library that differs
from its record is never loaded, the kernel is rebuilt in a fresh folder instead."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from bimacosr.deploy import kernels

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> list[Path]:
    """An empty kernel cache under ``tmp_path`` with a stand-in compiler: each call of
    ``cpp_extension.load`` writes a library of 6000 bytes and is listed (its build folder)."""
    built: list[Path] = []

    def load(name: str, build_directory: str, **kwargs) -> None:
        built.append(Path(build_directory))
        (Path(build_directory) / f"{name}.so").write_bytes(bytes(range(250)) * 24)

    monkeypatch.setenv("BIMACOSR_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    return built


def library(folder: Path) -> Path:
    return folder / f"bimacosr_binary_{folder.name}.so"


def test_a_build_records_its_library(cache):
    folder, passed_over = kernels._build()
    assert cache == [folder] == [kernels.build_dir()] and passed_over == ""
    record = json.loads(library(folder).with_suffix(".so.json").read_text())
    assert record["size"] == 6000 and len(record["sha256"]) == 64


@pytest.mark.parametrize("damage, problem", [
    (lambda so: so.write_bytes(so.read_bytes()[:5000]), "has size 5000, its build recorded 6000"),
    (lambda so: so.write_bytes(bytes(6000)), "has sha256 "),
    (lambda so: so.unlink(), "No such file"),
    (lambda so: so.with_suffix(".so.json").write_text("{garbage"), "Expecting property name"),
])
def test_a_damaged_build_is_passed_over_and_rebuilt_in_a_fresh_folder(cache, damage, problem):
    first, _ = kernels._build()
    damage(library(first))
    folder, passed_over = kernels._build()
    assert folder == first.with_name(f"{first.name}_1") and cache == [first, folder]
    assert passed_over.startswith(str(library(first))) and problem in passed_over
    assert kernels._build() == (folder, passed_over) and cache[-1] == folder  # the fresh build is used


def test_a_build_without_a_record_is_left_to_cpp_extension(cache):
    """Never built, or built before records were kept: cpp_extension's up-to-date check decides."""
    first = kernels.build_dir()
    first.mkdir(parents=True)
    library(first).write_bytes(b"older build")
    assert kernels._build() == (first, "") and cache == [first]


@pytest.mark.slow
def test_a_truncated_cached_kernel_is_rebuilt_not_loaded(tmp_path):
    """The real kernel, truncated in its cache: the next process rebuilds it in a fresh folder and
    runs it (a truncated library used to crash every process with SIGBUS, exit 135)."""
    first = tmp_path / kernels.build_dir().name
    probe = ("import torch; from bimacosr.deploy import kernels; assert kernels.available(), kernels.status(); "
             "print(torch.ops.bimacosr.path())")
    env = {**os.environ, "BIMACOSR_KERNEL_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)

    built = run()
    assert built.returncode == 0, built.stderr[-2000:]
    so = library(first)
    so.write_bytes(so.read_bytes()[:5000])
    again = run()
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"built in {first}_1; not loaded: {so} has size 5000, its build recorded " in again.stderr
