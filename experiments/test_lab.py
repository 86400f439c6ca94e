"""The lab: speed and throughput, the converge study with its sample metric, placebo and fixed
tables, the report that merges studies, the samplers it compares. Smoke-sized: no timing is
asserted. CPU only."""

import json
import math
import os
import shutil

import pytest
import torch

import ats
from conftest import entropy_gradient
from experiments import common, converge, report, speed, variants

TOY_MODEL = "ch=8,ch_mult=1,num_res=1,attn_res=,dropout=0.1,T=20,sample_steps=5"
TOY_CONVERGE = ["--device", "cpu", "--quick", "--steps", "6", "--samples", "20",
                "--nll-images", "2", "--ddim-steps", "2", "--set",
                TOY_MODEL + ",batch_size=8,update_every=2"]


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """The digits classifier, trained once for every study here (each caches it in its --out)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_fidelity")
    (train_x, train_y), held_out = converge.load_digits_split()
    path = tmp_path_factory.mktemp("net") / "feature_net.pt"
    converge.feature_net(held_out, (train_x, train_y), str(path))
    return path


def study(out, net, *extra):
    """A toy converge study into `out`, with the feature network `net` already in place."""
    if not (out / "feature_net.pt").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(net, out / "feature_net.pt")
    return converge.main([*TOY_CONVERGE, "--out", str(out), *extra])


# -------------------------------------------------------------------------------------------------
# speed
# -------------------------------------------------------------------------------------------------


def test_speed_reports_finite_numbers(tmp_path):
    """`speed --quick` at toy sizes gives finite per-step times, ratio and breakdown; the
    throughput rows and the profile run."""
    result = speed.main(["--device", "cpu", "--quick", "--batch-size", "4",
                         "--update-every", "3", "--cycles", "1", "--throughput", "--no-compile",
                         "--tp-warmup", "1", "--tp-steps", "1", "--profile",
                         str(tmp_path / "profile.txt"), "--set", TOY_MODEL + ",image_size=8"])
    for key in ("uniform_s", "ats_s", "ratio", "probe_share", "policy_ms_forward"):
        assert math.isfinite(result[key]), key
    assert len(result["throughput"]) == 4
    assert all(row["images_s"] > 0 for row in result["throughput"])
    assert "conv" in (tmp_path / "profile.txt").read_text()     # _slow_conv2d, or cProfile's conv2d


@pytest.mark.parametrize("flags", [["--tp-steps", "0"], ["--cycles", "0"], ["--tp-warmup", "-1"]])
def test_speed_refuses_settings_that_measure_nothing(flags):
    """Zero timed steps or cycles would print rows of 0.0 images/s: refused with one line."""
    with pytest.raises(SystemExit) as e:
        speed.main(["--device", "cpu", "--quick", "--throughput", *flags])
    assert e.value.code.startswith("error:") and flags[0] in e.value.code


def test_speed_without_throughput_profiles_an_ats_cycle(tmp_path):
    """On CPU without --throughput, --profile still writes torch.profiler's table: of one f_S
    cycle of the ATS trainer that speed timed."""
    speed.main(["--device", "cpu", "--quick", "--batch-size", "4", "--update-every", "2",
                "--cycles", "1", "--profile", str(tmp_path / "p.txt"), "--set",
                TOY_MODEL + ",image_size=8"])
    text = (tmp_path / "p.txt").read_text()
    assert "2 steps of one f_S cycle of ATS" in text.splitlines()[0] and "conv" in text


def test_a_profiler_that_records_nothing_falls_back_to_cprofile(tmp_path, monkeypatch, capsys):
    """When torch.profiler records no events (kineto failing to count GPUs on a machine without
    one), it is tried once more, then cProfile's table of the same steps is written; the file and
    the console say so in one line."""
    cfg = common.make_config("tiny", {**common.parse_overrides(TOY_MODEL), "image_size": 8,
                                     "batch_size": 4, "sampler": "uniform"})
    trainer, tries = common.build(cfg, torch.device("cpu")), []

    class Empty:
        def __enter__(self):
            tries.append(1)
            return self

        def __exit__(self, *_):
            return False

        def key_averages(self):
            return []
    monkeypatch.setattr(torch.profiler, "profile", lambda **_: Empty())
    speed.save_profile(trainer, common.random_batch(cfg, torch.device("cpu")),
                       str(tmp_path / "p.txt"), torch.device("cpu"), 2, "a test")
    first, *rest = (tmp_path / "p.txt").read_text().splitlines()
    assert len(tries) == 2 and "torch.profiler recorded no events, twice: cProfile" in first
    assert "tottime" in "\n".join(rest) and "conv" in "\n".join(rest)   # the step's hot spots
    assert capsys.readouterr().out.count("cProfile's table instead") == 1


@pytest.mark.parametrize("flags, match", [
    (["--preset", "foo"], "unknown --preset 'foo': choose from cifar10, tiny"),
    (["--profile", "{tmp}/nowhere/p.txt"], "nowhere does not exist or is not writable"),
    (["--profile", "{tmp}"], "it is a folder")])
def test_speed_refuses_a_bad_preset_or_profile_path_before_timing(tmp_path, monkeypatch, flags,
                                                                   match):
    """An unknown --preset (a KeyError before) and a --profile file that cannot be written are
    refused with one line, before anything is built or timed."""
    monkeypatch.setattr(speed, "build", lambda *a, **k: pytest.fail("a trainer was built"))
    with pytest.raises(SystemExit) as e:
        speed.main(["--device", "cpu", "--quick",
                    *[f.format(tmp=tmp_path) for f in flags]])
    assert e.value.code.startswith("error:") and "\n" not in e.value.code
    assert match in e.value.code, e.value.code


# -------------------------------------------------------------------------------------------------
# converge: the sample metric and the placebo
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_metric(feature_net):
    """The converge sample metric, with its feature network trained on the held-out split."""
    (train_x, train_y), held_out = converge.load_digits_split()
    net, accuracy, _ = converge.feature_net(held_out, (train_x, train_y), str(feature_net))
    return converge.SampleMetric(net, train_x, 300), train_x, accuracy


def test_the_sample_metric_tells_real_digits_from_degraded_ones(digits_metric):
    """Between real sets KID is 0 within its spread; blurred digits and digits with noise added
    score more than 5 of its stds away, on KID and on FD. The feature network, which never saw the
    diffusion model's training images, classifies them well."""
    metric, train_x, accuracy = digits_metric
    noise = metric.noise(draws=5)
    kid, kid_std = noise["kid"]
    assert accuracy > 0.85 and abs(kid) < 3 * kid_std
    gen = torch.Generator().manual_seed(0)
    real = train_x[torch.randperm(len(train_x), generator=gen)[:300]]
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (real + 0.5 * torch.randn(real.shape, generator=gen)).clamp(-1, 1)
    for degraded in (blurred, noisy):
        score = metric(degraded)
        assert score["kid"] > kid + 5 * kid_std                      # measured: 11 and 43 stds
        assert score["fd"] > noise["fd"][0] + 5 * noise["fd"][1]      # measured: 9 and 43 stds


