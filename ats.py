"""Adaptive Timestep Sampling (ATS) for DDPM training, in one file.

Kim, Ki, Shim, Lee, "Adaptive Non-uniform Timestep Sampling for Accelerating Diffusion Model
Training", CVPR 2025, arXiv:2411.09998 ("ATS Eq. N" below). DDPM is Ho, Jain, Abbeel,
arXiv:2006.11239 ("DDPM Eq. N"). The file reads top to bottom in the paper's order, the bound
and then the method (the block another codebase copies), then what trains a DDPM with them:

    1. the DDPM bound      GaussianDiffusion: any betas, eps/v/x0, its loss and VLB terms
    2. the ATS sampler     AdaptiveTimestepSampler and the few collectives it needs
    3. the sampler API     what every timestep sampler offers the training loop; UniformSampler
    4. schedules, sampling make_betas, the NLL bound, DDPM and DDIM sampling
    5. U-Net               the DDPM architecture, any size and channel count
    6. training            Trainer: Adam + warmup, clipping, EMA, AMP, DDP
    7. checkpoints         save_checkpoint, load_checkpoint, load_model

The baselines ATS is compared with (Min-SNR, P2, log-normal, SpeeD, loss-second-moment) live in
baselines.py. Code timestep t runs 0..T-1 and is paper step t+1. Nothing runs at import.
"""

import contextlib
import copy
import math
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# >>> ATS: copy from here. --------------------------------------------------------------------
# The block to copy into another codebase: the VLB of any DDPM, one term per timestep (section 1),
# and the adaptive sampler (section 2). It needs only these imports:
#     import contextlib, math, warnings
#     import torch
#     import torch.distributed as dist
#     import torch.nn as nn
#     import torch.nn.functional as F
# -------------------------------------------------------------------------------------------------
# 1. The DDPM bound, one term per timestep (DDPM Eq. 5), for any betas and prediction type
# -------------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of data in [-1, 1] under a Gaussian discretised to 256 bins (DDPM Sec. 3.3)."""
    inv_std = torch.exp(-log_scale)
    plus = inv_std * (x - mean + 1 / 255)                       # upper bin edge, standardised
    minus = inv_std * (x - mean - 1 / 255)                      # lower bin edge, standardised
    log_cdf_plus = torch.special.log_ndtr(plus)                 # first bin: mass of (-inf, edge]
    log_one_minus_cdf_min = torch.special.log_ndtr(-minus)      # last bin: mass of [edge, inf)
    mid = (torch.special.ndtr(plus) - torch.special.ndtr(minus)).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, mid))


