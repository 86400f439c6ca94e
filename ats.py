"""Adaptive Timestep Sampling (ATS) for DDPM training, in one file.

Kim, Ki, Shim, Lee, "Adaptive Non-uniform Timestep Sampling for Accelerating Diffusion Model
Training", CVPR 2025, arXiv:2411.09998 ("ATS Eq. N" below). DDPM is Ho, Jain, Abbeel,
arXiv:2006.11239 ("DDPM Eq. N"). The file reads top to bottom:

    1. schedule and diffusion math   GaussianDiffusion (losses, VLB terms, NLL, DDPM/DDIM sampling)
    2. U-Net                         UNet (the DDPM architecture, any size and channel count)
    3. timestep samplers             UniformSampler, AdaptiveTimestepSampler (copy this one)
    4. training step and loop        Trainer (Adam + warmup, clipping, EMA, AMP, DDP)
    5. checkpoints                   save_checkpoint, load_checkpoint

Code timestep t runs 0..T-1 and is paper step t+1. Nothing runs at import.
"""

import contextlib
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# 1. Schedule and diffusion math
# ---------------------------------------------------------------------------------------------


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """beta_1..beta_T in float64 for 'linear' (DDPM), 'quad' (released ATS CIFAR-10) or 'cosine'."""
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == "quad":
        return torch.linspace(1e-4**0.5, 0.02**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, Eq. 17, s = 0.008
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}: use 'linear', 'quad' or 'cosine'")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of data in [-1, 1] under a Gaussian discretised to 256 bins (DDPM Sec. 3.3)."""
    inv_std = torch.exp(-log_scale)
    plus = inv_std * (x - mean + 1 / 255)    # upper bin edge, standardised
    minus = inv_std * (x - mean - 1 / 255)   # lower bin edge, standardised
    log_cdf_plus = torch.special.log_ndtr(plus)          # first bin: mass of (-inf, edge]
    log_one_minus_cdf_min = torch.special.log_ndtr(-minus)  # last bin: mass of [edge, inf)
    mid = (torch.special.ndtr(plus) - torch.special.ndtr(minus)).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, mid))


def mean_flat(x):
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