def test_the_placebo_learns_nothing_from_a_reward_that_favours_small_t():
    """Under a reward that pays for small t, ATS's policy moves its mass there; the placebo,
    whose REINFORCE step scores fresh draws in place of the trained t, does not."""
    T, x0 = 100, torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    first_quarter = {}
    samplers = {"ats": ats.AdaptiveTimestepSampler, "placebo": variants.PlaceboSampler}
    for name, cls in samplers.items():
        torch.manual_seed(0)
        s = cls(T, vlb_fn=None, in_channels=1)
        gen = torch.Generator().manual_seed(2)
        for _ in range(40):
            t = s.sample(x0, generator=gen)
            s._learn(x0, t, reward=(t < T // 4).float())
        first_quarter[name] = s.probs(x0)[:, :T // 4].sum(1).mean().item()
    assert first_quarter["ats"] > 0.5 and first_quarter["placebo"] < 0.35


# -------------------------------------------------------------------------------------------------
# converge and report
# -------------------------------------------------------------------------------------------------


def test_converge_writes_results_resumes_and_merges(tmp_path, capsys, feature_net):
    """converge at toy sizes writes JSON, markdown, curves, policies and heatmaps with finite
    metrics and the metric's own noise, with a progress line at each evaluation; it refuses to
    overwrite a study, resumes one skipping the runs it holds, and two folders merge into one
    table with their heatmaps."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_fidelity")
    first = study(tmp_path / "s0", feature_net, "--variants", "uniform,ats-placebo")
    steps = [p["step"] for p in first["runs"][0]["curve"]]
    out = capsys.readouterr().out
    for step in steps:
        assert f"ats-placebo    seed 0: step {step}/{steps[-1]}  NLL" in out
    with pytest.raises(SystemExit, match="pass --resume"):
        study(tmp_path / "s0", feature_net, "--variants", "uniform,ats-placebo")
    resumed = study(tmp_path / "s0", feature_net, "--variants", "uniform,ats-placebo,ats-paper",
                    "--variant", "mine:entropy_coef=0", "--resume")
    assert resumed["runs"][:2] == first["runs"] and len(resumed["runs"]) == 4
    points = [p for run in resumed["runs"] for p in run["curve"]]
    assert all(math.isfinite(p[k]) for p in points for k in ("nll", "kid", "fd", "cpu_seconds"))
    assert resumed["complete"] and resumed["noise"]["n"] == 20
    text = (tmp_path / "s0" / "results.md").read_text()
    assert "Real vs real, the metric's own noise" in text and "| ats-placebo | 0 |" in text
    names = ["results.json", "results.md", "policy_ats-paper_seed0.png", "policy_mine_seed0.png",
             "policy_ats-placebo_seed0.png"]
    pytest.importorskip("matplotlib")
    names += ["curves.png", "policies.png"]
    for name in names:
        assert os.path.isfile(tmp_path / "s0" / name), name
    study(tmp_path / "s1", feature_net, "--variants", "uniform,ats-placebo", "--first-seed", "1")
    merged = report.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                         str(tmp_path / "all")])
    assert merged["summary"]["uniform"]["seeds"] == [0, 1]
    assert merged["summary"]["ats-paper"]["seeds"] == [0]
    assert os.path.isfile(tmp_path / "all" / "policy_ats-placebo_seed1.png")


def test_each_seed_reaches_uniforms_final_nll_on_its_own():
    """The per-seed reach: each seed's first evaluation at or below uniform's final mean NLL, with
    that seed's seconds over uniform's mean total; a seed that never gets there says so."""
    def run(variant, seed, nlls, seconds):
        curve = [{"step": 10 * (i + 1), "cpu_seconds": s, "nll": n, "kid": 0.0, "fd": 0.0}
                 for i, (n, s) in enumerate(zip(nlls, seconds))]
        return {"variant": variant, "seed": seed, "curve": curve}
    results = {"clock": "cpu_seconds", "evals": [10, 20, 30], "variants": ["uniform", "ats"],
               "runs": [run("uniform", 0, [5.0, 4.6, 4.4], [10, 20, 30]),
                        run("uniform", 1, [5.0, 4.6, 4.6], [10, 20, 50]),          # mean 4.5, 40 s
                        run("ats", 0, [4.8, 4.5, 4.3], [12, 24, 36]),
                        run("ats", 1, [4.9, 4.7, 4.3], [14, 28, 42]),
                        run("ats", 2, [4.9, 4.7, 4.6], [14, 28, 42])]}
    for r in results["runs"]:
        r.update(quarters=None, final_p=None)
    summary = report.summarise(results)
    assert summary["ats"]["reach_seeds"] == [
        {"seed": 0, "nll": {"step": 20, "seconds": 24, "ratio": 24 / 40}},
        {"seed": 1, "nll": {"step": 30, "seconds": 42, "ratio": 42 / 40}},
        {"seed": 2, "nll": None}]
    assert summary["ats"]["reach"]["nll"]["step"] == 30          # the mean 4.4 at step 30


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory, feature_net):
    """Two toy studies of seeds 0 and 1, and one with other evaluation steps."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_fidelity")
    root = tmp_path_factory.mktemp("studies")
    study(root / "a", feature_net, "--variants", "uniform")
    study(root / "b", feature_net, "--variants", "uniform", "--first-seed", "1")
    study(root / "evals", feature_net, "--variants", "uniform", "--first-seed", "2", "--evals", "1")
    return root


def edited(root, name, change):
    """A copy of study `name` with its results.json changed by `change`."""
    target = root / f"{name}-{change.__name__}"
    target.mkdir()
    results = json.loads((root / name / "results.json").read_text())
    change(results)
    (target / "results.json").write_text(json.dumps(results))
    return target


def other_code(results):
    results["provenance"]["code"] = "0123456789abcdef"


def other_settings(results):
    results["runs"][0]["config"]["lr"] = 0.5


def test_report_refuses_to_merge_what_does_not_belong_together(two_studies, tmp_path):
    """report refuses one folder twice, a run in two folders, other evaluation steps, other code,
    a variant run with other settings, and --out among its inputs; each with one line."""
    root = two_studies
    cases = [([root / "a", root / "a"], "is in both"),
             ([root / "a", root / "evals"], "differ in their evaluation steps"),
             ([root / "a", edited(root, "b", other_code)], "differ in their code version"),
             ([root / "a", edited(root, "b", other_settings)], "run with different settings"),
             ([root / "a", root / "b", "--out", root / "a"], "--out is one of the folders")]
    for folders, match in cases:
        out = [] if "--out" in folders else ["--out", str(tmp_path / "merged")]
        with pytest.raises(SystemExit) as e:
            report.main([*map(str, folders), *out])
        assert e.value.code.startswith("error:") and match in e.value.code, e.value.code
    assert not (tmp_path / "merged").exists()
    merged = report.main([str(root / "a"), str(root / "b"), "--out",
                         str(tmp_path / "merged")])
    assert merged["summary"]["uniform"]["seeds"] == [0, 1]


def unlisted(results):
    results["variants"] = []                                  # hand-edited: the runs are there


def planned_lsm(results):
    results["variants"] = ["uniform", "lsm"]                  # planned, never run


def no_quarters(results):
    del results["runs"][0]["quarters"]


def short_curve(results):
    results["runs"][0]["curve"] = results["runs"][0]["curve"][:1]


def no_noise(results):
    del results["noise"]


def test_report_merges_the_runs_and_is_complete_when_the_design_is(two_studies, tmp_path,
                                                                    capsys):
    """report merges what the runs are, whatever a folder's hand-editable variants list says, and
    marks the merge complete only when every variant, run or planned, has every seed."""
    root = two_studies
    merged = report.main([str(root / "a"), str(edited(root, "b", unlisted)), "--out",
                         str(tmp_path / "ab")])
    assert merged["summary"]["uniform"]["seeds"] == [0, 1] and merged["complete"]
    assert json.loads((tmp_path / "ab" / "results.json").read_text())["complete"] is True
    merged = report.main([str(root / "a"), str(edited(root, "b", planned_lsm)), "--out",
                         str(tmp_path / "planned")])
    assert not merged["complete"] and list(merged["summary"]) == ["uniform"]
    assert "incomplete: no run of lsm seed 0, lsm seed 1" in capsys.readouterr().out


def test_report_refuses_an_out_that_holds_files_or_a_results_json_not_a_studys(two_studies,
                                                                                tmp_path):
    """--out must be a new or empty folder: one that holds a results.json or any other file is
    refused. A results.json that is not a converge study's (a run without quarters, a short curve,
    no noise) is refused with one line naming the problem, not a KeyError or IndexError."""
    root = two_studies
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "results.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cases = [([root / "a", root / "b"], tmp_path / "report", "is not an empty folder"),
             ([root / "a", root / "b"], tmp_path / "other", "is not an empty folder"),
             ([root / "a", edited(root, "b", no_quarters)], tmp_path / "m",
              "run 1 lacks one of variant, seed, config, curve, quarters, final_p"),
             ([root / "a", edited(root, "b", short_curve)], tmp_path / "m",
              "run 1 (uniform seed 1) does not have its 2 evaluations"),
             ([edited(root, "a", no_noise), root / "b"], tmp_path / "m", "it is not an object")]
    for folders, out, match in cases:
        with pytest.raises(SystemExit) as e:
            report.main([*map(str, folders), "--out", str(out)])
        assert e.value.code.startswith("error:") and "\n" not in e.value.code
        assert match in e.value.code, e.value.code
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "m").exists()
    (tmp_path / "empty").mkdir()
    assert report.main([str(root / "a"), str(root / "b"), "--out",
                       str(tmp_path / "empty")])["complete"]


