"""Distillation building blocks: fixture e, lr schedule, EMA, batch plan, pair pool, checkpoints."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from bimacosr.checkpoint import CheckpointError
from bimacosr.parity import check_file
from bimacosr.train import distill, state
from bimacosr.train.batches import BatchPlan, PairPool
from bimacosr.train.distill import distill_loss, ema_update, lr_at
from tests.conftest import FIXTURES


def test_one_distillation_step_matches_the_original():
    checks = check_file(FIXTURES / "pipeline/e_distill_loss.pt")
    assert len(checks) >= 18 and all(c.passed for c in checks), [c.line() for c in checks if not c.passed]


def test_lr_schedule_has_the_first_iteration_quirk():
    base, ms = 2e-5, (2000, 10000)
    assert lr_at(1, base, ms) == base  # the optimiser's initial lr, before the first adjustment
    assert lr_at(2, base, ms) == pytest.approx(base / 2000)
    assert lr_at(1001, base, ms) == pytest.approx(base / 2)
    assert lr_at(2001, base, ms) == pytest.approx(base)
    assert lr_at(10000, base, ms) == pytest.approx(base)  # no halving at the warm-up milestone
    assert lr_at(10001, base, ms) == pytest.approx(base / 2)
    assert lr_at(50000, base, ms) == pytest.approx(base / 2)


def test_ema_skips_only_relative_position_index():
    ema = {"w": torch.zeros(2), "attn.relative_position_index": torch.zeros(2, dtype=torch.long),
           "smb.indices_float": torch.ones(2)}
    new = {"w": torch.ones(2), "attn.relative_position_index": torch.full((2,), 5), "smb.indices_float": torch.full((2,), 3.0)}
    ema_update(ema, new, 0.9)
    assert torch.allclose(ema["w"], torch.full((2,), 0.1))
    assert torch.equal(ema["attn.relative_position_index"], torch.zeros(2, dtype=torch.long))
    assert torch.allclose(ema["smb.indices_float"], torch.full((2,), 1.2))


def test_two_ranks_see_the_global_batch_of_one():
    one = BatchPlan(20, 8, 1, 0, 2, seed=5)
    ranks = [BatchPlan(20, 8, 2, r, 2, seed=5) for r in range(2)]
    for step in (1, 2, 3, 7):
        assert one.indices(step) == ranks[0].indices(step) + ranks[1].indices(step)
    assert one.chunks() == [0, 1, 2, 3] and ranks[1].chunks() == [2, 3]
    assert sorted(one.indices(1) + one.indices(2)) == sorted(set(one.indices(1) + one.indices(2)))  # no repeats in an epoch
    with pytest.raises(ValueError, match="divisible"):
        BatchPlan(20, 6, 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match="only 3 training images"):
        BatchPlan(3, 8, 1, 0, 8, seed=0)


def test_pair_pool_fills_then_swaps_and_round_trips():
    pool = PairPool(4)
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.full((2, 1, 1, 1), float(v)) for v in (1, 2, 3))
    assert torch.equal(pool(a, a, gen)[0], a) and torch.equal(pool(b, b, gen)[0], b)
    copy = PairPool(4)
    copy.load_state_dict(pool.state_dict(), torch.device("cpu"))
    out, _ = pool(c, c, torch.Generator().manual_seed(1))
    out2, _ = copy(c, c, torch.Generator().manual_seed(1))
    assert torch.equal(out, out2) and set(out.flatten().tolist()) <= {1.0, 2.0}
    assert sorted(pool.lq.flatten().tolist()).count(3.0) == 2


def tiny_state(value: float) -> dict:
    return {"w": torch.full((3,), value)}


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        state.save_checkpoint(tmp_path, step, tiny_state(step), tiny_state(-step), {"optimizer": {}}, keep_last=2)
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert [p.name for p in state.resume_candidates(tmp_path, "latest")] == ["step_0000003", "step_0000002"]

    real_replace = os.replace
    def crash(src, dst):  # the process dies between writing and renaming
        if "step_0000004" in str(dst):
            raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        state.save_checkpoint(tmp_path, 4, tiny_state(4), tiny_state(-4), {"optimizer": {}}, keep_last=2)
    monkeypatch.setattr(os, "replace", real_replace)
    latest, skipped = state.load_resume(tmp_path, "latest")
    assert latest.folder.name == "step_0000003" and skipped == []
    assert torch.equal(latest.model["w"], torch.full((3,), 3.0)) and latest.trainer["step"] == 3
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        state.resume_candidates(tmp_path, str(tmp_path / "nope"))
    assert state.load_resume(tmp_path, None) == (None, [])


def test_a_kill_while_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        state.save_checkpoint(tmp_path, step, tiny_state(step), tiny_state(-step), {"optimizer": {}}, keep_last=3)
    real_rmtree = shutil.rmtree

    def killed(path, ignore_errors=False):  # the process dies after deleting one file
        (Path(path) / "model.pth").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        state.prune_checkpoints(tmp_path, keep_last=1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["step_0000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".pruned_step_0000001", "step_0000002"]
    state.save_checkpoint(tmp_path, 3, tiny_state(3), tiny_state(-3), {"optimizer": {}}, keep_last=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]


@pytest.mark.parametrize("name", ["model.pth", "ema.pth", "trainer.pth"])
def test_a_step_folder_missing_a_file_is_not_a_checkpoint(tmp_path, name):
    for step in (1, 2):
        state.save_checkpoint(tmp_path, step, tiny_state(step), tiny_state(-step), {"optimizer": {}}, keep_last=3)
    (tmp_path / "checkpoints/step_0000002" / name).unlink()
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["step_0000001"]


@pytest.mark.parametrize("name", ["model.pth", "ema.pth", "trainer.pth"])
def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, name):
    for step in (1, 2):
        state.save_checkpoint(tmp_path, step, tiny_state(step), tiny_state(-step), {"optimizer": {}}, keep_last=3)
    newest = tmp_path / "checkpoints/step_0000002" / name
    newest.write_bytes(newest.read_bytes()[:100])
    found, skipped = state.load_resume(tmp_path, "latest")
    assert found.folder.name == "step_0000001" and found.trainer["step"] == 1
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped checkpoint {newest.parent}: ")
    assert str(newest) in skipped[0] and "corrupt" in skipped[0]
    with pytest.raises(CheckpointError, match=str(newest)):  # an explicit choice does not fall back
        state.load_resume(tmp_path, str(newest.parent))
    older = tmp_path / "checkpoints/step_0000001" / name
    older.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* loads .*step_0000002.*step_0000001"):
        state.load_resume(tmp_path, "latest")


@pytest.mark.slow
def test_overfitting_one_batch_drives_the_loss_down(monkeypatch):
    from bimacosr.diffusion import Schedule
    from bimacosr.models import build_denoiser
    from bimacosr.models.autoencoder import VQAutoencoder

    data = torch.load(FIXTURES / "pipeline/e_distill_loss.pt", weights_only=True)
    cfg = data["config"]
    torch.manual_seed(0)
    teacher = build_denoiser(cfg["teacher"]).eval()
    teacher.load_state_dict(data["state_dict_teacher"])
    student = build_denoiser(cfg["student"])
    student.load_state_dict(data["state_dict_student"])
    vq = VQAutoencoder(**cfg["vq"]).eval()
    vq.load_state_dict(data["state_dict_vq"])
    schedule = Schedule.from_config(cfg["diffusion"])
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    lq, noise = data["inputs"]["lq"], data["inputs"]["noise"]
    # the frozen teacher's DDIM target of one fixed batch never changes: compute it once
    real_target, cached = distill.teacher_target, []

    def target_once(teacher, x_T, z_y, lq, schedule):
        if not cached:
            cached.append((x_T, z_y, real_target(teacher, x_T, z_y, lq, schedule)))
        assert torch.equal(x_T, cached[0][0]) and torch.equal(z_y, cached[0][1])
        return cached[0][2]

    monkeypatch.setattr(distill, "teacher_target", target_once)
    losses = []
    for _ in range(40):
        loss, _ = distill_loss(student, teacher, vq, schedule, lq, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses[::5]
