"""The samplers the studies compare, and their names: ATS's controls (a placebo, a separate
entropy bonus, scaled rewards, S without T-1, a random output layer), the remedies tried for its
early swings (a policy learning-rate warm-up, a KL cap per update, normalised rewards), and the
controls for whether its gain is adaptive (fixed tables, ATS frozen after its first updates).
Each is a subclass of ats.AdaptiveTimestepSampler or a function that gives a fixed table."""

import contextlib

import torch

import ats
from experiments.common import parse_overrides


class PlaceboSampler(ats.AdaptiveTimestepSampler):
    """ATS with the same probes, rewards and costs, but its REINFORCE step scores fresh draws
    t'_i ~ pi(. | x0_i) in place of the t_i the model was trained on. Its reward then says nothing
    about t', so whatever it gains over uniform comes from drift, not from learning."""

    def __init__(self, *args, seed=0, device=None, **kw):
        super().__init__(*args, seed=seed, device=device, **kw)
        self.placebo_gen = torch.Generator(device or "cpu").manual_seed(seed + 1)

    def _learn(self, x0, t, reward):
        return super()._learn(x0, self.sample(x0, generator=self.placebo_gen), reward)


class BonusEntropySampler(ats.AdaptiveTimestepSampler):
    """ATS with a separate entropy bonus, -mean(r log pi(t)) - c_ent mean(H): the objective this
    project used before it adopted the released code's. Kept to reproduce that comparison."""

    def policy_loss(self, logp, t, reward):
        entropy = -(logp.exp() * logp).sum(1)
        chosen = logp.gather(1, t[:, None]).squeeze(1)
        return -(reward * chosen).mean() - self.entropy_coef * entropy.mean()


def reward_scaled(factor):
    """ATS with every reward multiplied by `factor`: a control for the reward's scale, which sets
    how strongly the entropy term (fixed c_ent) pulls the policy back toward uniform."""
    class RewardScaledSampler(ats.AdaptiveTimestepSampler):
        def _learn(self, x0, t, reward):
            return super()._learn(x0, t, reward * factor)
    return RewardScaledSampler


class WithoutLastSampler(ats.AdaptiveTimestepSampler):
    """ATS whose S never holds t = T-1: a control for the last VLB term, which dominates the
    bound (and the rewards) under a cosine schedule clipped at beta = 0.999."""

    def f_scores(self, X, y):
        scores = super().f_scores(X, y)
        scores[-1] = -1.0 if self.probed[-1] == self.T - 1 else scores[-1]
        return scores


class RandomInitSampler(ats.AdaptiveTimestepSampler):
    """ATS whose policy's output layer starts from small random weights (std 1e-3) instead of 0:
    a control for the zero init, which blocks every hidden layer's gradient at the first update."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        with torch.no_grad():
            self.policy[-1].weight.normal_(0, 1e-3)


class WarmupSampler(ats.AdaptiveTimestepSampler):
    """ATS whose policy learning rate ramps linearly over its first `warmup` updates."""

    warmup = 10

    def _learn(self, x0, t, reward):
        for group in self.opt.param_groups:
            group["lr"] = self.policy_lr * min(1.0, (self.updates + 1) / self.warmup)
        return super()._learn(x0, t, reward)


class MaxKLSampler(ats.AdaptiveTimestepSampler):
    """ATS whose every policy step is halved (up to 10 times, else undone) until its batch-mean
    KL(new || old) is at most `max_kl` nats."""

    max_kl = 0.01

    def _learn(self, x0, t, reward):
        before = [p.detach().clone() for p in self.policy.parameters()]
        with torch.no_grad():
            logp_old = self.log_probs(x0)
        stats = super()._learn(x0, t, reward)
        kl = stats["kl_step"]
        for halving in range(11):
            if kl <= self.max_kl:
                break
            with torch.no_grad():
                for p, p0 in zip(self.policy.parameters(), before):
                    p.lerp_(p0, 0.5 if halving < 10 else 1.0)     # the 11th pass undoes the step
                logp = self.log_probs(x0)
            kl = (ats.all_reduce((logp.exp() * (logp - logp_old)).sum(1).mean())
                  / ats.rank_and_size()[1]).item()
        return {**stats, "kl_step": kl}


class RewardNormSampler(ats.AdaptiveTimestepSampler):
    """ATS whose rewards are divided by their root mean square (over ranks) at every update."""

    def _learn(self, x0, t, reward):
        rms = (ats.all_reduce(reward.pow(2).mean()) / ats.rank_and_size()[1]).sqrt()
        return super()._learn(x0, t, reward / rms if rms > 0 else reward)


class FreezeSampler(ats.AdaptiveTimestepSampler):
    """ATS for its first `freeze_after` updates, then a fixed table with no more probes: the
    batch-mean policy on the images of the update that froze it. K = 100 updates (step 2,000 at
    f_S = 20), chosen from the policy's own record before any run of this variant: the first
    multiple of 50 after which at least three quarters of the finished 500-update runs never
    again moved the policy by more than 0.01 nats in one update (9 of 12; 10 of 12 stayed under
    0.1 from there on; `python -m experiments.settle`). One K for every schedule."""

    freeze_after = 100

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.table = None

    def sample(self, x0, generator=None):
        if self.table is None:
            return super().sample(x0, generator)
        return torch.multinomial(self.table.to(x0.device), x0.shape[0], replacement=True,
                                 generator=generator)

    @contextlib.contextmanager
    def around_update(self, x0, t, losses=None):
        if self.table is not None:
            self.step += 1
            yield {}
            return
        with super().around_update(x0, t, losses) as stats:
            yield stats
        if self.updates == self.freeze_after:
            self.table = self.probs(x0.float()).mean(0).double().cpu()

    def state_dict(self):
        return {**super().state_dict(), "table": self.table}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.table = state["table"]


def fixed_u(cfg, runs):
    """p(t) proportional to 1 / (u (1 - u)), u = (t + 0.5) / T: the U that a Beta(a, b) policy
    takes at its parameters' floor, a = b = 1e-5."""
    u = (torch.arange(cfg.T, dtype=torch.float64) + 0.5) / cfg.T
    return 1 / (u * (1 - u))