# The sampler options that live in the lab


def noise_rewards(sampler, n, scale=3.0):
    """n REINFORCE steps on pure-noise rewards of the given scale; the KL of each step."""
    g = torch.Generator().manual_seed(0)
    x0, kls = torch.randn(32, 1, 8, 8, generator=g), []
    for _ in range(n):
        t = sampler.sample(x0, generator=g)
        kls.append(sampler._learn(x0, t, scale * torch.randn(32, generator=g))["kl_step"])
    return kls


def test_max_kl_caps_every_policy_update():
    """With MaxKLSampler the batch-mean KL of every policy step stays within it, where the released
    settings let noise rewards swing the policy by far more."""
    torch.manual_seed(0)
    free = noise_rewards(ats.AdaptiveTimestepSampler(100, vlb_fn=None, in_channels=1), 4)
    torch.manual_seed(0)
    capped = noise_rewards(variants.MaxKLSampler(100, None, 1), 4)
    assert max(free) > 0.1 and max(capped) <= 0.01


def test_policy_warmup_ramps_the_learning_rate():
    """WarmupSampler with warmup W sets the policy's learning rate to lr (n + 1) / W at its n-th
    update, then lr."""
    s = variants.WarmupSampler(50, vlb_fn=None, in_channels=1, policy_lr=0.01)
    s.warmup = 4
    lrs = []
    for _ in range(6):
        noise_rewards(s, 1)
        lrs.append(s.opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_reward_norm_makes_the_step_independent_of_the_rewards_scale():
    """With RewardNormSampler, rewards scaled by 1e4 move the policy as the unscaled ones do
    (without it, they do not)."""
    x0, policies = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)), {}
    for norm in (False, True):
        for scale in (1e-4, 1.0):
            torch.manual_seed(0)
            cls = variants.RewardNormSampler if norm else ats.AdaptiveTimestepSampler
            s = cls(50, vlb_fn=None, in_channels=1)
            noise_rewards(s, 3, scale=scale)
            policies[norm, scale] = s.probs(x0)
    torch.testing.assert_close(policies[True, 1e-4], policies[True, 1.0], rtol=1e-3, atol=1e-6)
    assert (policies[False, 1e-4] - policies[False, 1.0]).abs().max() > 1e-3


