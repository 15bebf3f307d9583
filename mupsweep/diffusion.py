"""Diffusion processes: DDPM eps-prediction (DiT, U-ViT, PixArt) and rectified flow (MMDiT).

Both expose the same three methods so the training loop does not care which one it drives:
`sample_timesteps` (training t), `loss` (per-sample loss for given x0, t, noise) and `sample`
(generate images, with classifier-free guidance). Models are called as
`model(x_t, t, cond, drop)` where `drop` marks samples whose conditioning is nulled (CFG).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mupsweep.config import DiffusionConfig


def _guided(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict, cfg_scale: float,
            channels: int) -> torch.Tensor:
    """One model call on [cond; uncond] and the CFG mix of the first `channels` outputs."""
    if cfg_scale == 1.0:
        return model(x, t, cond)[:, :channels]
    B = x.shape[0]
    cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
    out = model(torch.cat([x, x]), torch.cat([t, t]), cond2, drop)[:, :channels]
    cond_out, uncond_out = out.chunk(2)
    return uncond_out + cfg_scale * (cond_out - uncond_out)


class GaussianDiffusion:
    """DDPM with a linear beta schedule; the model predicts eps (and optionally the variance
    interpolation, DiT's learned-range sigma trained with the VLB term)."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.num_timesteps
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = prev
        # posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - prev) * torch.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self.log_betas = torch.log(betas)
        # Schedule tables copied to each device once: a copy per call would make the host wait
        # for the accelerator on every training step.
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The schedule table `name` at t, broadcast to like's shape (B, 1, 1, 1), in like's
        dtype and device."""
        key = (name, t.device)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(t.device)
        out = self._on_device[key][t].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._at("alphas_cumprod", t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def loss(self, model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             cond: dict, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss (B,): mse(eps) [+ VLB term when the model learns sigma]."""
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, cond, drop).float()
        C = x0.shape[1]
        eps = out[:, :C]
        mse = ((eps - noise.float()) ** 2).mean(dim=(1, 2, 3))
        if out.shape[1] == C:
            return mse
        return mse + self._vlb(eps.detach(), out[:, C:], x0.float(), x_t.float(), t)

    def _vlb(self, eps: torch.Tensor, var_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits/dim, eps stop-gradiented (DiT's
        hybrid loss, scaled by num_timesteps/1000 as in improved DDPM)."""
        min_log = self._at("posterior_log_variance", t, x_t)
        max_log = self._at("log_betas", t, x_t)
        frac = (var_out + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        a = self._at("alphas_cumprod", t, x_t)
        pred_x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        c1, c2 = self._at("posterior_mean_coef1", t, x_t), self._at("posterior_mean_coef2", t, x_t)
        model_mean, true_mean = c1 * pred_x0 + c2 * x_t, c1 * x0 + c2 * x_t
        true_log_var = min_log
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        # at t = 0 the KL is replaced by the (continuous) decoder negative log-likelihood
        nll = 0.5 * (math.log(2 * math.pi) + model_log_var
                     + (x0 - model_mean) ** 2 * torch.exp(-model_log_var))
        term = torch.where((t == 0).view(-1, 1, 1, 1), nll, kl).mean(dim=(1, 2, 3)) / math.log(2.0)
        return term * self.num_timesteps / 1000.0

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, cond: dict, cfg_scale: float = 1.0,
               steps: int | None = None) -> torch.Tensor:
        """DDIM (eta = 0) from pure noise to x0 in `steps` evenly spaced steps."""
        steps = steps or self.cfg.sample_steps
        x = noise
        C = noise.shape[1]
        ts = torch.linspace(self.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        for i, t_now in enumerate(ts):
            t = torch.full((x.shape[0],), int(t_now), device=x.device, dtype=torch.long)
            eps = _guided(model, x, t, cond, cfg_scale, C).float()
            a = self.alphas_cumprod[t_now].item()
            a_prev = self.alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
            pred_x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
            eps = (x - math.sqrt(a) * pred_x0) / math.sqrt(1 - a)
            x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * eps
        return x


class RectifiedFlow:
    """Rectified flow / flow matching (SD3): x_t = (1 - t) x0 + t noise, the model predicts
    v = noise - x0; t ~ logit-normal(0, 1) for training; Euler sampling from t=1 to t=0.
    Models see t scaled to [0, num_timesteps) so the same timestep embedder serves both."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.num_timesteps = cfg.num_timesteps

    def sample_timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_timesteps

    def loss(self, model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             cond: dict, drop: torch.Tensor | None = None) -> torch.Tensor:
        tb = t.view(-1, 1, 1, 1).to(x0.dtype)
        x_t = (1 - tb) * x0 + tb * noise
        v = model(x_t, self._model_t(t), cond, drop).float()[:, : x0.shape[1]]
        return F.mse_loss(v, (noise - x0).float(), reduction="none").mean(dim=(1, 2, 3))

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, cond: dict, cfg_scale: float = 1.0,
               steps: int | None = None) -> torch.Tensor:
        steps = steps or self.cfg.sample_steps
        x = noise
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
            v = _guided(model, x, self._model_t(t), cond, cfg_scale, x.shape[1]).float()
            x = x + (ts[i + 1] - ts[i]).item() * v
        return x.clamp(-1, 1)


def make_diffusion(cfg: DiffusionConfig) -> GaussianDiffusion | RectifiedFlow:
    return RectifiedFlow(cfg) if cfg.kind == "rectified_flow" else GaussianDiffusion(cfg)
