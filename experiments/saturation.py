"""Why a policy lands in the Beta floor: rerun the first steps of one converge run and print, at
every sampler update, where the policy's (a, b) stood and what moved them.

    python -m experiments.saturation --schedule cosine --seed 2 --steps 400   # from the root

This is `experiments.converge --long`'s ats-paper run (digits, f_S = 20, 10,000 steps planned), cut
after --steps: the data order, weights and noise are the converge run's, so on the machine that
made a converge run this reproduces its first updates (compare the KL column with that run's
`updates` in its results.json). Printed per update, over the update's batch of 64 digits:

- KL: the batch-mean KL(after || before) of the update, in nats;
- reward: the rewards' mean and root mean square, and whether t = T-1 is in this update's S;
- a, b: the batch medians of the Beta parameters before -> after the update;
- z_a, z_b: the batch means of their pre-activations (a = softplus(z_a) + 1e-5) after it; the
  softplus's slope there is sigmoid(z), so below about -10 that parameter can no longer move;
- |h|: the batch mean of the sum of the 256 ReLU features that the output layer reads, after it.
  A change dw in the output layer moves z by dw . h, so the larger |h|, the further one update
  moves z for the same per-weight step.
"""

import argparse
import dataclasses

import torch
import torch.nn.functional as F

import ats
from experiments import common, converge


class Watched(ats.AdaptiveTimestepSampler):
    """The released sampler, printing what each policy update did to (a, b)."""

    def _probe(self, x_star, sweep_noise, x0, S, reward_noise):
        self.rewarded = S                                              # the S of this update
        return super()._probe(x_star, sweep_noise, x0, S, reward_noise)

    def _learn(self, x0, t, reward):
        with torch.no_grad():
            ab_before = F.softplus(self.policy(x0)) + 1e-5             # (B, 2)
        out = super()._learn(x0, t, reward)
        with torch.no_grad():
            h = self.policy[:-1](x0)                                   # (B, 256), after the step
            z = self.policy[-1](h)                                     # (B, 2)
        ab = F.softplus(z) + 1e-5
        last = "T-1" if (self.rewarded == self.T - 1).any() else "   "
        print(f"{self.step - 1:5d} {out['kl_step']:7.3f}  {out['reward']:+7.3f} "
              f"{out['reward_rms']:6.3f} {last}  "
              f"{ab_before[:, 0].median():9.3g} -> {ab[:, 0].median():<9.3g} "
              f"{ab_before[:, 1].median():9.3g} -> {ab[:, 1].median():<9.3g} "
              f"{z[:, 0].mean():8.2f} {z[:, 1].mean():8.2f} {h.sum(1).mean():8.1f}", flush=True)
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schedule", default="cosine", choices=("linear", "cosine", "quad"))
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--steps", type=int, default=400, help="stop after this many training steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = common.make_config("tiny", {**converge.DIGITS, "update_every": 20,
                                     "schedule": args.schedule})
    cfg = dataclasses.replace(cfg, seed=args.seed)
    (train_x, _), _ = converge.load_digits_split()
    trainer = common.build(cfg, torch.device("cpu"), sampler_cls=Watched)
    data = converge.batches(train_x, cfg.batch_size, common.seeded(cfg.seed))
    print(f"ats-paper, {args.schedule}, seed {args.seed}, steps 0 to {args.steps - 1} of a "
          f"10,000-step run\n step      KL   reward    rms       a before -> after      "
          f"b before -> after        z_a      z_b      |h|")
    for _ in trainer.run(data, 10000):
        if trainer.step >= args.steps:
            break


if __name__ == "__main__":
    main()