def mean_flat(x):
    """Mean over every dimension but the batch: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


class GaussianDiffusion(nn.Module):
    """A DDPM's forward process, training loss and VLB terms, for any betas in (0, 1).

    The coefficients are computed in float64 from the betas, kept as float32 buffers.
    `prediction`, the model's output at (x_t, t): 'eps', 'v' = sqrt(abar) eps - sqrt(1 - abar) x0
    (arXiv:2202.00512) or 'x0'; the VLB sees the model only through x0_hat, so the three forms of
    one model share it. `var_type`, the reverse variance the model samples with: 'large' = beta_t
    (diffusers' fixed_large) or 'small' = the posterior's beta-tilde_t (diffusers' fixed_small,
    lucidrains'); both take beta-tilde_1 at t = 0, where L_0 needs a finite variance. Keyword
    arguments of the methods (y=labels, say) go to the model.
    """

    def __init__(self, betas, *, prediction="eps", var_type="large"):
        super().__init__()
        if prediction not in ("eps", "v", "x0") or var_type not in ("large", "small"):
            raise ValueError(f"prediction must be 'eps', 'v' or 'x0' and var_type 'large' or "
                             f"'small', got {prediction!r} and {var_type!r}")
        betas = torch.as_tensor(betas).detach().to("cpu", torch.float64)
        if betas.dim() != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be one value in (0, 1) per timestep, at least two")
        self.T, self.prediction = len(betas), prediction
        self.config = dict(betas=betas, prediction=prediction, var_type=var_type)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)                                  # abar_t
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        var_post = betas * (1 - abar_prev) / (1 - abar)                  # DDPM Eq. 7, beta-tilde
        logvar_post = torch.log(torch.cat([var_post[1:2], var_post[1:]]))  # clipped at t = 0
        large = torch.log(torch.cat([var_post[1:2], betas[1:]]))
        for name, value in {
            "abar": abar, "sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
            "post_c1": betas * abar_prev.sqrt() / (1 - abar),            # DDPM Eq. 7, x0 coef
            "post_c2": alphas.sqrt() * (1 - abar_prev) / (1 - abar),     # DDPM Eq. 7, x_t coef
            "logvar_post": logvar_post,
            "model_logvar": large if var_type == "large" else logvar_post,
        }.items():
            self.register_buffer(name, value.float(), persistent=False)
        if not (all(b.isfinite().all() for b in self.buffers()) and self.sqrt_abar.min() > 0):
            raise ValueError("these betas make abar_t round to 1 or vanish in float32, which "
                             "leaves no usable VLB")

    @classmethod
    def from_diffusers(cls, scheduler):
        """A diffusers DDPMScheduler's (or DDIMScheduler's) betas, prediction and variance."""
        kind, var = scheduler.config["prediction_type"], scheduler.config.get("variance_type")
        kinds, variances = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}, {
            None: "small", "fixed_small": "small", "fixed_small_log": "small",
            "fixed_large": "large", "fixed_large_log": "large"}
        if kind not in kinds or var not in variances:
            raise ValueError(f"prediction_type {kind!r} with variance_type {var!r}: no fixed-"
                             "variance VLB here (a learned variance needs its own vlb_fn)")
        return cls(scheduler.betas, prediction=kinds[kind], var_type=variances[var])

    @staticmethod
    def _at(buf, t, x):
        """buf[t] shaped to broadcast against x: [B] -> [B, 1, 1, 1]."""
        return buf[t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM Eq. 4)."""
        return self._at(self.sqrt_abar, t, x0) * x0 + self._at(self.sqrt_1m_abar, t, x0) * noise

    def target(self, x0, t, noise):
        """What the model learns to output: eps, v or x0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return self._at(self.sqrt_abar, t, x0) * noise - self._at(self.sqrt_1m_abar, t, x0) * x0
        return x0

    def loss(self, model, x0, t, noise=None, generator=None, **model_kwargs):
        """L_simple per sample, the MSE against the target (DDPM Eq. 14): [B]."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        out = model(self.q_sample(x0, t, noise), t, **model_kwargs)
        return mean_flat((self.target(x0, t, noise) - out) ** 2)

    def predict_x0(self, model, xt, t, **model_kwargs):
        """x0_hat from the model's output, by the exact identities of its prediction type."""
        out = model(xt, t, **model_kwargs).float()
        a, s = self._at(self.sqrt_abar, t, xt), self._at(self.sqrt_1m_abar, t, xt)
        if self.prediction == "eps":
            return (xt - s * out) / a
        if self.prediction == "v":
            return a * xt - s * out
        return out

    def p_mean(self, model, xt, t, clip=False, **model_kwargs):
        """Mean of p_theta(x_{t-1} | x_t) (DDPM Eq. 7 with x0_hat for x0), and x0_hat."""
        x0_hat = self.predict_x0(model, xt, t, **model_kwargs)
        if clip:
            x0_hat = x0_hat.clamp(-1, 1)
        mean = self._at(self.post_c1, t, xt) * x0_hat + self._at(self.post_c2, t, xt) * xt
        return mean, x0_hat

    def vlb_terms(self, model, x0, t, noise, **model_kwargs):
        """L_t per sample in bits/dim, x_t drawn with `noise` (DDPM Eq. 5): [B]. For t >= 1,
        KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)); for t = 0, -log p_theta(x0 | x_1)."""
        xt = self.q_sample(x0, t, noise)
        mean_post = self._at(self.post_c1, t, x0) * x0 + self._at(self.post_c2, t, x0) * xt
        mean, _ = self.p_mean(model, xt, t, **model_kwargs)
        logvar = self._at(self.model_logvar, t, x0)
        kl = mean_flat(normal_kl(mean_post, self._at(self.logvar_post, t, x0), mean, logvar))
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar))
        return torch.where(t == 0, nll, kl) / math.log(2)


# -------------------------------------------------------------------------------------------------
# 2. The adaptive sampler (ATS Sec. 4)
# -------------------------------------------------------------------------------------------------


