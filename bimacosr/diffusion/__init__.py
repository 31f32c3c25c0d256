"""ResShift diffusion maths: eta schedule and samplers (no model code)."""
from bimacosr.diffusion.sampling import (ancestral_step, ddim_step, predict_x0, prior_sample,
                                         q_sample, sample_ancestral, sample_ddim, sample_one_step,
                                         scale_input)
from bimacosr.diffusion.schedule import Schedule, eta_schedule, space_timesteps

__all__ = [
    "Schedule", "ancestral_step", "ddim_step", "eta_schedule", "predict_x0", "prior_sample",
    "q_sample", "sample_ancestral", "sample_ddim", "sample_one_step", "scale_input",
    "space_timesteps",
]
