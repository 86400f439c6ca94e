"""When does an ATS policy stop moving? For every finished 500-update run with an update record
in experiments/results, the last update whose KL(pi after || pi before) exceeded 0.1 and 0.01
nats. This is the record behind ats-freeze's K (experiments/variants.py: FreezeSampler).

    python -m experiments.settle > experiments/results/adaptive/settle.txt

settle.txt was written before the adaptive study's runs were in experiments/results; run now, it
counts them too.
"""

import glob
import json


def last_above(kls, threshold):
    """The 1-based index of the last update whose KL exceeds `threshold`, 0 if none does."""
    return max((i + 1 for i, kl in enumerate(kls) if kl > threshold), default=0)


def main():
    rows = []
    for path in sorted(glob.glob("experiments/results/**/results.json", recursive=True)):
        with open(path) as f:
            results = json.load(f)
        for run in results["runs"]:
            kls = [u["kl_step"] for u in run.get("updates") or []]
            if len(kls) == 500:
                rows.append((path, run["variant"], run["seed"], run["config"]["schedule"],
                             last_above(kls, 0.1), last_above(kls, 0.01)))
    print("study | variant | seed | schedule | last update with KL > 0.1 | > 0.01")
    for row in rows:
        print(" | ".join(map(str, row)))
    for k in (50, 100, 150):
        settled = sum(r[4] <= k for r in rows)
        print(f"K = {k}: {settled} of {len(rows)} runs never again moved by more than 0.1 nats "
              f"in one update, {sum(r[5] <= k for r in rows)} by more than 0.01")


if __name__ == "__main__":
    main()