class AdaptiveTimestepSampler:
    """The ATS policy pi_phi(t | x0), trained online with REINFORCE (ATS Sec. 4, Eq. 11-14).

    `sample(x0)` draws t_i ~ pi(. | x0_i). On every f_S-th optimizer step `around_update` wraps
    the model's update:
      1. probe: L_t(x*) of one image x* at the swept t = 0, k, 2k, ... (k = sweep_stride; 1 sweeps
         all T) and L_s(x0_i) of every image at each s in S: fixed noise, dropout off, fp32;
      2. the model's optimizer step (the with-block);
      3. the same probe again: delta = before - after, for the sweep and the B x |S| rewards D;
      4. queue the sweep's delta with y = sum_t delta_t, the last Q (queue_size) kept;
      5. S = the |S| swept timesteps whose delta_t best predicts y over the queue (Eq. 14);
      6. reward r_i = sum_{s in S} D_is (Eq. 12);
      7. a REINFORCE step on the policy, the entropy inside the reward (Eq. 13).
    Defaults are the released CIFAR-10 settings.

    vlb_fn(x0, t, noise) -> float [n] on x0's device: each row's L_t in bits/dim, with x_t drawn
    from `noise`, deterministic (no fresh noise, no dropout). It runs under no_grad, autocast off,
    `model` (if given) in eval mode, on at most probe_batch rows. With `cond` (a tensor or a dict
    of tensors, batch first) given to around_update, vlb_fn(x0, t, noise, cond) gets the rows of
    it that line up with its x0. A model that enters autocast in its own forward (accelerate's
    `prepare`) must be unwrapped inside vlb_fn.
    """

    def __init__(self, T, vlb_fn, in_channels=3, *, model=None, update_every=40, num_selected=3,
                 queue_size=20, policy_lr=1e-2, entropy_coef=1e-2, policy_grad_clip=1.0,
                 probe_batch=256, sweep_stride=1, seed=0, device=None):
        counts = dict(T=T, update_every=update_every, queue_size=queue_size,
                      probe_batch=probe_batch, sweep_stride=sweep_stride)
        for name, value in counts.items():
            low = {"T": 2, "queue_size": 3}.get(name, 1)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
        self.probed = torch.arange(0, T, sweep_stride)                 # t = 0, k, 2k, ...
        if not (sweep_stride < T and 1 <= num_selected <= len(self.probed)):
            raise ValueError(f"sweep_stride must be below T={T} and num_selected (|S|) in [1, "
                             f"{len(self.probed)}]; got {sweep_stride} and {num_selected}")
        if not (0 < policy_lr <= 1 and 0 < policy_grad_clip < math.inf
                and 0 <= entropy_coef < math.inf):
            raise ValueError(f"policy_lr must be in (0, 1], policy_grad_clip > 0, entropy_coef "
                             f">= 0; got {policy_lr}, {policy_grad_clip}, {entropy_coef}")
        self.T, self.vlb_fn, self.model, self.num_selected = T, vlb_fn, model, num_selected
        self.update_every, self.queue_size, self.probe_batch = update_every, queue_size, probe_batch
        self.sweep_stride, self.policy_lr, self.entropy_coef = sweep_stride, policy_lr, entropy_coef
        self.policy_grad_clip = policy_grad_clip
        self.policy = self.policy_net(in_channels).to(device)
        for p in self.policy.parameters():  # every rank starts from rank 0's policy;
            broadcast(p.data)               # all-reduced gradients keep it so
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=policy_lr)
        u = (torch.arange(T, dtype=torch.float64) + 0.5) / T           # bin centres u_t
        self.log_u, self.log_1mu = u.log().float().to(device), (-u).log1p().float().to(device)
        self.noise_gen = torch.Generator().manual_seed(seed)           # the probes' noise
        self.step = self.updates = 0                                   # optimizer steps, updates
        self.S = self.probed[:num_selected].clone()                    # selected timesteps
        self.queue_x = torch.zeros(0, len(self.probed), dtype=torch.float64)  # sweep deltas
        self.queue_y = torch.zeros(0, dtype=torch.float64)             # their sums

    @staticmethod
    def policy_net(in_ch, width=256):
        """x0 -> two raw numbers for (a, b): three conv/ReLU/max-pool layers, a 4x4 adaptive pool
        (so any image size works), an MLP. Starts at softplus + 1e-5 = 1: exactly uniform."""
        layers, c = [], in_ch
        for c_out in (32, 64, 128):
            layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c = c_out
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                            nn.Linear(c * 16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                            nn.Linear(width, 2))
        nn.init.zeros_(net[-1].weight)
        nn.init.constant_(net[-1].bias, math.log(math.expm1(1 - 1e-5)))
        return net

    def log_probs(self, x0):
        """log pi(t | x0) for every t: [B, T] (ATS Eq. 11, discretised)."""
        a, b = (F.softplus(self.policy(x0)) + 1e-5).unbind(1)             # (B,), (B,): a, b > 0
        return self.log_probs_from_ab(a, b)

    def log_probs_from_ab(self, a, b):
        """Beta(a, b)'s log-density at the bin centres u_t, exactly normalised over t by
        log_softmax (the Beta's normaliser cancels): [B, T], finite for any (a, b)."""
        logits = (a - 1)[:, None] * self.log_u + (b - 1)[:, None] * self.log_1mu  # (B, T)
        return F.log_softmax(logits, dim=1)

    @torch.no_grad()
    def probs(self, x0):
        """pi(t | x0): [B, T], in fp32 whatever the autocast."""
        with torch.autocast(x0.device.type, enabled=False):
            return self.log_probs(x0.float()).exp()

    def sample(self, x0, generator=None):
        """t_i ~ pi(. | x0_i) for every image, without gradients: LongTensor[B]."""
        return torch.multinomial(self.probs(x0), 1, generator=generator).squeeze(1)

    def weights(self, t):
        """No importance weights: the paper folds the VLB weight into the sampler (Sec. 4)."""
        return torch.ones(t.shape, device=t.device)

    @contextlib.contextmanager
    def around_update(self, x0, t, losses=None, cond=None):
        """Wrap one optimizer step; on every f_S-th, steps 1-7 above. The yielded dict then gets
        the batch-mean pi 'p' (T,), 'S', the rewards' mean and RMS, the mean 'entropy', and the
        batch-mean KL of pi from uniform ('kl_uniform') and from pi before ('kl_step')."""
        due, stats = self.step % self.update_every == 0, {}
        self.step += 1
        if not due:
            yield stats
            return
        x0 = x0.detach().float()
        x_star = broadcast(x0[:1].clone())                             # one image, rank 0's
        cond_star = rows(cond, lambda c: broadcast(c[:1].clone()))
        sweep_noise = torch.randn((len(self.probed), *x0.shape[1:]), generator=self.noise_gen)
        reward_noise = torch.randn((len(x0), self.num_selected, *x0.shape[1:]),
                                   generator=self.noise_gen)
        S = self.S.clone()                                             # the S of this update
        probe = lambda: self._probe(x_star, cond_star, sweep_noise, x0, cond, S, reward_noise)
        sweep_before, rewards_before = probe()
        yield stats                                                    # the model's update
        sweep_after, rewards_after = probe()
        delta = sweep_before - sweep_after                             # (T/k,)
        D = rewards_before - rewards_after                             # (B, |S|)
        if not all_ranks_finite(delta, D):
            warnings.warn("ATS: vlb_fn gave inf or NaN, so a sampler update was skipped and the "
                          "policy stays as it was: check vlb_fn and the model's loss", stacklevel=3)
        elif delta.any():  # else the step changed nothing (a warm-up from lr 0): skip it
            self._push_queue(delta)
            stats.update(self._learn(x0, t, D.sum(1)), S=S.tolist())   # r_i = sum_s D_is

    @torch.no_grad()
    def _probe(self, x_star, cond_star, sweep_noise, x0, cond, S, reward_noise):
        """L_t(x*) at the swept t and L_s(x0_i) for s in S: (T/k,), (B, |S|)."""
        no_dropout = evaluating(self.model) if self.model is not None else contextlib.nullcontext()
        with no_dropout, torch.autocast(x0.device.type, enabled=False):
            sweep = self.sweep(x_star, sweep_noise, cond_star)
            k = len(S)
            rewards = self._chunked(x0.repeat_interleave(k, 0), S.to(x0.device).repeat(len(x0)),
                                    reward_noise.flatten(0, 1).to(x0.device),
                                    rows(cond, lambda c: c.repeat_interleave(k, 0)))
        return sweep, rewards.view(len(x0), k)

    @torch.no_grad()
    def sweep(self, x_star, noise, cond=None):
        """L_t(x*) at the swept t, noise[i] for the i-th: (T/k,). Each rank computes a slice."""
        rank, size = rank_and_size()
        mine = torch.arange(len(self.probed)).tensor_split(size)[rank]
        device, n = x_star.device, len(mine)
        full = torch.zeros(len(self.probed), device=device)
        full[mine.to(device)] = self._chunked(
            x_star.expand(n, *x_star.shape[1:]), self.probed[mine].to(device),
            noise[mine].to(device), rows(cond, lambda c: c.expand(n, *c.shape[1:])))
        return all_reduce(full).double().cpu()

    def _chunked(self, x, t, noise, cond=None):
        """vlb_fn on chunks of at most probe_batch rows, each result checked: [n]."""
        out, n = [], self.probe_batch
        for i in range(0, len(x), n):
            args = [x[i:i + n], t[i:i + n], noise[i:i + n]]
            if cond is not None:
                args.append(rows(cond, lambda c, i=i: c[i:i + n]))
            v = self.vlb_fn(*args)
            if not (torch.is_tensor(v) and v.is_floating_point() and v.device == x.device
                    and v.shape == args[1].shape):
                got = f"{v.dtype} {list(v.shape)} on {v.device}" if torch.is_tensor(v) else type(v)
                raise ValueError(f"vlb_fn must return a float tensor of shape [{len(args[1])}] on "
                                 f"{x.device}, each row's L_t in bits/dim; it returned {got}")
            out.append(v.float())
        return torch.cat(out)

    def _push_queue(self, delta):
        """FIFO of (delta, y = sum_t delta_t), then S re-selected by F-score (ATS Eq. 14)."""
        self.queue_x = torch.cat([self.queue_x, delta[None]])[-self.queue_size:]
        self.queue_y = torch.cat([self.queue_y, delta.sum()[None]])[-self.queue_size:]
        if len(self.queue_y) >= 3:
            scores = self.f_scores(self.queue_x, self.queue_y)
            self.S = self.probed[scores.topk(self.num_selected).indices].sort().values

    @staticmethod
    def f_scores(X, y):
        """Univariate F-statistic of y on each column of X (sklearn's f_regression): [T].
        F_t = r_t^2 / (1 - r_t^2) (n - 2), r_t the Pearson correlation; a constant column: 0."""
        Xc, yc = X - X.mean(0), y - y.mean()
        denom = Xc.norm(dim=0) * yc.norm()
        r = torch.where(denom > 0, (Xc * yc[:, None]).sum(0) / denom.clamp(min=1e-300),
                        torch.zeros_like(denom))
        r2 = (r**2).clamp(max=1 - 1e-12)
        return r2 / (1 - r2) * (len(y) - 2)

    def _learn(self, x0, t, reward):
        """One REINFORCE step on the policy (ATS Eq. 13); returns where the policy stood and, by
        one more forward, how far the step moved it."""
        size = rank_and_size()[1]
        with torch.autocast(x0.device.type, enabled=False):
            logp = self.log_probs(x0)                                  # (B, T), with grad
            loss = self.policy_loss(logp, t, reward.detach())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in self.policy.parameters():                         # the mean over ranks
                p.grad = all_reduce(p.grad) / size
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.policy_grad_clip)
            self.opt.step()
            self.updates += 1
            with torch.no_grad():
                logp, logp_new = logp.detach(), self.log_probs(x0)
        p, weights = logp.exp(), sum(w.detach().sum() for w in self.policy.parameters())
        kl = (logp_new.exp() * (logp_new - logp)).sum(1).mean()
        numbers = torch.stack([reward.mean(), reward.pow(2).mean(), -(p * logp).sum(1).mean(),
                               kl])
        mean_reward, mean_square, entropy, kl = (all_reduce(numbers) / size).tolist()
        if not weights.isfinite():  # any inf or NaN weight makes the sum so
            raise FloatingPointError("the policy's weights became inf or NaN (policy_lr too high?)")
        return {"p": p.mean(0).cpu(), "reward": mean_reward, "reward_rms": math.sqrt(mean_square),
                "entropy": entropy, "kl_uniform": math.log(self.T) - entropy, "kl_step": kl}

    def policy_loss(self, logp, t, reward):
        """-mean_i[ log(T pi(t_i)) (r_i + c_ent (H_i - log T)) ] (ATS Eq. 13, discretised).

        log(T pi(t)) and H - log T = -KL(pi || uniform) are the discrete counterparts of the
        continuous Beta's log-density and differential entropy: both are 0 at uniform. The entropy
        is deliberately not detached; near uniform it then acts only at third order, so the
        reward, not the entropy, moves the policy.
        """
        log_ratio = logp + math.log(self.T)                  # log(T pi(t)): (B, T), 0 at uniform
        neg_kl = -(logp.exp() * log_ratio).sum(1)            # H_i - log T: (B,), not detached
        chosen = log_ratio.gather(1, t[:, None]).squeeze(1)  # log(T pi(t_i)): (B,)
        return -(chosen * (reward + self.entropy_coef * neg_kl)).mean()

    def state_dict(self):
        return {"T": self.T, "sweep_stride": self.sweep_stride, "policy": self.policy.state_dict(),
                "opt": self.opt.state_dict(), "step": self.step, "updates": self.updates,
                "S": self.S, "queue_x": self.queue_x, "queue_y": self.queue_y,
                "noise_gen": self.noise_gen.get_state()}

    def load_state_dict(self, state):
        """Restore a state_dict, checked before anything changes; every tensor is copied, and
        the policy_lr given now wins over the saved one."""
        mine, shapes = self.state_dict(), lambda sd: {k: v.shape for k, v in sd.items()}
        missing = sorted(set(mine) - set(state))
        fits = not missing and (state["T"], state["sweep_stride"]) == (self.T, self.sweep_stride)
        fits = fits and shapes(state["policy"]) == shapes(mine["policy"])
        fits = fits and len(state["S"]) == self.num_selected and all(torch.isin(state["S"],
                                                                                self.probed))
        fits = fits and state["queue_x"].shape[1:] == self.queue_x.shape[1:]
        if not (fits and len(state["queue_x"]) == len(state["queue_y"]) <= self.queue_size):
            raise ValueError(f"this sampler state does not fit a sampler with T={self.T}, "
                             f"sweep_stride={self.sweep_stride}, num_selected={self.num_selected} "
                             f"and queue_size={self.queue_size}"
                             + (f": it lacks {missing}" if missing else ""))
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:
            group["lr"] = self.policy_lr
        for moments in self.opt.state.values():  # Adam may keep the given tensors themselves
            for key, value in moments.items():
                moments[key] = value.clone() if torch.is_tensor(value) else value
        self.step, self.updates, self.S = state["step"], state["updates"], state["S"].clone()
        self.queue_x, self.queue_y = state["queue_x"].clone(), state["queue_y"].clone()
        self.noise_gen.set_state(state["noise_gen"])


