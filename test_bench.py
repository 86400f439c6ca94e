"""bench.py: speed and throughput, the converge study with its sample metric and placebo, and the
report that merges studies. Smoke-sized: no timing is asserted. CPU only."""

import json
import math
import os

import pytest
import torch

import bench

TOY_MODEL = "ch=8,ch_mult=1,num_res=1,attn_res=,dropout=0.1,T=20,sample_steps=5"
TOY_CONVERGE = ["converge", "--device", "cpu", "--quick", "--steps", "6", "--samples", "20",
                "--nll-images", "2", "--ddim-steps", "2", "--set",
                TOY_MODEL + ",batch_size=8,update_every=2"]


def converge(out, *extra):
    return bench.main([*TOY_CONVERGE, "--out", str(out), *extra])


# -------------------------------------------------------------------------------------------------
# speed
# -------------------------------------------------------------------------------------------------


def test_speed_reports_finite_numbers(tmp_path):
    """`speed --quick` at toy sizes gives finite per-step times, ratio and breakdown; the
    throughput rows and the profile run."""
    result = bench.main(["speed", "--device", "cpu", "--quick", "--batch-size", "4",
                         "--update-every", "3", "--cycles", "1", "--throughput", "--no-compile",
                         "--tp-warmup", "1", "--tp-steps", "1", "--profile",
                         str(tmp_path / "profile.txt"), "--set", TOY_MODEL + ",image_size=8"])
    for key in ("uniform_s", "ats_s", "ratio", "probe_share", "policy_ms_forward"):
        assert math.isfinite(result[key]), key
    assert len(result["throughput"]) == 4
    assert all(row["images_s"] > 0 for row in result["throughput"])
    assert "convolution" in (tmp_path / "profile.txt").read_text()


@pytest.mark.parametrize("flags", [["--tp-steps", "0"], ["--cycles", "0"], ["--tp-warmup", "-1"]])
def test_speed_refuses_settings_that_measure_nothing(flags):
    """Zero timed steps or cycles would print rows of 0.0 images/s: refused with one line."""
    with pytest.raises(SystemExit) as e:
        bench.main(["speed", "--device", "cpu", "--quick", "--throughput", *flags])
    assert e.value.code.startswith("error:") and flags[0] in e.value.code


# -------------------------------------------------------------------------------------------------
# converge: the sample metric and the placebo
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_metric(tmp_path_factory):
    """The converge sample metric, with its feature network trained on the held-out split."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_fidelity")
    (train_x, train_y), held_out = bench.load_digits_split()
    path = tmp_path_factory.mktemp("net") / "feature_net.pt"
    net, accuracy, _ = bench.feature_net(held_out, (train_x, train_y), str(path))
    return bench.SampleMetric(net, train_x, 300), train_x, accuracy


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


def test_the_sample_metric_is_torch_fidelitys(digits_metric):
    """bench's KID and FD are torch-fidelity's functions, called on the standardised features."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    metric, train_x, _ = digits_metric
    images = train_x[-300:]
    feats = metric.standardise(metric.net.features(images).detach()).double()
    ref = metric.reference.double()
    kid = kid_features_to_metric(feats, ref, kid_subsets=1, kid_subset_size=300, verbose=False)
    fd = fid_statistics_to_metric(fid_features_to_statistics(feats),
                                  fid_features_to_statistics(ref), False)
    assert metric(images) == {"kid": next(iter(kid.values())), "fd": next(iter(fd.values()))}


def test_the_placebo_learns_nothing_from_a_reward_that_favours_small_t():
    """Under a reward that pays for small t, ATS's policy moves its mass there; the placebo,
    whose REINFORCE step scores fresh draws in place of the trained t, does not."""
    T, x0 = 100, torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    first_quarter = {}
    samplers = {"ats": bench.ats.AdaptiveTimestepSampler, "placebo": bench.PlaceboSampler}
    for name, cls in samplers.items():
        torch.manual_seed(0)
        s = cls(T, vlb_fn=None, in_channels=1)
        gen = torch.Generator().manual_seed(2)
        for _ in range(150):
            t = s.sample(x0, generator=gen)
            s._learn(x0, t, reward=(t < T // 4).float())
        first_quarter[name] = s.probs(x0)[:, :T // 4].sum(1).mean().item()
    assert first_quarter["ats"] > 0.5 and first_quarter["placebo"] < 0.35


# -------------------------------------------------------------------------------------------------
# converge and report
# -------------------------------------------------------------------------------------------------


def test_converge_writes_results_resumes_and_merges(tmp_path):
    """converge at toy sizes writes JSON, markdown, curves, policies and heatmaps with finite
    metrics and the metric's own noise; it refuses to overwrite a study, resumes one skipping the
    runs it holds, and two folders merge into one table with their heatmaps."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_fidelity")
    first = converge(tmp_path / "s0", "--variants", "uniform,ats-placebo")
    with pytest.raises(SystemExit, match="pass --resume"):
        converge(tmp_path / "s0", "--variants", "uniform,ats-placebo")
    resumed = converge(tmp_path / "s0", "--variants", "uniform,ats-placebo,ats-paper,lsm",
                       "--variant", "mine:entropy_coef=0", "--resume")
    assert resumed["runs"][:2] == first["runs"] and len(resumed["runs"]) == 5
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
    converge(tmp_path / "s1", "--variants", "uniform,ats-placebo", "--first-seed", "1")
    merged = bench.main(["report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                         str(tmp_path / "all")])
    assert merged["summary"]["uniform"]["seeds"] == [0, 1]
    assert merged["summary"]["ats-paper"]["seeds"] == [0]
    assert os.path.isfile(tmp_path / "all" / "policy_ats-placebo_seed1.png")


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    """Two toy studies of seeds 0 and 1, and one with other evaluation steps."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch_fidelity")
    root = tmp_path_factory.mktemp("studies")
    converge(root / "a", "--variants", "uniform")
    converge(root / "b", "--variants", "uniform", "--first-seed", "1")
    converge(root / "evals", "--variants", "uniform", "--first-seed", "2", "--evals", "1")
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
            bench.main(["report", *map(str, folders), *out])
        assert e.value.code.startswith("error:") and match in e.value.code, e.value.code
    assert not (tmp_path / "merged").exists()
    merged = bench.main(["report", str(root / "a"), str(root / "b"), "--out",
                         str(tmp_path / "merged")])
    assert merged["summary"]["uniform"]["seeds"] == [0, 1]
