"""NTD: noise-to-data diffusion for continuous MEG/EEG windows, registered as "NTD" (brain-gen's spelling).

After Neural Timeseries Diffusion (Vetter et al. 2024), as brain-gen adapts it:
- Forward process x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps over diffusion_steps steps (linear or
  quadratic beta schedule), with eps drawn from a noise process along time: white, or an
  Ornstein-Uhlenbeck process (variance ou_sigma2, length scale ou_ell samples), whose samples are
  correlated in time like neural signals.
- A denoiser predicts eps from (x_t, t): a grouped conv lifts every channel to hidden_per_channel
  features, blocks of (adaptive LayerNorm over features, multi-scale depthwise long convs along time,
  adaptive LayerNorm, pointwise MLP across features) conditioned on t through adaLN-zero gates, and a
  grouped conv back to one value per channel.
- NTDLoss (loss_name "NTDLoss"): the squared Mahalanobis norm of eps - eps_hat under the noise
  process, i.e. the MSE of its whitened innovations; loss_name "MSE" is the plain MSE.
- Sampling: DDIM (eta 0, deterministic) to DDPM-like (eta 1) over num_sampling_steps of the schedule.
  `sample` draws windows from noise; `reconstruct` noises windows to a fraction of the schedule and
  denoises them back (an SDEdit-style reconstruction): `evaluation_pair` scores it against the windows.

Randomness: while training, t and eps come from torch's global RNG, which the trainer seeds per run
and saves in every checkpoint (trainer/rng.py), so a resumed run draws the same noise. In eval mode
(validation loss) and in the samplers they come from a torch.Generator seeded with eval_seed (or the
one passed), so evaluation neither varies between calls nor moves the training RNG.

Shapes: B batch, C channels, T samples per window (signal_length), W = C x hidden_per_channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.brain.signal_model import SignalModel, SignalPair
from modeling.registry import ModelSpec, register_model
from modeling.tokenizers.base import check_positive

LOSS_NAMES = ("NTDLoss", "MSE")
SCHEDULES = ("linear", "quad")
NOISE_PROCESSES = ("ou", "white")


@dataclass(frozen=True, kw_only=True)
class NTDConfig:
    num_channels: int = field(metadata={"help": "signal channels C; set by the trainer from the dataset's windows"})
    signal_length: int = field(metadata={"help": "samples per window T; set by the trainer from the dataset's windows"})
    hidden_per_channel: int = field(metadata={"help": "denoiser features per signal channel (NTD: 8)"})
    num_blocks: int = field(metadata={"help": "denoiser blocks (NTD: 3)"})
    kernel_size: int = field(default=17, metadata={"help": "odd kernel of each scale's depthwise long conv (NTD: 17)"})
    num_scales: int = field(default=3, metadata={"help": "long convs per block, at dilations 1, 2, 4, ..."})
    embedding_dim: int = field(default=64, metadata={"help": "width of the diffusion-step embedding"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on each block's MLP output while training; 0: none"})
    mix_channels: bool = field(default=True, metadata={"help": "the pointwise MLP mixes the features of all channels; false: each channel's own"})
    diffusion_steps: int = field(default=1000, metadata={"help": "steps of the forward process"})
    schedule: str = field(default="linear", metadata={"help": "beta schedule: linear | quad"})
    beta_start: float = field(default=1e-4, metadata={"help": "beta of the first diffusion step"})
    beta_end: float = field(default=2e-2, metadata={"help": "beta of the last diffusion step"})
    noise_process: str = field(default="ou", metadata={"help": "eps along time: ou (Ornstein-Uhlenbeck) | white"})
    ou_sigma2: float = field(default=1.0, metadata={"help": "variance of the noise process"})
    ou_ell: float = field(default=10.0, metadata={"help": "length scale of the OU process, in samples"})
    loss_name: str = field(default="NTDLoss", metadata={"help": "training loss: NTDLoss (Mahalanobis under the noise process) | MSE"})
    num_sampling_steps: int = field(default=50, metadata={"help": "denoising steps of sample / reconstruct (DDIM subsequence)"})
    sampler_eta: float = field(default=0.0, metadata={"help": "DDIM eta: 0 deterministic, 1 DDPM-like fresh noise each step"})
    reconstruction_level: float = field(default=0.5, metadata={"help": "fraction of the schedule reconstruct noises windows to, in (0, 1]"})
    eval_seed: int = field(default=0, metadata={"help": "seed of the noise drawn in eval mode and by the samplers by default"})
    use_gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each denoiser block in the backward pass"})

    def __post_init__(self):
        check_positive(self, "num_channels", "signal_length", "hidden_per_channel", "num_blocks", "kernel_size", "num_scales",
                       "embedding_dim", "diffusion_steps", "beta_start", "beta_end", "ou_sigma2", "ou_ell", "num_sampling_steps")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (centred convs), got {self.kernel_size}")
        if not self.beta_start <= self.beta_end < 1:
            raise ValueError(f"beta_start ({self.beta_start}) <= beta_end ({self.beta_end}) < 1 is required")
        for name, valid in (("schedule", SCHEDULES), ("noise_process", NOISE_PROCESSES), ("loss_name", LOSS_NAMES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.sampler_eta <= 1.0:
            raise ValueError(f"sampler_eta must be in [0, 1], got {self.sampler_eta}")
        if not 0.0 < self.reconstruction_level <= 1.0:
            raise ValueError(f"reconstruction_level must be in (0, 1], got {self.reconstruction_level}")


class NoiseProcess(nn.Module):
    """Gaussian noise along time, (..., T): white with variance sigma2, or a stationary OU process
    x_0 = sigma z_0, x_t = rho x_{t-1} + sigma sqrt(1 - rho^2) z_t with rho = exp(-1 / ell).

    `sample` applies the lower-triangular factor L (x = L z, kept as a derived buffer); `whiten` undoes
    it in O(T) (z = L^-1 x, the AR(1) innovations), so |whiten(x)|^2 is the Mahalanobis norm of x.
    """

    def __init__(self, kind: str, sigma2: float, ell: float, length: int):
        super().__init__()
        self.kind, self.sigma, self.length = kind, math.sqrt(sigma2), length
        self.rho = math.exp(-1.0 / ell)
        if kind == "ou":
            self.register_buffer("factor", torch.empty(length, length), persistent=False)  # L (T, T)

    def reset_parameters(self) -> None:
        if self.kind != "ou":
            return
        steps = torch.arange(self.length, dtype=torch.float64, device=self.factor.device)
        lag = steps[:, None] - steps[None, :]
        factor = self.rho ** lag.clamp_min(0) * (lag >= 0)
        factor[:, 1:] *= math.sqrt(1 - self.rho ** 2)
        self.factor.copy_((self.sigma * factor).to(self.factor.dtype))

    def sample(self, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(shape, device=device, generator=generator)
        return z @ self.factor.T if self.kind == "ou" else self.sigma * z

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "ou":
            return x / self.sigma
        innovations = torch.cat([x[..., :1], (x[..., 1:] - self.rho * x[..., :-1]) / math.sqrt(1 - self.rho ** 2)], dim=-1)
        return innovations / self.sigma


class DiffusionSchedule(nn.Module):
    """betas, alphas and their running products abar over the diffusion steps, as derived buffers."""

    def __init__(self, config: NTDConfig):
        super().__init__()
        self.config = config
        for name in ("betas", "alpha_bars"):
            self.register_buffer(name, torch.empty(config.diffusion_steps), persistent=False)

    def reset_parameters(self) -> None:
        c = self.config
        if c.schedule == "linear":
            betas = torch.linspace(c.beta_start, c.beta_end, c.diffusion_steps, dtype=torch.float64)
        else:
            betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.diffusion_steps, dtype=torch.float64) ** 2
        self.betas.copy_(betas)
        self.alpha_bars.copy_(torch.cumprod(1.0 - betas, dim=0))


class StepEmbedding(nn.Module):
    """Diffusion steps (B,) -> (B, E): sinusoids of 128 frequencies, then an MLP."""

    def __init__(self, dim: int, num_frequencies: int = 128):
        super().__init__()
        self.num_frequencies = num_frequencies
        self.mlp = nn.Sequential(nn.Linear(num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        half = self.num_frequencies // 2
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=steps.device, dtype=torch.float32) / half)
        angles = steps.float()[:, None] * frequencies[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


def feature_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the features of each time step of (B, W, T)."""
    return F.layer_norm(x.transpose(1, 2), (x.shape[1],)).transpose(1, 2)


