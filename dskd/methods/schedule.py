"""DDPM noise schedule with deterministic DDIM steps (a small diffusers-like object).

Kept free of nn.Module state: the schedule is a pure function of three numbers, so it
never enters checkpoints and is identical on every DDP rank.
"""

from __future__ import annotations

import math

import torch


class DiffusionSchedule:
    """Linear-beta DDPM schedule; `ᾱ_t` for t in 0..T-1, and `ᾱ_{-1} = 1` (the clean end)."""

    def __init__(
        self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> None:
        if num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be >= 1")
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._host = self.alphas_cumprod.tolist()  # Python floats: host-side lookups never touch a tensor
        self._tables: dict[str, torch.Tensor] = {}

    def alpha_bar(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t shaped to broadcast against `like` (B×...); t < 0 means the clean end (ᾱ = 1).

        Both forms index a table cached on `like`'s device, so neither copies from the host
        (no torch.tensor(python_number, device=...), which is a blocking copy on CUDA).
        """
        table = self._table(like.device)
        if isinstance(t, torch.Tensor):
            values = table[t.to(like.device, torch.long).clamp(min=-1)]  # -1 → the appended 1.0
            shape = (-1,) + (1,) * (like.dim() - 1) if values.dim() == 1 else ()
            return values.reshape(shape).to(like.dtype)
        return table[-1 if t < 0 else t].to(like.dtype)

    def alpha_bar_value(self, t: int) -> float:
        """ᾱ_t as a Python float (float64 precision) for a step known on the host: no tensor at all."""
        return 1.0 if t < 0 else float(self._host[t])

    def ddim_coefficients(self, t: int, t_prev: int) -> tuple[float, float]:
        """(c_x, c_ε) with DDIM(η=0) x_{t_prev} = c_x·x_t + c_ε·ε: the step as two scalars.

        From x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t and x_{t_prev} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε.
        """
        a, a_prev = self.alpha_bar_value(t), self.alpha_bar_value(t_prev)
        c_x = math.sqrt(a_prev / a)
        return c_x, math.sqrt(1.0 - a_prev) - c_x * math.sqrt(1.0 - a)

    def _table(self, device: torch.device) -> torch.Tensor:
        """ᾱ_0..ᾱ_{T-1} followed by 1.0, cached per device so indexing never syncs."""
        key = str(device)
        if key not in self._tables:
            full = torch.cat([self.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
            self._tables[key] = full.to(device)
        return self._tables[key]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0): √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
        if not isinstance(t, torch.Tensor):  # a host-side step: two scalar ops, no lookup
            a = self.alpha_bar_value(t)
            return torch.add(x0 * math.sqrt(a), noise, alpha=math.sqrt(1.0 - a))
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def pred_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """The clean sample implied by a noise prediction: (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
        if not isinstance(t, torch.Tensor):
            a = self.alpha_bar_value(t)
            return torch.add(x_t, eps, alpha=-math.sqrt(1.0 - a)) * (1.0 / math.sqrt(a))
        a = self.alpha_bar(t, x_t)
        return (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()

    def step(
        self, eps: torch.Tensor, t: int | torch.Tensor, t_prev: int | torch.Tensor, x_t: torch.Tensor
    ) -> torch.Tensor:
        """One deterministic DDIM (η = 0) update x_t → x_{t_prev}; t_prev = −1 lands on x_0."""
        if not isinstance(t, torch.Tensor) and not isinstance(t_prev, torch.Tensor):
            c_x, c_eps = self.ddim_coefficients(t, t_prev)
            return torch.add(x_t * c_x, eps, alpha=c_eps)
        x0 = self.pred_x0(x_t, eps, t)
        a_prev = self.alpha_bar(t_prev, x_t)
        return a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps

    def sampling_timesteps(self, t0: int, steps: int) -> list[tuple[int, int]]:
        """`steps` evenly spaced (t, t_prev) pairs from t0 down to 0, then to the clean end.

        t0 = 400, steps = 5 gives 400→300→200→100→0→clean, as in DiffKD.
        """
        if not 0 <= t0 < self.num_train_timesteps:
            raise ValueError(f"t0 must be in [0, {self.num_train_timesteps - 1}], got {t0}")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if steps == 1:
            times = [t0]
        else:
            times = [round(t0 - i * t0 / (steps - 1)) for i in range(steps)]
        times = sorted(set(times), reverse=True)
        return list(zip(times, times[1:] + [-1], strict=True))
