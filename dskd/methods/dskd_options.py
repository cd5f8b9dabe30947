"""DSKD's options and their cross-checks (split from dskd/methods/dskd.py, issue 15).

`DSKD_OPTIONS` is what `DSKD.OPTIONS` exposes; `DIFFUSION_OPTIONS` and `check_diffusion_options`
are shared with the DiffKD baseline; `V1_OPTIONS` gives back the first reconstruction.
"""

from __future__ import annotations

from dskd.errors import UserError
from dskd.methods.options import Opt

_W = {"low": 0.0}

DIFFUSION_OPTIONS: dict[str, Opt] = {
    "t0": Opt(400, int, "SDEdit start step of the denoising chain", low=0),
    "steps": Opt(5, int, "DDIM steps from t0 to 0", low=1, high=1000),
    "num_train_timesteps": Opt(1000, int, "DDPM steps", low=2),
    "beta_start": Opt(1e-4, float, "first DDPM beta", low=1e-8, high=0.5),
    "beta_end": Opt(0.02, float, "last DDPM beta", low=1e-8, high=0.999),
}


def check_diffusion_options(method: str, options: dict) -> None:
    """Cross-option checks the per-option ranges cannot express."""
    if options["t0"] >= options["num_train_timesteps"]:
        raise UserError(
            f"option {method}.t0={options['t0']} must be below {method}.num_train_timesteps="
            f"{options['num_train_timesteps']}"
        )
    if options["beta_start"] > options["beta_end"]:
        raise UserError(f"option {method}.beta_start must not exceed {method}.beta_end")


# Options that give back the v1 reconstruction (before issue 14): student-space diffusion of sg(f_s),
# the original timestep conditioning and BatchNorm denoiser, no feature scaling, random hash planes,
# the feature loss from the first step. Combine with the benchmark's tuned v1 values
# (lsh_on, t0, guidance_scale, detach_adapter_input) to reproduce the old table's rows.
V1_OPTIONS: dict[str, object] = {
    "diffusion_space": "student", "x0_source": "self", "denoiser_time": "add", "denoiser_norm": "batch",
    "feature_norm": False, "lsh_head_planes": False, "feature_start": 0.0,
    "steps": 5, "denoiser_precision": "autocast",  # v1's chain and precision (the defaults moved in issue 15)
}


