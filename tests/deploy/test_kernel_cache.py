"""The kernel's build cache: each build records its library (size, sha256); a library that differs
from its record is never loaded, the kernel is rebuilt in a fresh folder instead."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from bimacosr import kernels

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Calls:
    """What the stand-ins for the compiler and the library loader were asked to do."""

    built: list[Path] = field(default_factory=list)  # build folders
    loaded: list[str] = field(default_factory=list)  # libraries loaded as they are


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Calls:
    """An empty kernel cache under ``tmp_path``, a stand-in compiler (each ``cpp_extension.load``
    writes a library of 6000 bytes) and a stand-in ``torch.ops.load_library``."""
    calls = Calls()

    def load(name: str, build_directory: str, **kwargs) -> None:
        calls.built.append(Path(build_directory))
        (Path(build_directory) / f"{name}.so").write_bytes(bytes(range(250)) * 24)

    monkeypatch.setenv("BIMACOSR_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    monkeypatch.setattr(torch.ops, "load_library", calls.loaded.append)
    return calls


def library(folder: Path) -> Path:
    return folder / f"bimacosr_binary_{folder.name}.so"


def test_a_build_records_its_library(cache):
    folder, passed_over = kernels._build()
    assert cache.built == [folder] == [kernels.build_dir()] and passed_over == "" and cache.loaded == []
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
    assert folder == first.with_name(f"{first.name}_1") and cache.built == [first, folder]
    assert passed_over.startswith(str(library(first))) and problem in passed_over
    assert kernels._build() == (folder, passed_over) and cache.loaded == [str(library(folder))]  # the fresh one


def test_a_build_without_a_record_is_left_to_cpp_extension(cache):
    """Never built, or built before records were kept: cpp_extension's up-to-date check decides."""
    first = kernels.build_dir()
    first.mkdir(parents=True)
    library(first).write_bytes(b"older build")
    assert kernels._build() == (first, "") and cache.built == [first] and cache.loaded == []


def test_a_verified_build_is_loaded_without_a_lock(cache, monkeypatch):
    """A read-only cache holding a verified build: loaded as it is, no lock taken, nothing written."""
    first, _ = kernels._build()

    def read_only(**kwargs) -> None:
        raise OSError(f"[Errno 30] Read-only file system: '{first / 'lock'}'")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", read_only)
    assert kernels._build() == (first, "") and cache.loaded == [str(library(first))]


PROBE = ("import torch; from bimacosr import kernels; assert kernels.available(), kernels.status(); "
         "print(torch.ops.bimacosr.path())")


def probe(kernel_dir: Path) -> subprocess.CompletedProcess:
    """A fresh process that loads (building if need be) the real kernel from ``kernel_dir``."""
    env = {**os.environ, "BIMACOSR_KERNEL_DIR": str(kernel_dir), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A kernel cache holding one real, recorded build (copy it before changing it)."""
    root = tmp_path_factory.mktemp("kernels")
    result = probe(root)
    if result.returncode != 0:
        pytest.skip(f"the kernel does not build here: {result.stderr[-500:]}")
    return root


def copy_build(built: Path, root: Path) -> Path:
    """``built``'s cache copied to ``root``; its one build folder there (the one the fresh process
    named and built)."""
    shutil.copytree(built, root, dirs_exist_ok=True)
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


@pytest.mark.slow
def test_a_truncated_cached_kernel_is_rebuilt_not_loaded(built, tmp_path):
    """The real kernel, truncated in its cache: the next process rebuilds it in a fresh folder and
    runs it (a truncated library used to crash every process with SIGBUS, exit 135)."""
    first = copy_build(built, tmp_path)
    so = library(first)
    so.write_bytes(so.read_bytes()[:5000])
    again = probe(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"built in {first}_1; not loaded: {so} has size 5000, its build recorded " in again.stderr


@pytest.mark.slow
def test_a_cached_kernel_whose_lock_cannot_be_taken_is_loaded(built, tmp_path):
    """As in a read-only cache (root writes anywhere, so the lock is made a folder instead): the
    verified library is loaded, not the stock path (it fell back with '... /lock')."""
    first = copy_build(built, tmp_path)
    (first / "lock").unlink(missing_ok=True)
    (first / "lock").mkdir()
    result = probe(tmp_path)
    assert result.returncode == 0 and f"built in {first})" in result.stderr, result.stderr[-2000:]
