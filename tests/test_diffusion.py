"""ResShift schedule and samplers (bimacosr.diffusion) against docs/pipeline.md §3 and fixtures b / d."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bimacosr.diffusion.sampling import (ddim_step, predict_x0, prior_sample, q_sample,
                                         sample_ancestral, sample_ddim, sample_one_step)
from bimacosr.diffusion.schedule import Schedule, space_timesteps
from bimacosr.parity import check_file
from bimacosr.parity.common import compare
from bimacosr.parity.tolerances import TOLERANCES
from tests.conftest import FIXTURES

torch.set_num_threads(2)
EPS32 = torch.finfo(torch.float32).eps

PIPELINE = FIXTURES / "pipeline"
RELEASED = {
    "schedule_name": "exponential", "schedule_kwargs": {"power": 0.3}, "steps": 15,
    "min_noise_level": 0.04, "etas_end": 0.99, "kappa": 2.0, "predict_type": "xstart",
    "weighted_mse": False, "timestep_respacing": None, "scale_factor": 1.0,
    "normalize_input": True, "latent_flag": True, "sf": 4,
}
S15 = Schedule.from_config(RELEASED)
S15_TO_4 = Schedule.from_config({**RELEASED, "timestep_respacing": 4})
MIX = torch.tensor([[0.8, 0.1, -0.1], [0.05, 0.7, 0.1], [-0.1, 0.1, 0.9]], dtype=torch.float64)


def toy_model(x_in: Tensor, t: Tensor) -> Tensor:
    """A fixed linear map (channel mixing + a t-dependent offset) in the input's dtype."""
    mixed = torch.einsum("oc,bchw->bohw", MIX.to(x_in.dtype), x_in)
    return mixed + 0.03 * t.to(x_in.dtype).view(-1, 1, 1, 1)


def latents(seed: int, n: int = 1) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 5, 4, generator=gen) for _ in range(n)]


def reference_loop(s: Schedule, x_T: Tensor, y: Tensor, noises: list[Tensor] | None) -> Tensor:
    """DDIM (noises None) or ancestral sampling recomputed in float64 from the float64 arrays."""
    x, y = x_T.double(), y.double()
    for i, t in enumerate(reversed(range(s.num_timesteps))):
        eta, ep = s.etas[t].item(), s.etas_prev[t].item()
        t_orig = torch.full((x.shape[0],), int(s.timestep_map[t]))
        x0 = toy_model(x / math.sqrt(s.kappa ** 2 * eta + 1), t_orig)
        if noises is None:
            m = math.sqrt(ep / eta)
            x = (1 - ep + math.sqrt(ep * eta) - m) * x0 + m * x + (ep - math.sqrt(ep * eta)) * y
        else:
            std = math.exp(0.5 * s.posterior_log_variance_clipped[t].item()) if t > 0 else 0.0
            x = (ep / eta) * x + ((eta - ep) / eta) * x0 + std * noises[i].double()
    return x


def test_fixture_b_eta_schedule() -> None:
    checks = check_file(PIPELINE / "b_eta_schedule.pt")
    assert len(checks) == 3 * 24
    failed = [c.line() for c in checks if not c.passed]
    assert not failed, "\n".join(failed)


def test_released_table_values() -> None:
    s = S15
    assert s.num_timesteps == 15 and s.timestep_map.tolist() == list(range(15))
    assert s.sqrt_etas[0].item() == pytest.approx(0.02, abs=1e-15)
    assert s.sqrt_etas[14].item() == pytest.approx(0.99, abs=1e-12)
    assert s.etas[14].item() == pytest.approx(0.9801, abs=1e-12)
    assert s.prior_std == pytest.approx(1.98, abs=1e-12)
    assert s.sqrt_etas[7].item() == pytest.approx(0.4758577309, abs=1e-10)
    assert s.f32_input_std[14].item() == pytest.approx(2.21819747, abs=3e-7)  # float32 ulp 2.4e-7
    assert s.f32_input_scale[14].item() == pytest.approx(1 / 2.21819747, abs=1e-7)
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(-6.467323, abs=1e-6)
    kmj = [s.f32_ddim_k[1].item(), s.f32_ddim_m[1].item(), s.f32_ddim_j[1].item()]
    assert kmj == pytest.approx([0.83124398, 0.17069932, -0.00194330], rel=4 * EPS32, abs=1e-8)  # 4 ulps
    s4 = Schedule.from_config({**RELEASED, "steps": 4})
    assert s4.sqrt_etas.tolist() == pytest.approx([0.02, 0.3310009108, 0.6332100706, 0.99], abs=1e-10)