class DenoiserBlock(nn.Module):
    """(B, W, T), step embedding (B, E) -> (B, W, T); the identity at initialisation (adaLN-zero)."""

    def __init__(self, config: NTDConfig):
        super().__init__()
        width = config.num_channels * config.hidden_per_channel
        self.long_convs = nn.ModuleList(
            nn.Conv1d(width, width, config.kernel_size, padding=2 ** i * (config.kernel_size - 1) // 2, dilation=2 ** i, groups=width)
            for i in range(config.num_scales)
        )
        groups = 1 if config.mix_channels else config.num_channels
        self.mlp = nn.Sequential(nn.Conv1d(width, width, 1, groups=groups), nn.GELU(), nn.Conv1d(width, width, 1, groups=groups),
                                 nn.Dropout(config.dropout))
        self.modulation = nn.Linear(config.embedding_dim, 6 * width)  # shift, scale, gate for the convs and for the MLP

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(embedding))[..., None].chunk(6, dim=1)  # (B, W, 1) each
        y = feature_norm(x) * (1 + scale1) + shift1
        x = x + gate1 * sum(conv(y) for conv in self.long_convs)
        y = feature_norm(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(y)


class Denoiser(nn.Module):
    """(x_t (B, C, T), steps (B,)) -> predicted eps (B, C, T)."""

    def __init__(self, config: NTDConfig):
        super().__init__()
        width = config.num_channels * config.hidden_per_channel
        self.input = nn.Conv1d(config.num_channels, width, 1, groups=config.num_channels)
        self.step_embedding = StepEmbedding(config.embedding_dim)
        self.blocks = nn.ModuleList(DenoiserBlock(config) for _ in range(config.num_blocks))
        self.output = nn.Conv1d(width, config.num_channels, 1, groups=config.num_channels)
        self.use_gradient_checkpointing = False

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        h = self.input(x)
        embedding = self.step_embedding(steps)
        is_checkpointing = self.use_gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, embedding, use_reentrant=False) if is_checkpointing else block(h, embedding)
        return self.output(h)