def rank_and_size():
    """(this process's rank, the number of processes); (0, 1) without a process group. The
    sampler's collectives below do nothing without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(x):
    """x as rank 0 has it, in place on every rank."""
    if rank_and_size()[1] > 1:
        dist.broadcast(x, src=0)
    return x


def all_reduce(x):
    """The sum of x over all ranks, in place on every rank."""
    if rank_and_size()[1] > 1:
        dist.all_reduce(x)
    return x


def all_ranks_finite(*tensors):
    """Whether every value of the tensors is finite on every rank (one sync)."""
    return all_reduce(sum((~x.isfinite()).sum() for x in tensors).float()).item() == 0


def rows(cond, pick):
    """pick(c) for conditioning c, a tensor or each tensor of a dict; None stays None."""
    if cond is None:
        return None
    return {k: pick(v) for k, v in cond.items()} if isinstance(cond, dict) else pick(cond)


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
# <<< ATS: copy to here. ----------------------------------------------------------------------


# -------------------------------------------------------------------------------------------------
# 3. Timestep samplers. All have the same API, so the training loop never asks which it holds:
#      t = sampler.sample(x0)                          # LongTensor[B]
#      loss = (sampler.weights(t) * losses).mean()     # importance weights: ones unless stated
#      with sampler.around_update(x0, t, losses):      # wraps optimizer.step() and the EMA update
#          optimizer.step()
# -------------------------------------------------------------------------------------------------


class TimestepSampler:
    """The API with its defaults: no importance weights, nothing around the update, no state."""

    def __init__(self, T: int):
        self.T = T

    def weights(self, t):
        return torch.ones(t.shape, device=t.device)

    @contextlib.contextmanager
    def around_update(self, x0, t, losses=None):
        yield {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class UniformSampler(TimestepSampler):
    """t ~ U{0, ..., T-1}: the standard DDPM choice."""

    def probs(self):
        return torch.full((self.T,), 1 / self.T, dtype=torch.float64)

    def sample(self, x0, generator=None):
        return torch.randint(0, self.T, (x0.shape[0],), generator=generator, device=x0.device)


# -------------------------------------------------------------------------------------------------
# 4. Schedules, sampling and the NLL bound
# -------------------------------------------------------------------------------------------------


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """beta_1..beta_T in float64: 'linear' (DDPM), 'quad' (released ATS CIFAR-10) or 'cosine'."""
    if not 2 <= T <= 100_000:  # DDPM uses 1000; ATS sweeps all T at every sampler update
        raise ValueError(f"T must be in [2, 100000], got {T}")
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    if schedule == "quad":
        return torch.linspace(1e-4**0.5, 0.02**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":  # Nichol & Dhariwal 2021, Eq. 17, s = 0.008
        s, steps = 0.008, torch.arange(T + 1, dtype=torch.float64)
        f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}: use 'linear', 'quad' or 'cosine'")


def randn(shape, generator=None, device=None):
    """N(0, I) noise of `shape`. `generator` may be a list of one generator per image (row), so
    that an image's noise does not depend on the batch it is drawn in."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generator]).to(device)
    return torch.randn(shape, generator=generator).to(device)


