"""scripts/check_fixtures.py as a user runs it: passes on the shared fixtures, fails on anything off,
and stands in for another CPU: fixtures whose float32 outputs moved by 2 ulps still pass."""
import contextlib
import importlib.util
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bimacosr.parity import check_file
from tests.conftest import FIXTURES, REPO


def run(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/check_fixtures.py"), *map(str, paths)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def run_here(*paths) -> subprocess.CompletedProcess:
    """The script's ``main()`` in this process, as :func:`run` reports it (exit status, stdout),
    without an interpreter's start-up (~2.5 s each: the everyday tier's budget)."""
    spec = importlib.util.spec_from_file_location("check_fixtures", REPO / "scripts/check_fixtures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv, threads, out = sys.argv, torch.get_num_threads(), io.StringIO()
    sys.argv = ["check_fixtures.py", *map(str, paths)]
    try:
        with contextlib.redirect_stdout(out):
            code = script.main()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["check_fixtures.py", *map(str, paths)], code, out.getvalue(), "")


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
    result = run_here(path)
    assert result.returncode == 1 and message in result.stdout and "0 passed, 1 failed" in result.stdout


def test_empty_folder_fails(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 1 and "no fixture files found" in result.stdout


# -- another CPU's rounding, stood in for --------------------------------------------------------
NUDGED = ["pipeline/a_vq_autoencoder.pt", "pipeline/b_eta_schedule.pt", "pipeline/c_one_step_inference.pt",
          "denoiser/fp_unet_forward.pt", "baselines/bidm_conv.pt"]


def float32_outputs(data: dict, file: str) -> Iterator[tuple[dict, str, str]]:
    """``(holder, key, check name)`` of every float32 result a fixture stores (not its inputs)."""
    def tensors(holder: dict, prefix: str, keys=None) -> Iterator[tuple[dict, str, str]]:
        for key in holder if keys is None else keys:
            if key in holder and isinstance(holder[key], torch.Tensor) and holder[key].dtype == torch.float32:
                yield holder, key, f"{prefix}{key}"

    if "outputs" in data:  # pipeline fixtures
        yield from tensors(data["outputs"], f"{file} ")
    if "output" in data and "float32" not in data:  # UNet forward
        yield from tensors(data, f"{file} ", ["output"])
    for schedule, fields in data.get("schedules", {}).items():
        yield from tensors(fields, f"{file} {schedule}/", [k for k in fields if k.startswith("f32_")])
    if "float32" in data:  # baseline layer: its float32 results
        yield from tensors(data["float32"], f"{file} float32 ", ["output", "grad_input", "grad_weight"])
        yield from tensors(data["float32"]["param_grads"], f"{file} float32 grad ")


def write_nudged(dest: Path, nudge) -> dict[str, list[str]]:
    """Copies of NUDGED in ``dest`` with every float32 output ``t`` replaced by ``nudge(t, name)``;
    returns the check names of the nudged tensors per file."""
    dest.mkdir()
    names = {}
    for rel in NUDGED:
        data = torch.load(FIXTURES / rel, weights_only=True)
        file = Path(rel).name
        found = list(float32_outputs(data, file))
        for holder, key, name in found:
            holder[key] = nudge(holder[key], name)
        torch.save(data, dest / file)
        names[file] = [name for _, _, name in found]
    return names


def ulps_up(t: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        t = torch.nextafter(t, torch.full_like(t, float("inf")))
    return t


def test_outputs_two_ulps_off_pass_and_ten_tolerances_off_fail(tmp_path):
    names = write_nudged(tmp_path / "ulps", lambda t, name: ulps_up(t, 2))
    assert sum(map(len, names.values())) > 20
    result = run_here(tmp_path / "ulps")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]

    tolerance = {c.name: c.tol for f in sorted((tmp_path / "ulps").glob("*.pt")) for c in check_file(f)}
    assert all(tolerance.get(n, 0) > 0 for ns in names.values() for n in ns), "a float32 output checked exactly"
    write_nudged(tmp_path / "far", lambda t, name: t + 10 * tolerance[name])
    result = run_here(tmp_path / "far")
    assert result.returncode == 1
    for name in (n for nudged in names.values() for n in nudged):
        line = next((line for line in result.stdout.splitlines() if f" {name} " in line), None)
        assert line is not None and line.startswith("FAIL"), (name, line)