def test_respacing_keeps_original_indices() -> None:
    assert space_timesteps(15, 4) == [0, 3, 7, 11]
    assert space_timesteps(15, None) == list(range(15))
    s = S15_TO_4
    assert s.num_timesteps == 4 and s.timestep_map.tolist() == [0, 3, 7, 11]
    assert torch.equal(s.sqrt_etas, S15.sqrt_etas[[0, 3, 7, 11]])
    assert s.prior_std == pytest.approx(2 * 0.7539852625, abs=1e-9)
    seen: list[list[int]] = []

    def spy(x_in: Tensor, t: Tensor) -> Tensor:
        seen.append(t.tolist())
        return toy_model(x_in, t)

    x_T, y = latents(1, 2)
    sample_ddim(spy, x_T, y, s)
    assert seen == [[11, 11], [7, 7], [3, 3], [0, 0]]
    seen.clear()
    sample_one_step(spy, x_T, y, s)
    assert seen == [[11, 11]]


def test_prior_q_sample_and_input_scaling() -> None:
    y, x0, noise = latents(2, 3)
    assert torch.equal(prior_sample(y, S15, noise), y + S15.f32_sqrt_etas_kappa[14] * noise)
    t = torch.tensor([14, 3])
    want = torch.stack([S15.etas[i] * (y[b] - x0[b]).double() + x0[b].double()
                        + 2.0 * S15.sqrt_etas[i] * noise[b].double() for b, i in enumerate(t)])
    torch.testing.assert_close(q_sample(x0, y, t, S15, noise).double(), want, rtol=0, atol=2e-6)
    got = predict_x0(lambda x_in, tt: torch.cat([x_in, tt.double().view(-1, 1, 1, 1).expand_as(x_in)]),
                     y, 14, S15)
    torch.testing.assert_close(got[:2].double(), y.double() / 2.21819747, rtol=1e-7, atol=1e-7)
    assert (got[2:] == 14).all()


def test_ddim_at_t0_returns_x0_hat_exactly() -> None:
    x0, x, y = latents(3, 3)
    assert torch.equal(ddim_step(x0, x, y, 0, S15), x0)
    assert torch.equal(ddim_step(x0, x, y, torch.tensor([0, 0]), S15_TO_4), x0)