def ats_final(cfg, runs):
    """The final batch-mean policy of this study's ats-paper run with the same seed."""
    run = next((r for r in runs if r["variant"] == "ats-paper" and r["seed"] == cfg.seed), None)
    if run is None or not run["final_p"]:
        raise SystemExit(f"error: ats-frozen seed {cfg.seed} needs the ats-paper run of seed "
                         f"{cfg.seed} in the same study first: list ats-paper before ats-frozen")
    return torch.tensor(run["final_p"], dtype=torch.float64)


# Named variants: train.Config overrides, plus `sampler_cls` for an ATS subclass or `table`, a
# function (config, the study's runs so far) -> a fixed table of timestep probabilities [T].
VARIANTS = {
    "uniform": {"sampler": "uniform"},
    "ats-paper": {"sampler": "ats"},
    "ats-placebo": {"sampler": "ats", "sampler_cls": PlaceboSampler},
    "min-snr": {"sampler": "uniform", "weighting": "min-snr"},
    "lognormal": {"sampler": "lognormal"},
    "p2": {"sampler": "uniform", "weighting": "p2"},
    "speed": {"sampler": "speed", "weighting": "speed"},
    "lsm": {"sampler": "loss-second-moment"},
    "ats-min-snr": {"sampler": "ats", "weighting": "min-snr"},
    "ats-bonus": {"sampler": "ats", "sampler_cls": BonusEntropySampler},
    "ats-stride10": {"sampler": "ats", "sweep_stride": 10},
    "ats-stride50": {"sampler": "ats", "sweep_stride": 50},
    "ats-stride10-f10": {"sampler": "ats", "sweep_stride": 10, "update_every": 10},
    # controls for the causes of the policy's early swings
    "ctl-warmup10": {"sampler": "ats", "sampler_cls": WarmupSampler},
    "ats-max-kl": {"sampler": "ats", "sampler_cls": MaxKLSampler},
    "ats-reward-norm": {"sampler": "ats", "sampler_cls": RewardNormSampler},
    "ctl-random-init": {"sampler": "ats", "sampler_cls": RandomInitSampler},
    "ctl-no-last": {"sampler": "ats", "sampler_cls": WithoutLastSampler},
    "ctl-reward-x1e4": {"sampler": "ats", "sampler_cls": reward_scaled(1e4)},
    "ctl-reward-x1e-4": {"sampler": "ats", "sampler_cls": reward_scaled(1e-4)},
    # is the gain adaptive? fixed tables, and ATS frozen after its first updates
    "fixed-u": {"sampler": "uniform", "table": fixed_u},
    "ats-frozen": {"sampler": "uniform", "table": ats_final},
    "ats-freeze": {"sampler": "ats", "sampler_cls": FreezeSampler},
}
DEFAULT_VARIANTS = "uniform,ats-paper,ats-placebo,lognormal"
ALL_VARIANTS = "uniform,ats-paper,ats-placebo,min-snr,lognormal,p2,speed,lsm,ats-min-snr"
STUDY_VARIANTS = "uniform,ats-paper,ats-placebo,lsm,lognormal,speed"


def parse_variants(names, extra):
    """The variants to run: named ones ('all' for ALL_VARIANTS), plus `name:key=value,...`, an ATS
    variant, or one built on a named variant with `name:base=ats-placebo,key=value,...`."""
    names = ALL_VARIANTS if names == "all" else names
    chosen = {}
    for name in filter(None, names.split(",")):        # '' with --variant: only those
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}: choose from {sorted(VARIANTS)} "
                             "or define one with --variant")
        chosen[name] = dict(VARIANTS[name])
    for spec in extra:
        name, _, text = spec.partition(":")
        over = parse_overrides(text)
        base = over.pop("base", "ats-paper")
        if base not in VARIANTS:
            raise SystemExit(f"error: --variant {name}: unknown base {base!r}: choose from "
                             f"{sorted(VARIANTS)}")
        chosen[name] = {**VARIANTS[base], **over}
    return chosen

