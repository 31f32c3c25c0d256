"""scripts/check_fixtures.py as a user runs it: passes on the shared fixtures, fails on anything off."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import FIXTURES, REPO


def run(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/check_fixtures.py"), *map(str, paths)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["denoiser", "baselines"])
def test_shared_fixture_folders_pass(folder):
    result = run(FIXTURES / folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    n_passed = int(last.split()[0])
    assert last.endswith(" 0 failed") and n_passed > 50


def test_a_perturbed_output_fails(tmp_path):
    data = torch.load(FIXTURES / "denoiser/fp_unet_forward.pt", weights_only=True)
    data["output"] = data["output"] + 1e-3
    torch.save(data, tmp_path / "fp_unet_forward.pt")
    result = run(tmp_path)
    assert result.returncode == 1 and "FAIL fp_unet_forward.pt output" in result.stdout


@pytest.mark.parametrize("content,message", [
    ({"something": torch.zeros(2)}, "not understood"),
    ([1, 2, 3], "not understood"),
    (b"\x00garbage", "cannot load"),
])
def test_files_it_does_not_understand_fail(tmp_path, content, message):
    path = tmp_path / "odd.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    result = run(path)
    assert result.returncode == 1 and message in result.stdout and "0 passed, 1 failed" in result.stdout


def test_empty_folder_fails(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 1 and "no fixture files found" in result.stdout