def image_generators(seed, indices):
    """One generator per image index, so that image i's noise depends only on (seed, i)."""
    return [torch.Generator().manual_seed(hash((seed, i))) for i in indices]


def prior_bpd(diffusion, x0):
    """KL(q(x_T | x0) || N(0, I)) per sample, in bits/dim: [B]. Near 0 for a good schedule."""
    t = torch.full((x0.shape[0],), diffusion.T - 1, device=x0.device, dtype=torch.long)
    mean = diffusion._at(diffusion.sqrt_abar, t, x0) * x0
    logvar = diffusion._at(diffusion.abar, t, x0).neg().log1p()
    zero = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, logvar, zero, zero)) / math.log(2)


@torch.no_grad()
def nll_bpd(diffusion, model, x0, batch_size=256, generator=None):
    """The NLL bound sum_t L_t + prior per image, in bits/dim: [B]. B*T forwards, in chunks."""
    B, T = x0.shape[0], diffusion.T
    img = torch.arange(B, device=x0.device).repeat_interleave(T)          # (B*T,)
    ts = torch.arange(T, device=x0.device).repeat(B)                      # (B*T,)
    total = prior_bpd(diffusion, x0)
    for i, t in zip(img.split(batch_size), ts.split(batch_size)):
        noise = torch.randn((len(i), *x0.shape[1:]), generator=generator).to(x0.device)
        total = total.index_add(0, i, diffusion.vlb_terms(model, x0[i], t, noise))
    return total