@pytest.mark.parametrize("schedule", [S15, S15_TO_4], ids=["s15", "s15_to_4"])
def test_ddim_toy_model_matches_float64(schedule: Schedule) -> None:
    x_T, y = latents(4, 2)
    visits: list[tuple[int, int]] = []
    got = sample_ddim(toy_model, x_T, y, schedule, noise_fn=pytest.fail,
                      callback=lambda i, t, x, x0: visits.append((i, t)))
    n = schedule.num_timesteps
    assert visits == [(i, n - 1 - i) for i in range(n)]
    torch.testing.assert_close(got.double(), reference_loop(schedule, x_T, y, None), rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", [S15, S15_TO_4], ids=["s15", "s15_to_4"])
def test_ancestral_toy_model_matches_float64(schedule: Schedule) -> None:
    x_T, y = latents(5, 2)
    noises = latents(6, schedule.num_timesteps)
    queue = list(noises)
    got = sample_ancestral(toy_model, x_T, y, schedule, noise_fn=lambda like: queue.pop(0))
    assert not queue  # one draw per step, t = 0 included
    torch.testing.assert_close(got.double(), reference_loop(schedule, x_T, y, noises), rtol=0, atol=1e-5)
    last_changed = [*noises[:-1], 100 * noises[-1]]  # the t = 0 noise is multiplied by 0
    again = sample_ancestral(toy_model, x_T, y, schedule, noise_fn=lambda like: last_changed.pop(0))
    assert torch.equal(again, got)


def test_one_step_returns_x0_hat_and_draws_once() -> None:
    x_T, y = latents(7, 2)
    draws: list[Tensor] = []
    got = sample_one_step(toy_model, x_T, y, S15, noise_fn=lambda like: draws.append(like) or like)
    assert len(draws) == 1
    assert torch.equal(got, toy_model(x_T / S15.f32_input_std[14], torch.full((2,), 14)))
    gen_state = torch.get_rng_state()
    sample_one_step(toy_model, x_T, y, S15)  # default: one torch.randn_like draw, discarded
    torch.set_rng_state(gen_state)
    torch.randn_like(x_T)
    after_one_draw = torch.get_rng_state()
    torch.set_rng_state(gen_state)
    sample_one_step(toy_model, x_T, y, S15)
    assert torch.equal(torch.get_rng_state(), after_one_draw)


def test_fixture_d_ddim_replay() -> None:
    """The teacher's stored x0 predictions replayed through sample_ddim give its stored latents,
    within the float32 noise floor (the coefficients are 1 ulp apart across CPU families), and
    bit for bit what the original's update line computes with this machine's coefficients."""
    d = torch.load(PIPELINE / "d_teacher_multistep.pt", map_location="cpu", weights_only=True)
    s, inter = Schedule.from_config(d["config"]["diffusion"]), d["intermediates"]
    x_T = prior_sample(inter["z_y"], s, d["inputs"]["noise"])
    samples: list[Tensor] = []
    out = sample_ddim(lambda x_in, t: inter["ddim_pred_xstart"][len(samples)], x_T, inter["z_y"], s,
                      callback=lambda i, t, x, x0: samples.append(x))
    for label, got, want in (("x_T", x_T, inter["x_T"]), ("ddim_samples", torch.stack(samples), inter["ddim_samples"]),
                             ("z_teacher_ddim", out, d["outputs"]["z_teacher_ddim"])):
        check = compare(label, got, want, TOLERANCES["f32_single_pass"])
        assert check.passed, check.line()
    x = inter["z_y"] + s.f32_sqrt_etas_kappa[-1] * d["inputs"]["noise"]  # the original's lines, in order
    assert torch.equal(x_T, x)
    for i, t in enumerate(reversed(range(s.num_timesteps))):
        x = inter["ddim_pred_xstart"][i] * s.f32_ddim_k[t] + s.f32_ddim_m[t] * x + s.f32_ddim_j[t] * inter["z_y"]
        assert torch.equal(samples[i], x), t
    assert torch.equal(out, x)


@pytest.mark.parametrize("change, words", [
    ({"schedule_name": "linear"}, ["schedule_name", "exponential"]),
    ({"predict_type": "epsilon"}, ["predict_type", "xstart"]),
    ({"timestep_respacing": 16}, ["timestep_respacing"]),
    ({"timestep_respacing": "4"}, ["timestep_respacing"]),
    ({"kappa": -1.0}, ["kappa"]),
    ({"steps": 1}, ["steps"]),
    ({"etas_end": 1.5}, ["etas_end"]),
    ({"schedule_kwargs": {}}, ["schedule_kwargs.power"]),
    ({"normalize_input": "yes"}, ["normalize_input"]),
    ({"sf": 0}, ["sf"]),
    ({"bogus": 1}, ["bogus", "schedule_name"]),
])
def test_bad_config_raises(change: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        Schedule.from_config({**RELEASED, **change})
    assert all(w in str(err.value) for w in words), str(err.value)
