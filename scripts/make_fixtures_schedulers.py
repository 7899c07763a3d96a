#!/usr/bin/env python3
"""Reference trajectories of the scheduler family (Euler, CogVideoX-DDIM, DPM-Solver++ Karras).

Run from the repository root:

    /work/venv/bin/python scripts/make_fixtures_schedulers.py

Writes tests/fixtures/expected/schedulers/ (deterministic: fixed seeds, CPU):

* cases.json: for each case, `config` (the scheduler_config.json given to diffusers),
  `override` (null, or the relayfarm name passed to `scheduler::with_override` on `config`),
  `class`, `resolved_config` (the diffusers config after `from_config`, `_`-keys dropped),
  and per N (`steps`): `init_noise_sigma` and the first timesteps (for reading).
* <case>.safetensors, per N in STEPS (EXTRA_STEPS for the extra settings):
  - `timesteps_{N}` f64 [N], `sigmas_{N}` f64 (if any), `init_noise_sigma_{N}` f64 [1];
  - `noise` f32 [1,4,4,4] (shared by all N): the raw N(0,1) latents;
  - `model_out_{N}` f32 [N,1,4,4,4]: the fixed "model outputs" fed to step i;
  - `model_in_{N}` f32 [N,1,4,4,4]: scale_model_input(sample_i, t_i);
  - `samples_{N}` f32 [N+1,1,4,4,4]: sample_0 = noise·init_noise_sigma, then each step's result.
  - CogVideoX-DDIM cases also store `alphas_cumprod` f64 [T].

The loop is the pipelines' loop (KolorsPipeline / CogView3PlusPipeline): set_timesteps, latents
× init_noise_sigma, then per step scale_model_input(latents, t), step(out, t, latents, **kw)
with eta=0 and a generator for the DDIM scheduler (as CogView3PlusPipeline passes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import CogVideoXDDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "expected" / "schedulers"
STEPS = (1, 3, 25, 50)
# The extra settings (cases after the first five) run shorter schedules to keep the files small.
EXTRA_STEPS = (1, 3, 12)

# Kwai-Kolors/Kolors-diffusers scheduler/scheduler_config.json (models-spec §4.1/§4.4; the file's
# fields as published: an SDXL-style Euler config with 1100 steps and β_end 0.014).
KOLORS_EULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.28.0.dev0",
    "beta_end": 0.014,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "dynamic_thresholding_ratio": 0.995,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# THUDM/CogView3-Plus-3B scheduler/scheduler_config.json (models-spec §2.1/§2.3; the values of
# diffusers scripts/convert_cogview3_to_diffusers.py).
COGVIEW3_DDIM = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 4.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}

CLASSES = {
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "CogVideoXDDIMScheduler": CogVideoXDDIMScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
}

# (case, base config, relayfarm override name or None, diffusers target class, from_config kwargs)
CASES = [
    ("kolors_euler", KOLORS_EULER, None, "EulerDiscreteScheduler", {}),
    ("cogview3_ddim", COGVIEW3_DDIM, None, "CogVideoXDDIMScheduler", {}),
    ("kolors_dpmpp_karras", KOLORS_EULER, "dpm++-karras", "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": True}),
    ("kolors_dpmpp", KOLORS_EULER, "dpm++", "DPMSolverMultistepScheduler",
     {"use_karras_sigmas": False}),
    ("kolors_euler_karras", KOLORS_EULER, "euler-karras", "EulerDiscreteScheduler",
     {"use_karras_sigmas": True}),
    # Other settings of the two new classes.
    ("euler_trailing_v_zsnr", {
        "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "trailing",
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    }, None, "EulerDiscreteScheduler", {}),
    ("euler_linspace_sigma_min", {
        "_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "sigma_min",
    }, None, "EulerDiscreteScheduler", {}),
    ("euler_exponential", {
        "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "use_exponential_sigmas": True,
        "timestep_spacing": "leading", "steps_offset": 1,
    }, None, "EulerDiscreteScheduler", {}),
    ("euler_karras_linspace", {
        "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True,
    }, None, "EulerDiscreteScheduler", {}),
    ("ddim_eps_leading", {
        "_class_name": "CogVideoXDDIMScheduler", "timestep_spacing": "leading",
        "steps_offset": 1, "set_alpha_to_one": False,
    }, None, "CogVideoXDDIMScheduler", {}),
    ("ddim_v_linspace_linear", {
        "_class_name": "CogVideoXDDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
        "beta_end": 0.02, "timestep_spacing": "linspace", "prediction_type": "v_prediction",
        "snr_shift_scale": 1.5, "rescale_betas_zero_snr": True,
    }, None, "CogVideoXDDIMScheduler", {}),
]


def build(base: dict, target: str, kwargs: dict):
    # Like a pipeline: the source scheduler is loaded from its file, then converted.
    src = CLASSES[base["_class_name"]].from_config(dict(base))
    if target == base["_class_name"] and not kwargs:
        return src
    return CLASSES[target].from_config(src.config, **kwargs)


def plain(v):
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return v


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {}
    for idx, (case, base, override, target, kwargs) in enumerate(CASES):
        g = torch.Generator().manual_seed(1000 + idx)
        noise = torch.randn((1, 4, 4, 4), generator=g)
        tensors = {"noise": noise}
        entry = {"config": base, "override": override, "class": target, "steps": {}}
        for n in STEPS if idx < 5 else EXTRA_STEPS:
            s = build(base, target, kwargs)
            entry["resolved_config"] = {
                k: plain(v) for k, v in dict(s.config).items() if not k.startswith("_")
            }
            s.set_timesteps(n)
            is_ddim = isinstance(s, CogVideoXDDIMScheduler)
            init = float(s.init_noise_sigma)
            latents = noise * s.init_noise_sigma
            outs = torch.randn((n, 1, 4, 4, 4), generator=g)
            model_in, samples = [], [latents]
            for i, t in enumerate(s.timesteps):
                x_in = s.scale_model_input(latents, t)
                model_in.append(x_in)
                kw = {"eta": 0.0, "generator": g} if is_ddim else {}
                latents = s.step(outs[i], t, latents, **kw, return_dict=False)[0]
                samples.append(latents)
            ts = s.timesteps.to(torch.float64).clone()
            tensors[f"timesteps_{n}"] = ts
            tensors[f"init_noise_sigma_{n}"] = torch.tensor([init], dtype=torch.float64)
            sig = getattr(s, "sigmas", None)
            if sig is not None and not is_ddim:
                tensors[f"sigmas_{n}"] = sig.to(torch.float64).clone()
            tensors[f"model_out_{n}"] = outs
            tensors[f"model_in_{n}"] = torch.stack(model_in).float().contiguous()
            tensors[f"samples_{n}"] = torch.stack(samples).float().contiguous()
            entry["steps"][str(n)] = {"init_noise_sigma": init, "first_timesteps": [float(v) for v in ts[:3]]}
            if is_ddim:
                tensors["alphas_cumprod"] = s.alphas_cumprod.to(torch.float64).clone()
        save_file(tensors, str(OUT / f"{case}.safetensors"))
        meta[case] = entry
    (OUT / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {len(CASES)} cases to {OUT}")


if __name__ == "__main__":
    main()