@torch.no_grad()
def ddpm_sample(diffusion, model, shape, generator=None, progress=None):
    """Ancestral sampling over all T steps (DDPM Algorithm 2), in [-1, 1].
    `generator` as in randn."""
    device = diffusion.abar.device
    x = randn(shape, generator, device)
    for i in reversed(range(diffusion.T)):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        mean, _ = diffusion.p_mean(model, x, t, clip=True)
        z = randn(shape, generator, device) if i > 0 else torch.zeros_like(x)
        x = mean + (0.5 * diffusion._at(diffusion.model_logvar, t, x)).exp() * z
        if progress is not None:
            progress(diffusion.T - i, diffusion.T)
    return x.clamp(-1, 1)


def ddim_timesteps(T, steps):
    """The `steps` evenly spaced timesteps DDIM visits, as a list; checks that steps fits T."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, T={T}], got {steps}")
    return torch.linspace(0, T - 1, steps).round().long().tolist()


@torch.no_grad()
def ddim_sample(diffusion, model, shape, steps=50, eta=0.0, generator=None, progress=None):
    """DDIM sampling (Song et al. 2021, Eq. 12) on `steps` timesteps, in [-1, 1]."""
    abar, device = diffusion.abar, diffusion.abar.device
    seq = ddim_timesteps(diffusion.T, steps)
    x = randn(shape, generator, device)
    for n, (i, j) in enumerate(zip(reversed(seq), [*reversed(seq[:-1]), -1]), start=1):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        a, a_prev = abar[i], (abar[j] if j >= 0 else abar.new_tensor(1.0))
        _, x0_hat = diffusion.p_mean(model, x, t, clip=True)
        eps = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and j >= 0:
            x = x + sigma * randn(shape, generator, device)
        if progress is not None:
            progress(n, steps)
    return x.clamp(-1, 1)


# -------------------------------------------------------------------------------------------------
# 5. U-Net (the DDPM architecture: Ho et al. 2020, Appendix B)
# -------------------------------------------------------------------------------------------------


def timestep_embedding(t, dim):
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps autocast's dtype and the input's memory layout.

    Autocast runs group_norm in fp32 and, on CUDA, returns a contiguous tensor, so under bf16
    every norm would cast up, transpose a channels_last input, and the next conv would cast and
    transpose back. Here the statistics are computed in fp32, and the output has the input's dtype
    and layout. With autocast off this is exactly F.group_norm.
    """

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        g = x.float().unflatten(1, (self.num_groups, -1))          # (B, G, C/G, H, W), x's layout
        var, mean = torch.var_mean(g, dim=(2, 3, 4), correction=0, keepdim=True)
        h = ((g - mean) * torch.rsqrt(var + self.eps)).flatten(1, 2)  # (B, C, H, W), fp32
        return (h * self.weight[:, None, None] + self.bias[:, None, None]).to(x.dtype)


def norm(c):
    return GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, t_dim, dropout):
        super().__init__()
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2 = norm(c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)   # (B, HW, 3C)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)               # (B, 1, HW, C): 4-D, fused
        h = F.scaled_dot_product_attention(q, k, v)               # (B, 1, HW, C)
        return x + self.proj(h.squeeze(1).transpose(1, 2).unflatten(2, (H, W)))