# Is the gain adaptive? The fixed tables and the freeze


def test_fixed_tables_are_the_floors_u_and_the_same_seeds_final_policy():
    """fixed-u is p(t) proportional to 1 / (u (1 - u)); ats-frozen reads the final policy of the
    ats-paper run with the same seed, and refuses a study without one."""
    cfg = common.make_config("tiny", {"T": 10, "seed": 1})
    u = (torch.arange(10, dtype=torch.float64) + 0.5) / 10
    p = variants.fixed_u(cfg, [])
    assert torch.allclose(p / p.sum(), (1 / (u * (1 - u))) / (1 / (u * (1 - u))).sum())
    runs = [{"variant": "ats-paper", "seed": s, "final_p": [s + 1.0] * 10} for s in (0, 1)]
    assert variants.ats_final(cfg, runs).tolist() == [2.0] * 10
    with pytest.raises(SystemExit, match="needs the ats-paper run of seed 1"):
        variants.ats_final(cfg, runs[:1])


def test_freeze_stops_probing_after_k_updates_and_samples_its_last_batch_mean_policy():
    """FreezeSampler takes K updates, then keeps the batch-mean policy of the K-th update's
    images as a table: no more probes or policy steps, draws from that table, state round-trip."""
    torch.manual_seed(0)
    model = ats.UNet(in_ch=1, ch=8, ch_mult=(1,), num_res=1, attn_res=(), dropout=0.0,
                     image_size=8)
    d = ats.GaussianDiffusion(ats.make_betas("linear", 20))
    calls = []
    vlb = lambda x0, t, n: (calls.append(1), d.vlb_terms(model, x0, t, n))[1]
    s = variants.FreezeSampler(20, vlb, in_channels=1, model=model, update_every=1)
    s.freeze_after = 3
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    for step in range(6):
        with s.around_update(x0, s.sample(x0)):
            with torch.no_grad():
                for w in model.parameters():
                    w.add_(1e-3 * torch.randn_like(w))
        if step == 2:
            probes, table = len(calls), s.probs(x0).mean(0).double()
    assert s.updates == 3 and s.step == 6 and len(calls) == probes
    torch.testing.assert_close(s.table, table)
    t = s.sample(torch.zeros(20000, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.bincount(t, minlength=20).double().div(20000).sub(table).abs().max() < 0.02
    other = variants.FreezeSampler(20, vlb, in_channels=1, model=model, update_every=1)
    other.load_state_dict(s.state_dict())
    assert torch.equal(other.table, s.table)


def test_the_two_machine_table_pairs_seeds_and_averages_pixel_scores_per_run():
    """experiments.table's summary: the final NLL and its paired gap over seeds, the step each
    seed reaches uniform's final mean, the FD of the first 5,000-sample draw and the mean of each
    run's 299-sample distances, then over seeds."""
    from experiments import table

    def run(variant, seed, nlls):
        curve = [{"step": 1000 * (i + 1), "nll": v} for i, v in enumerate(nlls)]
        r = {"variant": variant, "seed": seed, "curve": curve}
        scores = {f"{variant}/{seed}/2000/0/5000": {"fd": 0.1 * (seed + 1), "nn": 9.0},
                  **{f"{variant}/{seed}/2000/{d}/299": {"fd": 1.0, "nn": 2.0 + d + seed}
                     for d in range(2)}}
        return {**r, "pix": table.pixel_scores(r, scores)}
    runs = {("uniform", 0): run("uniform", 0, [5.0, 4.0]),
            ("uniform", 1): run("uniform", 1, [5.0, 4.2]),
            ("fixed-u", 0): run("fixed-u", 0, [4.0, 3.9])}
    rows = table.summary(runs, ("uniform", "fixed-u"), 4.1).splitlines()
    assert rows[2] == ("| uniform | 4.000 / 4.200 | 4.100 ± 0.141 (2) | - | 2k / - | "
                       "0.150 ± 0.071 (2) | 3.000 ± 0.707 (2) |")
    assert rows[3] == "| fixed-u | 3.900 | 3.900 (1) | -0.100 (1) | 1k | 0.100 (1) | 2.500 (1) |"


def test_the_two_machine_table_compares_seconds_only_within_one_machine_and_code():
    from experiments import table

    def run(net, code, seconds):
        return {"seed": 0, "net": net, "code": code,
                "curve": [{"step": 1000 * (i + 1), "nll": 5.0 - i, "cpu_seconds": s}
                          for i, s in enumerate(seconds)]}
    uniform = run("n", "c", [10.0, 20.0])
    assert table.against_uniform(run("n", "c", [5.0, 10.0]), uniform, 4.5).endswith(
        "at step 2000 (interpolated 1500), after 0.50 of uniform's seed 0 training seconds "
        "(same machine)")
    for other in (run("m", "c", [5.0, 10.0]), run("n", "d", [5.0, 10.0])):
        assert table.against_uniform(other, uniform, 4.5).endswith("(interpolated 1500)")


# The released entropy term against a separate bonus


def test_a_separate_entropy_bonus_pulls_at_first_order_where_the_released_term_does_not():
    """Near uniform the separate bonus's entropy gradient shrinks ~delta, the released term's
    ~delta^3, and at a = 1.02 the released one is under 1% of the bonus's."""
    released = ats.AdaptiveTimestepSampler(200, vlb_fn=None, in_channels=1)
    bonus = variants.BonusEntropySampler(200, vlb_fn=None, in_channels=1)
    assert entropy_gradient(bonus, 0.02) / entropy_gradient(bonus, 0.04) > 0.4
    assert entropy_gradient(released, 0.02) < 0.01 * entropy_gradient(bonus, 0.02)


def test_score_rates_the_kept_weights_against_real_digits_and_keeps_its_scores(two_studies,
                                                                                capsys):
    """experiments.score rebuilds each run's EMA weights from the study, scores its samples in
    pixel space, records the real-vs-real spread, and a second call reuses what it scored."""
    from experiments import score
    scores = score.main([str(two_studies / "a"), "--samples", "30", "--draws", "2"])
    assert {"uniform/0/6/0/30", "uniform/0/6/1/30"} <= set(scores)
    assert scores["uniform/0/6/0/30"] != scores["uniform/0/6/1/30"]       # independent draws
    fd, spread = scores["real_vs_real"]["fd"]
    assert scores["real_vs_real"]["n"] == 749 and fd > 0 and spread > 0
    assert scores["heldout_vs_train"]["n"] == 299 and scores["heldout_vs_train"]["fd"] > 0
    assert 0 < scores["heldout_vs_train"]["nn"] and 0 < scores["uniform/0/6/0/30"]["nn"]
    out = capsys.readouterr().out
    assert "| uniform | 1 (1 scored) |" in out
    again = score.main([str(two_studies / "a"), "--samples", "30", "--draws", "2"])
    assert again == scores and "uniform/0/6/0/30:" not in capsys.readouterr().out


def test_a_second_study_into_a_busy_out_is_refused(tmp_path):
    """A study holds its --out with a lock, as train.py holds its out-dir: a second one writing
    there at the same time is refused with one line before it trains anything."""
    import fcntl
    (tmp_path / "s").mkdir()
    with open(tmp_path / "s" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit, match="in use by another study"):
            converge.main([*TOY_CONVERGE, "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s" / "results.json").exists()