DSKD_OPTIONS: dict[str, Opt] = {
    # 1000: in the teacher's scaled space guidance at s = 100 moves f̂ ~5× less than v1's did at s = 100;
    # the probes (bench/results/dskd_probes.json) find teacher signal in f̂ at 1000, hardly at 100
    "guidance_scale": Opt(1000.0, float, "classifier-guidance scale s (0 = unguided)", **_W),
    "guidance_target": Opt("label", str, "what guidance pulls towards", choices=("label", "soft", "mix")),
    "guidance_mix": Opt(0.5, float, "label share of the 'mix' target", low=0.0, high=1.0),
    "guidance_form": Opt("gradient", str, "classifier-gradient or loss guidance (v1's loss form, "
                         "weight = guidance_scale)", choices=("gradient", "loss")),
    "guidance_impl": Opt("auto", str, "gradient guidance: closed form when the teacher head is pool+linear "
                         "(auto) or autograd (the general path; same result)", choices=("auto", "autograd")),
    "capture": Opt("off", str, "torch.compile the sampling chain (reduce-overhead = CUDA graphs on CUDA; "
                   "default mode elsewhere); falls back to eager if compiling fails",
                   choices=("off", "compile")),
    **DIFFUSION_OPTIONS,
    "t0": Opt(100, int, "SDEdit start step of the denoising chain", low=0),
    # steps stays DiffKD's 5: at the shipped s = 1000, f̂ after 3 steps differs from f̂ after 5 by more
    # than another noise draw does (bench/results/dskd_steps_probe_v3.json); at s = 100 it did not (issue 15)
    "diffusion_space": Opt("teacher", str, "where the denoiser works: the teacher's feature space (the "
                           "student's features reach it through the adapter) or the student's",
                           choices=("teacher", "student")),
    "x0_source": Opt("teacher", str, "whose features the denoiser learns: the teacher's (in student space: "
                     "their adapter-inverse) or the student's own (self)", choices=("self", "teacher")),
    "feature_norm": Opt(True, bool, "diffuse (f − μ)/σ with running per-channel statistics of the "
                        "denoiser's training features (unit scale next to the unit noise)"),
    "denoiser_time": Opt("film", str, "timestep conditioning: add before the first norm (v1; a BatchNorm "
                         "removes it for a one-t batch) or film (scale/shift after each norm)",
                         choices=("add", "film")),
    "denoiser_norm": Opt("group", str, "denoiser norms: group (per-sample statistics, the same in train "
                         "and eval mode) or batch (v1)", choices=("group", "batch")),
    "denoiser_precision": Opt("auto", str, "denoiser arithmetic: auto = float32 on CPU (the exact arithmetic, "
                              "and the cheaper step there), the trainer's autocast elsewhere; or always "
                              "autocast / float32",
                              choices=("auto", "autocast", "float32")),
    "target_mode": Opt("sample", str, "the feature-loss target: sample = f̂ itself; cancel = start + "
                       "f̂ − f̂(s=0) on shared noise (only what guidance changed); invert = DDIM "
                       "inversion to t0 instead of random noise, then guided DDIM",
                       choices=("sample", "cancel", "invert")),
    "loss_guidance": Opt(0.0, float, "weight of CE(teacher head on f̂, target) back-propagated through "
                         "the chain into the denoiser (small-scale loss guidance; 0 = off)", **_W),
    "feature_start": Opt(0.1, float, "fraction of training with the feature loss off (the denoiser "
                         "pre-trains on L_diff alone; the hash bias is set after it)", low=0.0, high=1.0),
    "lsh_bits": Opt(None, int, "random hash bits (None = 4 × the width of the diffusion space)",
                    nullable=True, low=1),
    "lsh_head_planes": Opt(True, bool, "add the teacher head's class directions as hash planes "
                           "(teacher space only), so the hash sees what guidance changed"),
    "lsh_soft": Opt(0.0, float, "soft hash targets sigmoid(projection/lsh_soft) (0 = hard bits)", **_W),
    "lsh_on": Opt("pooled", str, "feature loss per position or on the pooled vector",
                  choices=("spatial", "pooled")),
    "lsh_std": Opt(1.0, float, "std of the random projection", low=1e-8),
    "lsh_bias_batches": Opt(20, int, "batches whose medians set the hash bias", low=1),
    "lsh_bias_momentum": Opt(None, float, "then keep tracking the median by EMA (None = freeze)",
                             nullable=True, low=0.0, high=1.0),
    "lsh_correct_only": Opt(False, bool, "feature loss only on samples the teacher gets right"),
    "feature_loss": Opt("lsh", str, "feature loss (mse = ablation)", choices=("lsh", "mse")),
    "feature_mse": Opt(0.0, float, "μ: extra MSE between the student's view and f̂ (LSHFM's L2 term)", **_W),
    "detach_adapter_input": Opt(False, bool, "L_adapt trains the adapter only (on sg(f_s))"),
    "alpha_kd": Opt(1.0, float, "logit KD weight α", **_W),
    "tau": Opt(4.0, float, "temperature of KD and L_adapt", low=1e-3),
    "w_ce": Opt(1.0, float, "cross-entropy weight", **_W),
    "w_diff": Opt(1.0, float, "diffusion loss weight", **_W),
    "w_adapt": Opt(1.0, float, "adapter loss weight", **_W),
    "w_lsh": Opt(6.0, float, "feature loss weight λ_lsh", **_W),
    "lsh_warmup": Opt(0.1, float, "fraction of training to ramp λ_lsh in (after feature_start)",
                      low=0.0, high=1.0),
}


def check_dskd_options(method: str, options: dict) -> None:
    """DSKD's cross-option checks (the per-option ranges are Opt's), before anything is built."""
    check_diffusion_options(method, options)
    if options["lsh_head_planes"] and options["diffusion_space"] != "teacher" and options["feature_loss"] == "lsh":
        raise UserError(
            f"option {method}.lsh_head_planes=true needs {method}.diffusion_space=\"teacher\" "
            "(the head's class directions live in the teacher's feature space); set lsh_head_planes=false"
        )