class Block(nn.Module):
    """A residual block, followed by self-attention at the resolutions that have it."""

    def __init__(self, c_in, c_out, t_dim, dropout, attn):
        super().__init__()
        self.res = ResBlock(c_in, c_out, t_dim, dropout)
        self.attn = Attention(c_out) if attn else nn.Identity()

    def forward(self, h, emb):
        return self.attn(self.res(h, emb))


class Level(nn.Module):
    """One resolution of the U-Net: its blocks, then a change of resolution (None at the end)."""

    def __init__(self, blocks, resample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class UNet(nn.Module):
    """eps_theta(x_t, t). Works for any channel count and any size divisible by 2^(levels-1).

    `attn_res` lists the feature-map sizes (in pixels, for an input of `image_size`) that get
    self-attention; DDPM's CIFAR-10 model uses (16,) at image_size 32. `self.config` holds the
    constructor's arguments, so a checkpoint can rebuild the model with UNet(**config).
    """

    def __init__(self, *, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res=2, attn_res=(16,),
                 dropout=0.1, image_size=32):
        super().__init__()
        sizes = [image_size // 2**i for i in range(len(ch_mult))]  # feature-map size per level
        if min(in_ch, num_res, image_size) < 1:
            raise ValueError("in_ch, num_res and image_size must be at least 1")
        if ch < 4 or ch % 2:
            raise ValueError(f"ch must be an even number of at least 4, got {ch}")
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult needs positive multipliers such as 1,2,2, got {ch_mult}")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size {image_size} must be divisible by 2^{len(ch_mult) - 1} "
                             f"for {len(ch_mult)} levels")
        if set(attn_res) - set(sizes):
            raise ValueError(f"attn_res {tuple(attn_res)} names sizes no level has: "
                             f"they are {sizes}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = dict(in_ch=in_ch, ch=ch, ch_mult=tuple(ch_mult), num_res=num_res,
                           attn_res=tuple(attn_res), dropout=dropout, image_size=image_size)
        t_dim = 4 * ch
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        # down: num_res blocks per level, then a stride-2 conv; every output is kept as a skip
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, (mult, res) in enumerate(zip(ch_mult, sizes)):
            blocks = []
            for _ in range(num_res):
                blocks.append(Block(c, ch * mult, t_dim, dropout, attn=res in attn_res))
                c = ch * mult
                skips.append(c)
            last = i == len(ch_mult) - 1
            downsample = None if last else nn.Conv2d(c, c, 3, stride=2, padding=1)
            self.down.append(Level(blocks, downsample))
            if not last:
                skips.append(c)
        # middle: residual, attention, residual, at the lowest resolution
        self.mid_res1 = ResBlock(c, c, t_dim, dropout)
        self.mid_attn = Attention(c)
        self.mid_res2 = ResBlock(c, c, t_dim, dropout)
        # up: num_res + 1 blocks per level, each on the concatenation with a skip, then upsampling
        self.up = nn.ModuleList()
        for i, (mult, res) in reversed(list(enumerate(zip(ch_mult, sizes)))):
            blocks = []
            for _ in range(num_res + 1):
                c_in = c + skips.pop()
                blocks.append(Block(c_in, ch * mult, t_dim, dropout, attn=res in attn_res))
                c = ch * mult
            upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                     nn.Conv2d(c, c, 3, padding=1))
            self.up.append(Level(blocks, upsample if i > 0 else None))
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x, t):
        emb = self.time_mlp(timestep_embedding(t, self.ch))        # (B, 4ch)
        h = self.conv_in(x)                                        # (B, ch, H, W)
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)                              # (B, c, H/2, W/2)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.resample is not None:
                h = level.resample(h)                              # (B, c, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))            # (B, in_ch, H, W)


# -------------------------------------------------------------------------------------------------
# 6. Training: the step (DDPM Algorithm 1 with t from the sampler) and the loop
# -------------------------------------------------------------------------------------------------