class GaussianDiffusion(nn.Module):
    """The DDPM forward process, its losses and its samplers, for an eps-prediction model.

    Coefficients are computed in float64 and registered as float32 buffers, so `.to(device)` moves
    them with the model. Every random draw takes an optional `generator`.
    """

    def __init__(self, *, T: int = 1000, schedule: str = "linear", var_type: str = "large"):
        super().__init__()
        if var_type not in ("large", "small"):
            raise ValueError(f"unknown var_type {var_type!r}: use 'large' or 'small'")
        self.T = T
        betas = make_betas(schedule, T)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)                                   # abar_t
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        var_post = betas * (1 - abar_prev) / (1 - abar)                   # DDPM Eq. 7, beta-tilde
        logvar_post = torch.log(torch.cat([var_post[1:2], var_post[1:]]))  # clipped at t = 0
        model_var = torch.cat([var_post[1:2], betas[1:]]) if var_type == "large" else var_post
        model_logvar = torch.log(model_var) if var_type == "large" else logvar_post
        buffers = {
            "betas": betas, "abar": abar, "abar_prev": abar_prev,
            "sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
            "post_c1": betas * abar_prev.sqrt() / (1 - abar),             # DDPM Eq. 7, x0 coef
            "post_c2": alphas.sqrt() * (1 - abar_prev) / (1 - abar),      # DDPM Eq. 7, x_t coef
            "logvar_post": logvar_post, "model_logvar": model_logvar,
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _at(buf, t, x):
        """buf[t] shaped to broadcast against x: [B] -> [B, 1, 1, 1]."""
        return buf[t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM Eq. 4)."""
        return self._at(self.sqrt_abar, t, x0) * x0 + self._at(self.sqrt_1m_abar, t, x0) * noise

    def loss(self, model, x0, t, noise=None, generator=None):
        """L_simple per sample, ||eps - eps_theta(x_t, t)||^2 averaged over pixels (DDPM Eq. 14): [B].

        ATS adds no importance weight: the paper folds the VLB weight c_t into the sampler (ATS Sec. 4).
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        return mean_flat((noise - model(self.q_sample(x0, t, noise), t)) ** 2)

    def p_mean(self, model, xt, t, clip=False):
        """Mean of p_theta(x_{t-1} | x_t) and the predicted x0, from eps_theta (DDPM Eq. 11)."""
        eps = model(xt, t).float()
        x0_hat = (xt - self._at(self.sqrt_1m_abar, t, xt) * eps) / self._at(self.sqrt_abar, t, xt)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        return self._at(self.post_c1, t, xt) * x0_hat + self._at(self.post_c2, t, xt) * xt, x0_hat

    def vlb_terms(self, model, x0, t, noise):
        """The VLB term L_t per sample, in bits/dim: [B] (DDPM Eq. 5).

        KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) for t >= 1, and the discretised-Gaussian
        decoder NLL -log p_theta(x0 | x_1) for t = 0. `noise` fixes the draw of x_t.
        """
        xt = self.q_sample(x0, t, noise)
        mean_post = self._at(self.post_c1, t, x0) * x0 + self._at(self.post_c2, t, x0) * xt
        mean_model, _ = self.p_mean(model, xt, t)
        logvar_model = self._at(self.model_logvar, t, x0)
        kl = mean_flat(normal_kl(mean_post, self._at(self.logvar_post, t, x0), mean_model, logvar_model))
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean_model, 0.5 * logvar_model))
        return torch.where(t == 0, nll, kl) / math.log(2)

    def prior_bpd(self, x0):
        """KL(q(x_T | x0) || N(0, I)) per sample, in bits/dim: [B]. Near zero for a good schedule."""
        t = torch.full((x0.shape[0],), self.T - 1, device=x0.device, dtype=torch.long)
        mean, logvar = self._at(self.sqrt_abar, t, x0) * x0, self._at(self.abar, t, x0).neg().log1p()
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2)

    @torch.no_grad()
    def nll_bpd(self, model, x0, batch_size=256, generator=None):
        """The NLL bound sum_t L_t + prior per image, in bits/dim: [B]. Runs B*T forwards in chunks."""
        B = x0.shape[0]
        img = torch.arange(B, device=x0.device).repeat_interleave(self.T)        # (B*T,)
        ts = torch.arange(self.T, device=x0.device).repeat(B)                     # (B*T,)
        total = self.prior_bpd(x0)
        for i, t in zip(img.split(batch_size), ts.split(batch_size)):
            noise = torch.randn((len(i), *x0.shape[1:]), generator=generator).to(x0.device)
            total = total.index_add(0, i, self.vlb_terms(model, x0[i], t, noise))
        return total

    @torch.no_grad()
    def ddpm_sample(self, model, shape, generator=None, progress=None):
        """Ancestral sampling over all T steps (DDPM Algorithm 2), returned in [-1, 1]."""
        device = self.betas.device
        x = torch.randn(shape, generator=generator).to(device)
        for i in reversed(range(self.T)):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            mean, _ = self.p_mean(model, x, t, clip=True)
            z = torch.randn(shape, generator=generator).to(device) if i > 0 else torch.zeros_like(x)
            x = mean + (0.5 * self._at(self.model_logvar, t, x)).exp() * z
            if progress is not None:
                progress(self.T - i, self.T)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def ddim_sample(self, model, shape, steps=50, eta=0.0, generator=None, progress=None):
        """DDIM sampling (Song et al. 2021, Eq. 12) on `steps` evenly spaced timesteps, in [-1, 1]."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in [1, {self.T}], got {steps}")
        device = self.betas.device
        seq = torch.linspace(0, self.T - 1, steps).round().long().tolist()
        x = torch.randn(shape, generator=generator).to(device)
        for n, (i, j) in enumerate(zip(reversed(seq), [*reversed(seq[:-1]), -1]), start=1):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            a, a_prev = self.abar[i], (self.abar[j] if j >= 0 else self.abar.new_tensor(1.0))
            _, x0_hat = self.p_mean(model, x, t, clip=True)
            eps = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and j >= 0:
                x = x + sigma * torch.randn(shape, generator=generator).to(device)
            if progress is not None:
                progress(n, steps)
        return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# 2. U-Net (the DDPM architecture: Ho et al. 2020, Appendix B)
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t, dim):
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def norm(c):
    return nn.GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, t_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2, self.drop = norm(c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)                                         # (B, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps_theta(x_t, t). Works for any channel count and any size divisible by 2^(levels-1).

    `attn_res` lists the feature-map sizes (in pixels, for an input of `image_size`) that get
    self-attention; DDPM's CIFAR-10 model uses (16,) at image_size 32.
    """

    def __init__(self, *, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res=2, attn_res=(16,),
                 dropout=0.1, image_size=32):
        super().__init__()
        t_dim = 4 * ch
        self.ch = ch
        self.temb = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, chans, c, res = nn.ModuleList(), [ch], ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res):
                self.down.append(nn.ModuleList([ResBlock(c, ch * mult, t_dim, dropout),
                                                Attention(ch * mult) if res in attn_res else nn.Identity()]))
                c = ch * mult
                chans.append(c)
            if level < len(ch_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # downsample
                chans.append(c)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, dropout), Attention(c), ResBlock(c, c, t_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res + 1):
                self.up.append(nn.ModuleList([ResBlock(c + chans.pop(), ch * mult, t_dim, dropout),
                                              Attention(ch * mult) if res in attn_res else nn.Identity()]))
                c = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)

    def forward(self, x, t):
        temb = self.temb(timestep_embedding(t, self.ch))   # (B, 4ch)
        h = self.conv_in(x)                                 # (B, ch, H, W)
        hs = [h]
        for block in self.down:
            h = block(h) if isinstance(block, nn.Conv2d) else block[1](block[0](h, temb))
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for block in self.up:
            if isinstance(block, nn.Sequential):
                h = block(h)
            else:
                h = block[1](block[0](torch.cat([h, hs.pop()], dim=1), temb))
        return self.out(h)                                  # (B, in_ch, H, W)