class NTD(SignalModel):
    """forward(signal (B, C, T)) -> scalar loss; sample / reconstruct -> (B, C, T)."""

    baseline_name = "noised windows the sampler starts from"
    _no_split_modules = ["DenoiserBlock"]

    def __init__(self, config: NTDConfig):
        super().__init__()
        self.config = config
        self.noise = NoiseProcess(config.noise_process, config.ou_sigma2, config.ou_ell, config.signal_length)
        self.schedule = DiffusionSchedule(config)
        self.denoiser = Denoiser(config)
        self.set_gradient_checkpointing(config.use_gradient_checkpointing)

    def _generator(self, device: torch.device, seed: int | None = None) -> torch.Generator | None:
        """None (torch's global RNG) while training; else a generator seeded with `seed` or eval_seed."""
        if (self.training and seed is None) or device.type == "meta":
            return None
        return torch.Generator(device=device).manual_seed(self.config.eval_seed if seed is None else seed)

    def noise_loss(self, predicted: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """NTDLoss: mean squared whitened difference (the Mahalanobis norm per element); MSE: plain."""
        if self.config.loss_name == "MSE":
            return F.mse_loss(predicted, noise)
        return self.noise.whiten(noise - predicted).square().mean()

    def forward(self, signal: torch.Tensor, pos: torch.Tensor | None = None,
                sensor_type: torch.Tensor | None = None) -> torch.Tensor:
        """signal (B, C, T) -> the denoising loss at a random diffusion step per window. pos and
        sensor_type are accepted and unused (same batches as the signal tokenizers)."""
        del pos, sensor_type
        x = self.check_signal(signal)
        generator = self._generator(x.device)
        steps = torch.randint(0, self.config.diffusion_steps, (x.shape[0],), device=x.device, generator=generator)
        noise = self.noise.sample(x.shape, x.device, generator)
        alpha_bar = self.schedule.alpha_bars[steps].float()[:, None, None]
        noisy = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
        predicted = self.denoiser(noisy, steps)
        loss = self.noise_loss(predicted, noise)
        parts = {"ntd_loss": loss, "noise_mse": F.mse_loss(predicted, noise)}
        self.keep_parts(parts, x.shape[0])
        self.last_metrics = {name: value.detach() for name, value in parts.items()}
        return loss

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, start_step: int, num_steps: int | None = None, eta: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """x at diffusion step start_step (B, C, T) -> x at step 0 in num_steps DDIM steps."""
        num_steps = num_steps or self.config.num_sampling_steps
        eta = self.config.sampler_eta if eta is None else eta
        steps = torch.linspace(start_step, 0, min(num_steps, start_step + 1)).round().long().unique_consecutive().tolist()
        alpha_bars = self.schedule.alpha_bars
        for index, step in enumerate(steps):
            alpha_bar = alpha_bars[step].float()
            alpha_bar_next = alpha_bars[steps[index + 1]].float() if index + 1 < len(steps) else alpha_bar.new_tensor(1.0)
            eps = self.denoiser(x, torch.full((x.shape[0],), step, device=x.device, dtype=torch.long))
            x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)).clamp_min(0).sqrt()
            x = alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next - sigma ** 2).clamp_min(0).sqrt() * eps
            if eta > 0 and index + 1 < len(steps):
                x = x + sigma * self.noise.sample(x.shape, x.device, generator)
        return x

    @torch.no_grad()
    def sample(self, num_samples: int, num_steps: int | None = None, eta: float | None = None,
               seed: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """New windows (num_samples, C, T) from noise."""
        device = torch.device(device) if device is not None else self.schedule.alpha_bars.device
        generator = self._generator(device, self.config.eval_seed if seed is None else seed)
        x = self.noise.sample((num_samples, self.config.num_channels, self.config.signal_length), device, generator)
        return self.denoise(x, self.config.diffusion_steps - 1, num_steps, eta, generator)

    def noise_to(self, signal: torch.Tensor, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """signal (B, C, T) through the forward process to diffusion step `step`."""
        alpha_bar = self.schedule.alpha_bars[step].float()
        return alpha_bar.sqrt() * signal + (1 - alpha_bar).sqrt() * self.noise.sample(signal.shape, signal.device, generator)

    @torch.no_grad()
    def evaluation_pair(self, signal: torch.Tensor, generator: torch.Generator | None = None) -> SignalPair:
        """Windows noised to reconstruction_level of the schedule and denoised back, vs the windows."""
        x = self.check_signal(signal)
        generator = generator or self._generator(x.device, self.config.eval_seed)
        start = max(0, round(self.config.reconstruction_level * self.config.diffusion_steps) - 1)
        noisy = self.noise_to(x, start, generator)
        num_steps = max(1, round(self.config.num_sampling_steps * self.config.reconstruction_level))
        return SignalPair(self.denoise(noisy, start, num_steps, generator=generator), x, noisy)


NTD_FLAVORS = {
    "debug": dict(num_channels=8, signal_length=128, hidden_per_channel=4, num_blocks=2, kernel_size=9, num_scales=2,
                  embedding_dim=32, diffusion_steps=100, num_sampling_steps=10),
    "small": dict(num_channels=64, signal_length=512, hidden_per_channel=8, num_blocks=3, embedding_dim=64),
    # NTD's published denoiser (8 features per channel, 3 blocks of 17-tap convs at 5 scales) on 306-channel MEG
    "full": dict(num_channels=306, signal_length=1024, hidden_per_channel=8, num_blocks=3, num_scales=5, embedding_dim=256),
}

register_model(ModelSpec(name="NTD", config_cls=NTDConfig, builder=NTD, flavors=NTD_FLAVORS, task="signal_reconstruction"))