def pick_device(name="auto", local_rank=0):
    """'auto', 'cuda' or 'cpu' -> torch.device; 'auto' takes the GPU when there is one."""
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {name!r}: use 'auto', 'cuda' or 'cpu'")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA GPU is visible: use cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(device, amp="auto"):
    """The autocast dtype: bf16 on CUDA where supported, else fp16; None (off) on CPU by default."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"unknown amp {amp!r}: use 'auto', 'bf16', 'fp16' or 'none'")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device, amp="auto"):
    """The autocast context for `amp` ('auto', 'bf16', 'fp16' or 'none') on `device`."""
    dtype = autocast_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class Trainer:
    """Adam with linear warmup, grad clipping, fp32 EMA, AMP and (under torchrun) DDP.

    `train_step(x0)` is DDPM Algorithm 1 with t drawn by the sampler and the sampler's update
    wrapped around the optimizer step (ATS Sec. 4, Eq. 12-14); `run` loops it. On CUDA the fast
    path is on by default: channels_last, cuDNN autotuning and fused Adam. `loss_weights` ([T] or
    None) multiplies the per-sample L_simple (Min-SNR, P2, ...); ATS itself uses none.
    """

    def __init__(self, model, diffusion, sampler, *, lr=2e-4, warmup=5000, grad_clip=1.0,
                 ema_decay=0.9999, amp="auto", compile=False, loss_weights=None, seed=0,
                 channels_last=None):
        if not (0 < lr <= 1 and math.isfinite(grad_clip) and grad_clip > 0):
            raise ValueError(f"lr must be in (0, 1] and grad_clip finite and positive, got {lr}, "
                             f"{grad_clip}")
        if warmup < 0 or not 0 <= ema_decay <= 1:
            raise ValueError(f"warmup must be >= 0 and ema_decay in [0, 1], "
                             f"got {warmup}, {ema_decay}")
        self.model, self.diffusion, self.sampler = model, diffusion, sampler
        self.lr, self.warmup, self.grad_clip, self.ema_decay = lr, warmup, grad_clip, ema_decay
        self.amp = amp
        self.device = next(model.parameters()).device
        self.amp_dtype = autocast_dtype(self.device, amp)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True                      # fixed shapes: autotune
        use_cl = cuda if channels_last is None else channels_last
        self.layout = torch.channels_last if use_cl else torch.contiguous_format
        model.to(memory_format=self.layout)
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()   # updated in place only
        self.net = model
        rank, size = rank_and_size()
        if size > 1:
            ids = [self.device.index] if cuda else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if compile:
            self.net = torch.compile(self.net)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, fused=cuda)  # fused: one kernel
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.warmup_factor)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.loss_weights = None if loss_weights is None else loss_weights.to(self.device)
        self.generator = torch.Generator(self.device).manual_seed(seed + rank)  # t and noise
        self.step = 0
        self.sampler_stats = {}                              # the sampler's last update, if any

    def warmup_factor(self, step):
        return min(1.0, (step + 1) / max(1, self.warmup))

    def train_step(self, x0):
        """One step on a batch in [-1, 1]; returns the unweighted batch-mean L_simple (0-dim)."""
        x0 = x0.contiguous(memory_format=self.layout)
        t = self.sampler.sample(x0, generator=self.generator)            # t_i ~ pi(.|x0_i), Eq. 11
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        with autocast(self.device, self.amp):
            losses = self.diffusion.loss(self.net, x0, t, noise)         # L_simple: (B,)
        weights = self.sampler.weights(t)                                # ones for ATS, uniform
        if self.loss_weights is not None:
            weights = weights * self.loss_weights[t]
        loss = (weights * losses).mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        with self.sampler.around_update(x0, t, losses.detach()) as stats:  # ATS: probe, update,
            self.scaler.step(self.opt)                                     # probe, learn
            self.scaler.update()
            self.sched.step()
            self.update_ema()
        self.sampler_stats = stats
        self.step += 1
        return losses.detach().mean()

    @torch.no_grad()
    def update_ema(self):
        """ema <- decay ema + (1 - decay) model; a plain copy at the first step. No host sync."""
        ema, params = list(self.ema.parameters()), list(self.model.parameters())
        if self.step == 0:
            torch._foreach_copy_(ema, params)
        else:
            torch._foreach_lerp_(ema, params, 1 - self.ema_decay)

    def run(self, batches, steps):
        """Train until `steps` total steps, one batch each, drawing no batch it does not use.

        Yields each step's loss, so the caller logs, evaluates and saves between steps.
        """
        batches = iter(batches)
        while self.step < steps:
            yield self.train_step(next(batches).to(self.device, non_blocking=True))

    def state_dict(self):
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "sampler": self.sampler.state_dict(),
                "generator": self.generator.get_state(), "step": self.step}

    def load_state_dict(self, state):
        """Restore a saved state; the learning rate stays the one this trainer was built with."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.sched.base_lrs = [self.lr] * len(self.opt.param_groups)
        for group in self.opt.param_groups:
            group["initial_lr"] = self.lr
            group["lr"] = self.lr * self.warmup_factor(self.sched.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.step = state["step"]


# -------------------------------------------------------------------------------------------------
# 7. Checkpoints: plain dicts, written atomically, read with weights_only=True
# -------------------------------------------------------------------------------------------------

CKPT_FORMAT, CKPT_VERSION = "ats-checkpoint", 3


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or not ours."""


def rng_state():
    """The global RNG state (dropout draws from it), CPU and CUDA."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, trainer, config, extra=None):
    """Write the trainer's state, the model's arguments, the run config and `extra` atomically:
    to a temporary file, then renamed. A failed write removes the temporary file and re-raises.

    'unet' and 'diffusion' hold the constructors' arguments: UNet(**ckpt['unet']) rebuilds it.
    """
    ckpt = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "unet": trainer.model.config,
            "diffusion": trainer.diffusion.config, "config": dict(config), "extra": extra or {},
            "rng": rng_state(), **trainer.state_dict()}
    tmp = f"{path}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by save_checkpoint; raises CheckpointError with the fix if not."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}: check the path "
                              "(train.py writes <out-dir>/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path!r} is not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}. Use an earlier copy or retrain.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path!r} is not an ats checkpoint: it was not written by train.py")
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint version {ckpt.get('version')}, this code "
                              f"reads version {CKPT_VERSION}: use the version of ats that wrote "
                              "it, or retrain")
    return ckpt


def load_model(ckpt, device, ema=True):
    """(eps_theta in eval mode, diffusion), rebuilt from a loaded checkpoint alone; the EMA
    weights unless ema=False."""
    model = UNet(**ckpt["unet"])
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return model.to(device).eval(), GaussianDiffusion(**ckpt["diffusion"]).to(device)