# ---------------------------------------------------------------------------------------------
# 3. Timestep samplers. Both have the same API, so the training loop never asks which it holds:
#      t = sampler.sample(x0)                 # LongTensor[B]
#      with sampler.around_update(x0, t):     # wraps optimizer.step() (and the EMA update)
#          optimizer.step()
#    AdaptiveTimestepSampler needs only torch and a vlb_fn(x0, t, noise) -> [B]; copy it freely.
# ---------------------------------------------------------------------------------------------


class UniformSampler:
    """t ~ U{0, ..., T-1}: the standard DDPM choice."""

    def __init__(self, T: int):
        self.T = T

    def sample(self, x0, generator=None):
        return torch.randint(0, self.T, (x0.shape[0],), generator=generator, device=x0.device)

    @contextlib.contextmanager
    def around_update(self, x0, t):
        yield

    def summary(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class AdaptiveTimestepSampler:
    """The ATS policy pi_phi(t | x0), trained online with REINFORCE (ATS Sec. 4, Eq. 11-14).

    The policy maps x0 to (a, b) > 0 and puts an exactly normalised, discretised Beta(a, b) on the
    T timesteps. Every `update_every` (f_S) steps it measures how much the model update at the
    sampled t lowered the VLB terms of a few timesteps S (the reward, ATS Eq. 12), picks S with a
    univariate F-test over a queue of full T-sweeps (the surrogate of ATS Eq. 14), and takes a
    REINFORCE step with an entropy bonus (ATS Eq. 13).

    Arguments:
        T: number of diffusion timesteps.
        vlb_fn: callable (x0, t, noise) -> [B], the per-sample VLB term L_t. Called without grad.
        in_channels: image channels, for the policy network (any image size works).
        model: if given, put in eval mode (dropout off) during probes and restored after.
        update_every (f_S), k (|S|), queue_size (Q), lr, entropy_coef, grad_clip: ATS defaults.
        baseline: subtract the batch-mean reward (the paper uses none).
        standardize: divide the (centred) reward by its batch std; off in the paper.
        mix: uniform-mixture floor, p = (1 - mix) p_policy + mix / T, used everywhere; 0 in the paper.
        ab_range: (lo, hi) clamp on a and b (straight-through gradient); (1, hi) keeps the policy
            unimodal. None: no clamp.
        probe_batch: forwards per chunk in the probe, to bound memory.
        seed: seeds the probe's noise; it must be the same on every rank.
    """

    def __init__(self, T, vlb_fn, in_channels=3, *, model=None, update_every=40, k=3, queue_size=20,
                 lr=1e-2, entropy_coef=1e-2, grad_clip=1.0, baseline=False, standardize=False,
                 mix=0.0, ab_range=None, probe_batch=256, seed=0, history_size=256, device=None):
        if not 1 <= k <= T:
            raise ValueError(f"k = |S| must be in [1, T={T}], got {k}")
        if update_every < 1 or queue_size < 3 or not 0 <= mix < 1:
            raise ValueError("need update_every >= 1, queue_size >= 3 and 0 <= mix < 1")
        self.T, self.vlb_fn, self.model, self.k = T, vlb_fn, model, k
        self.update_every, self.queue_size, self.entropy_coef = update_every, queue_size, entropy_coef
        self.grad_clip, self.baseline, self.standardize, self.mix = grad_clip, baseline, standardize, mix
        self.ab_range, self.probe_batch, self.history_size = ab_range, probe_batch, history_size
        self.policy = self.policy_net(in_channels).to(device)
        if self.world()[1] > 1:  # the policy starts identical on every rank and stays so (all-reduced grads)
            for p in self.policy.parameters():
                dist.broadcast(p.data, src=0)
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=lr)
        u = (torch.arange(T, dtype=torch.float64) + 0.5) / T                 # bin centres u_t
        self.log_u, self.log_1mu = u.log().float().to(device), (-u).log1p().float().to(device)
        self.noise_gen = torch.Generator().manual_seed(seed)
        self.step = 0                                                        # global step counter
        self.S = torch.arange(k)                                             # selected timesteps
        self.queue_x = torch.zeros(0, T, dtype=torch.float64)                # sweep deltas (n, T)
        self.queue_y = torch.zeros(0, dtype=torch.float64)                   # their sums (n,)
        self.history, self.history_steps, self.history_every = [], [], 1
        self.last = {}                                                       # stats of last update

    # -- the policy: exact discrete probabilities (ATS Eq. 11, discretised) --

    def ab(self, x0):
        """Beta parameters (a, b) per image: two [B] tensors."""
        ab = F.softplus(self.policy(x0)) + 1e-5                               # (B, 2): a, b > 0
        if self.ab_range is not None:  # clamp the values, but let the gradient through, so that a
            ab = ab + (ab.clamp(*self.ab_range) - ab).detach()  # policy at a bound can still leave it
        return ab.unbind(1)

    def log_probs(self, x0):
        """log pi(t | x0) for every t: [B, T], exactly normalised, finite for any (a, b)."""
        a, b = self.ab(x0)
        return self.log_probs_from_ab(a, b)

    def log_probs_from_ab(self, a, b):
        """log pi(t) of the discretised Beta(a, b) (plus the mixture floor) for [B] tensors a, b: [B, T]."""
        log_u, log_1mu = self.log_u.to(a.device), self.log_1mu.to(a.device)
        logits = (a - 1)[:, None] * log_u + (b - 1)[:, None] * log_1mu        # (B, T)
        logp = F.log_softmax(logits, dim=1)
        if self.mix > 0:  # (1 - mix) p + mix / T, in log space
            logp = torch.logaddexp(logp + math.log1p(-self.mix), torch.full_like(logp, math.log(self.mix / self.T)))
        return logp

    @torch.no_grad()
    def probs(self, x0):
        """pi(t | x0): [B, T], rows sum to 1."""
        with torch.autocast(x0.device.type, enabled=False):
            return self.log_probs(x0.float()).exp()

    def sample(self, x0, generator=None):
        """Draw t_i ~ pi(. | x0_i) for every image, without gradients: LongTensor[B]."""
        return torch.multinomial(self.probs(x0), 1, generator=generator).squeeze(1)

    # -- the sampler update around the model's optimizer step (ATS Eq. 12-14) --

    @contextlib.contextmanager
    def around_update(self, x0, t):
        """Wrap the model update. Every f_S-th global step: probe, update, probe, learn."""
        due = self.step % self.update_every == 0
        self.step += 1
        if not due:
            yield
            return
        x0 = x0.detach().float()
        x_star = x0[:1].clone()
        if self.world()[1] > 1:  # every rank sweeps the same image
            dist.broadcast(x_star, src=0)
        sweep_noise = torch.randn((self.T, *x0.shape[1:]), generator=self.noise_gen)
        reward_noise = torch.randn((x0.shape[0], self.k, *x0.shape[1:]), generator=self.noise_gen)
        S = self.S.clone()
        before = self._probe(x_star, sweep_noise, x0, S, reward_noise)
        yield                                                                # the model update
        after = self._probe(x_star, sweep_noise, x0, S, reward_noise)
        delta_sweep, D = before[0] - after[0], before[1] - after[1]          # (T,), (B, k)
        self._push_queue(delta_sweep)
        self._learn(x0, t, D.sum(1))                                         # r_i = sum_s D[i, s]

    @torch.no_grad()
    def _probe(self, x_star, sweep_noise, x0, S, reward_noise):
        """L_t(x*) for all t (split across ranks) and L_s(x0_i) for s in S: (T,), (B, k)."""
        was_training = self.model is not None and self.model.training
        if self.model is not None:
            self.model.eval()
        try:
            with torch.autocast(x0.device.type, enabled=False):
                sweep = self.sweep(x_star, sweep_noise)
                B, k = x0.shape[0], len(S)
                x = x0.repeat_interleave(k, dim=0)                          # (B*k, C, H, W)
                s = S.to(x0.device).repeat(B)                                # (B*k,)
                reward = self._chunked(x, s, reward_noise.flatten(0, 1).to(x0.device)).view(B, k)
        finally:
            if was_training:
                self.model.train()
        return sweep, reward

    @torch.no_grad()
    def sweep(self, x_star, noise):
        """L_t(x*) for t = 0..T-1 with noise[t]: (T,). Each rank computes its slice of t."""
        rank, world = self.world()
        ts = torch.arange(self.T).tensor_split(world)
        mine = ts[rank]
        local = self._chunked(x_star.expand(len(mine), *x_star.shape[1:]), mine.to(x_star.device),
                              noise[mine].to(x_star.device))
        if world == 1:
            return local.double().cpu()
        pad = max(len(p) for p in ts)
        parts = [local.new_zeros(pad) for _ in range(world)]
        dist.all_gather(parts, F.pad(local, (0, pad - len(mine))))
        return torch.cat([p[: len(i)] for p, i in zip(parts, ts)]).double().cpu()

    def _chunked(self, x, t, noise):
        return torch.cat([self.vlb_fn(xc, tc, nc).float() for xc, tc, nc in
                          zip(x.split(self.probe_batch), t.split(self.probe_batch), noise.split(self.probe_batch))])

    def _push_queue(self, delta):
        """FIFO of (delta_sweep, y = sum_t delta_t), then re-select S by F-score (ATS Eq. 14)."""
        self.queue_x = torch.cat([self.queue_x, delta[None]])[-self.queue_size:]
        self.queue_y = torch.cat([self.queue_y, delta.sum()[None]])[-self.queue_size:]
        if len(self.queue_y) >= 3:
            self.S = self.f_scores(self.queue_x, self.queue_y).topk(self.k).indices.sort().values

    def advantage(self, reward):
        """r - b: b = 0 in the paper; the batch mean with `baseline`; centred and scaled with `standardize`."""
        if not (self.baseline or self.standardize):
            return reward
        adv = reward - reward.mean()
        if self.standardize:
            adv = adv / (adv.std() + 1e-8) if len(adv) > 1 else torch.zeros_like(adv)
        return adv

    def _learn(self, x0, t, reward):
        """One REINFORCE step on the policy (ATS Eq. 13) with a separate entropy bonus."""
        adv = self.advantage(reward)
        with torch.autocast(x0.device.type, enabled=False):
            logp = self.log_probs(x0)                                        # (B, T), with grad
        logp_t = logp.gather(1, t[:, None]).squeeze(1)                       # log pi(t_i | x0_i)
        entropy = -(logp.exp() * logp).sum(1)                                # H_i, exact
        loss = -(adv.detach() * logp_t).mean() - self.entropy_coef * entropy.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        world = self.world()[1]
        if world > 1:
            for p in self.policy.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
        self.opt.step()
        self._record(x0, reward, entropy)

    @torch.no_grad()
    def _record(self, x0, reward, entropy):
        p = self.probs(x0).mean(0).cpu()                                     # batch-mean pi(t)
        self.last = {"reward": reward.mean().item(), "entropy": entropy.mean().item(), "p": p}
        if (self.step - 1) // self.update_every % self.history_every == 0:
            self.history.append(p)
            self.history_steps.append(self.step - 1)
            if len(self.history) > self.history_size:  # thin out: keep every other row
                self.history, self.history_steps = self.history[::2], self.history_steps[::2]
                self.history_every *= 2

    def summary(self):
        """Where the policy put its mass at the last update: mean t and quarter masses."""
        if not self.last:
            return {}
        p, q = self.last["p"], self.T / 4
        t = torch.arange(self.T)
        return {"mean_t": float((p * t).sum()), "S": self.S.tolist(), "reward": self.last["reward"],
                "quarters": [round(float(p[(t >= i * q) & (t < (i + 1) * q)].sum()), 3) for i in range(4)]}

    def state_dict(self):
        return {"policy": self.policy.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                "S": self.S, "queue_x": self.queue_x, "queue_y": self.queue_y,
                "noise_gen": self.noise_gen.get_state(), "history": self.history,
                "history_steps": self.history_steps, "history_every": self.history_every}

    def load_state_dict(self, state):
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.S = state["step"], state["S"]
        self.queue_x, self.queue_y = state["queue_x"], state["queue_y"]
        self.noise_gen.set_state(state["noise_gen"])
        self.history, self.history_steps = list(state["history"]), list(state["history_steps"])
        self.history_every = state["history_every"]

    @staticmethod
    def policy_net(in_ch, width=256):
        """x0 -> two raw numbers for (a, b): three conv/ReLU/max-pool layers, a 4x4 adaptive pool (so any
        image size works), an MLP (released ATS code). Starts at softplus + 1e-5 = 1, i.e. exactly uniform."""
        layers, c = [], in_ch
        for c_out in (32, 64, 128):
            layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
            c = c_out
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c * 16, width), nn.ReLU(),
                            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
        nn.init.zeros_(net[-1].weight)
        nn.init.constant_(net[-1].bias, math.log(math.expm1(1 - 1e-5)))
        return net

    @staticmethod
    def f_scores(X, y):
        """Univariate F-statistic of y on each column of X (sklearn's f_regression): [T].

        F_t = r_t^2 / (1 - r_t^2) * (n - 2), r_t the Pearson correlation; zero-variance columns score 0.
        """
        Xc, yc = X - X.mean(0), y - y.mean()
        denom = Xc.norm(dim=0) * yc.norm()
        r = torch.where(denom > 0, (Xc * yc[:, None]).sum(0) / denom.clamp(min=1e-300), torch.zeros_like(denom))
        r2 = (r**2).clamp(max=1 - 1e-12)
        return r2 / (1 - r2) * (len(y) - 2)

    @staticmethod
    def world():
        """(rank, world size); (0, 1) without a process group."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1


# ---------------------------------------------------------------------------------------------
# 4. Training step and loop
# ---------------------------------------------------------------------------------------------


def autocast_dtype(device, amp="auto"):
    """The autocast dtype: bf16 on CUDA where supported, else fp16; fp32 (None) on CPU by default."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Trainer:
    """Adam with linear warmup, grad clipping, fp32 EMA, AMP and (under torchrun) DDP.

    One `step(x0)` is DDPM Algorithm 1 with t drawn by the sampler, and the sampler's update wrapped
    around the optimizer step (ATS Sec. 4, Eq. 12-14).
    """

    def __init__(self, model, diffusion, sampler, *, lr=2e-4, warmup=5000, grad_clip=1.0,
                 ema_decay=0.9999, amp="auto", compile=False):
        self.model, self.diffusion, self.sampler, self.grad_clip = model, diffusion, sampler, grad_clip
        self.device = next(model.parameters()).device
        self.net = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if compile:
            self.net = torch.compile(self.net)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
        self.ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))
        self.amp_dtype = autocast_dtype(self.device, amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step_count = 0

    def step(self, x0, generator=None):
        """One training step on a batch in [-1, 1]; returns the batch loss (a 0-dim tensor)."""
        t = self.sampler.sample(x0, generator=generator)                      # t_i ~ pi(. | x0_i)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.diffusion.loss(self.net, x0, t, noise).mean()         # L_simple, no weights
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        with self.sampler.around_update(x0, t):                               # probe / update / probe
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            self.ema.update_parameters(self.model)
        self.step_count += 1
        return loss.detach()

    def run(self, batches, steps, on_step=None):
        """Train until `steps` total steps, drawing no more batches than it uses; calls on_step(trainer, loss)."""
        batches = iter(batches)
        while self.step_count < steps:
            x0 = next(batches)
            loss = self.step(x0.to(self.device, non_blocking=True))
            if on_step is not None:
                on_step(self, loss)

    def state_dict(self):
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": self.sampler.state_dict(), "step": self.step_count}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step_count = state["step"]


# ---------------------------------------------------------------------------------------------
# 5. Checkpoints: plain dicts, written atomically, read with weights_only=True
# ---------------------------------------------------------------------------------------------

CKPT_FORMAT, CKPT_VERSION = "ats-checkpoint", 1


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or not ours."""


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, trainer, config):
    """Write {trainer state, rng, config, format, version} to `path` via a temporary file + rename."""
    ckpt = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": dict(config), "rng": rng_state(),
            **trainer.state_dict()}
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint; raises CheckpointError with the fix if it can't."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}: check the path (train.py writes <out-dir>/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path!r} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}. Use an earlier copy or retrain.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path!r} is not an ats checkpoint: it was not written by train.py")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {ckpt.get('version')}, this code reads "
                              f"version {CKPT_VERSION}: use the matching version of ats")
    return ckpt
