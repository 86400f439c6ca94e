"""train.py: config and flags, outputs and resume, FID over training, and several processes under
torchrun (test_data.py, test_safety.py and test_pictures.py test the modules it calls). CPU only."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import ats
import pictures
import safety
import sample
import train
from conftest import (
    HERE,
    TINY,
    fid_unavailable,
    free_port,
    log_records,
    real_images,
    run,
    use_stand_in_fid,
    wait_for,
)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["sampler"], b["sampler"]
    for name in sa["policy"]:
        assert torch.equal(sa["policy"][name], sb["policy"][name]), f"policy.{name} differs"
    assert torch.equal(sa["S"], sb["S"]) and torch.equal(sa["queue_x"], sb["queue_x"])
    assert sa["step"] == sb["step"] and a["step"] == b["step"]


def torchrun(out, *extra, steps="100000"):
    """train.py under torchrun with 2 gloo workers, in the background; far intervals by default."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(free_port()), os.path.join(HERE, "train.py"), *TINY, "--out-dir", str(out),
           "--steps", steps, "--log-every", steps, "--ckpt-every", steps, "--sample-every", steps,
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


# -------------------------------------------------------------------------------------------------
# Config and flags
# -------------------------------------------------------------------------------------------------


def test_preset_then_explicit_flag():
    """Defaults < preset < explicit flag, for numbers and for --flag/--no-flag booleans."""
    assert train.parse_config([]) == train.Config()
    cfg = train.parse_config(["--preset", "tiny", "--steps", "7", "--no-hflip"])
    assert cfg.steps == 7 and not cfg.hflip and cfg.ch == train.PRESETS["tiny"]["ch"]
    assert train.parse_config(["--steps", "7", "--preset", "tiny"]).steps == 7


def test_help_lists_every_setting_with_its_default(capsys):
    """--help exits 0 and lists every Config field as a flag with its default, the presets and the
    flags that may change on --resume."""
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for f in dataclasses.fields(train.Config):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        assert f"[{f.default}]" in text, f.name
    assert "presets: cifar10 = the defaults; tiny = dataset=synthetic" in text
    assert "On --resume only these may change: --amp" in text


@pytest.mark.parametrize("flags, match", [
    (["--batch-size", "0"], "--batch-size 0 must be a positive multiple"),
    (["--T", "1"], "T must be in [2, 100000]"), (["--T", "1000000000"], "T must be in [2, 100000]"),
    (["--num-selected", "60"], "num_selected (|S|) in [1, 50]"),
    (["--update-every", "0"], "update_every must be an integer of at least 1"),
    (["--lr", "nan"], "lr must be in (0, 1]"), (["--lr", "1e308"], "lr must be in (0, 1]"),
    (["--policy-lr", "-1"], "policy_lr must be in (0, 1]"),
    (["--policy-lr", "1e308"], "policy_lr must be in (0, 1]"),
    (["--seed", "99999999999999999999999"], "--seed must be in [0, 2^62)"),
    (["--sample-n", "1000000"], "--sample-n is the grid's size, at most 1024"),
    (["--heatmap-height", "100000000"], "--heatmap-height must be at most 4096"),
    (["--image-size", "-4"], "image_size must be at least 1"),
    (["--ch-mult", ""], "ch_mult needs positive multipliers"),
    (["--ch-mult", "1,x"], "--ch-mult expects comma-separated integers"),
    (["--ch-mult", "1,,2"], "--ch-mult expects comma-separated integers"),
    (["--attn-res", "7"], "attn_res (7,) names sizes no level has"),
    (["--ch", "15"], "ch must be an even number"), (["--dropout", "1.5"], "dropout must be in"),
    (["--sample-steps", "99"], "--sample-steps: DDIM steps must be in [1, T=50]"),
    (["--sampler", "lognormal", "--lognormal-std", "0"], "--lognormal-std must be positive"),
    (["--lognormal-std", "nan"], "--lognormal-std must be positive"),
    (["--snr-gamma", "0"], "--snr-gamma must be positive"),
    (["--weighting", "min-snr", "--prediction", "v"], "is written for eps-prediction"),
    (["--snr-gamma", "nan"], "--snr-gamma must be positive"),
    (["--fid-every", "2", "--fid-n", "3"], "--fid-n must be at least 4"),
    (["--fid-every", "2"], "--fid-every on --dataset synthetic needs --fid-ref"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/x"], "does not exist")])
def test_bad_flags_give_one_error_line_and_create_nothing(tmp_path, flags, match):
    """Every impossible setting exits with one 'error:' line before anything is written."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", *flags)
    assert e.value.code.startswith("error:") and match in e.value.code, e.value.code
    assert "\n" not in e.value.code and not (tmp_path / "run").exists()


def test_bad_out_dirs_give_one_error_line(tmp_path):
    """An out-dir that is a file, under a file or empty is refused with one line."""
    (tmp_path / "file").write_text("x")
    for out, match in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot be "
                                                          "created or written"), ("", "empty")):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY, "--out-dir", str(out), "--steps", "2"])
        assert e.value.code.startswith("error:") and match in e.value.code, e.value.code


@pytest.mark.parametrize("flags, match", [
    (["--ch", "1000000"], "lower --ch, --ch-mult, --num-res, --image-size or --T"),
    (["--synthetic-n", "1000000000"], "lower --synthetic-n or --image-size")])
def test_sizes_that_cannot_fit_give_one_line(tmp_path, flags, match):
    """A model or dataset too large to allocate is one line naming the flags to lower, and
    nothing is written."""
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", *flags)
    assert e.value.code.startswith("error: out of memory (it asked for ") and match in e.value.code
    assert "\n" not in e.value.code and not (tmp_path / "run").exists()


def test_an_allocation_that_fails_in_training_names_the_flag(tmp_path, monkeypatch):
    """Out of memory in a training step, a grid or the heatmap: one line, the flag to lower."""
    def no_memory(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    for target, match in (("save_grid", "lower --sample-n"),
                          ("save_heatmap", "lower --heatmap-height")):
        with monkeypatch.context() as m:
            m.setattr(train, target, no_memory)
            with pytest.raises(SystemExit) as e:
                run(tmp_path / target, "--steps", "4", "--sample-every", "4")
        assert e.value.code == f"error: out of memory (it asked for 2.00 GiB): {match}"
    with monkeypatch.context() as m:
        m.setattr(ats.GaussianDiffusion, "loss", no_memory)
        with pytest.raises(SystemExit, match="lower --batch-size, --ch or --image-size, or "
                                             "--probe-batch$"):
            run(tmp_path / "step", "--steps", "4")


def test_a_policy_that_diverges_stops_without_saving(tmp_path, monkeypatch):
    """If the ATS policy's weights become inf or NaN, the run stops with one line before any
    checkpoint holds them, and the last good checkpoint stays."""
    run(tmp_path, "--steps", "4", "--ckpt-every", "4")
    before = (tmp_path / "ckpt.pt").read_bytes()
    learn = ats.AdaptiveTimestepSampler._learn

    def poisoned(self, *args):
        next(self.policy.parameters()).data.fill_(float("nan"))
        return learn(self, *args)
    monkeypatch.setattr(ats.AdaptiveTimestepSampler, "_learn", poisoned)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--steps", "12", "--ckpt-every", "1", "--resume")
    assert re.match(r"error: at step \d+ the policy's weights became inf or NaN", e.value.code)
    assert "Resume with a lower --policy-lr" in e.value.code
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_a_signal_while_starting_is_one_line(sig):
    """Ctrl-C, SIGHUP (a closed terminal) or SIGTERM while the script still imports torch: exit
    130 and one line naming the signal, no traceback and no silent death with 129 or 143."""
    for script in ("train.py", "sample.py"):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--help"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        maps, deadline = f"/proc/{proc.pid}/maps", time.time() + 60
        while "libtorch" not in open(maps).read() and time.time() < deadline:
            time.sleep(0.005)            # until torch's libraries load: the handler is set before
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (script, proc.returncode, err)
        assert err.startswith(f"interrupted while starting ({sig.name})") and err.count("\n") == 1


def test_train_cli_error_has_no_traceback(tmp_path):
    """Run as a script, a bad flag gives exit code 1 and one line, not a traceback."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--batch-size", "0",
                             "--out-dir", str(tmp_path / "r")], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.startswith("error:")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_flags_this_run_never_reads_are_warned(tmp_path, capsys):
    """A flag given explicitly that this run does not read (--snr-gamma without min-snr, the
    lognormal flags without lognormal, ATS flags with another sampler) gets one warning line
    naming it and what uses it; flags that are read get none."""
    out = ["--out-dir", str(tmp_path)]
    train.configure(["--sampler", "uniform", "--snr-gamma", "3", "--lognormal-std", "2",
                     "--policy-lr", "0.1", "--sweep-stride", "5", *out])
    assert capsys.readouterr().err.splitlines() == [
        "warning: --snr-gamma does nothing in this run: only --weighting min-snr uses it",
        "warning: --lognormal-std does nothing in this run: only --sampler lognormal uses it",
        "warning: --policy-lr does nothing in this run: only --sampler ats uses it",
        "warning: --sweep-stride does nothing in this run: only --sampler ats uses it"]
    train.configure(["--weighting", "min-snr", "--snr-gamma", "3", "--policy-lr", "0.1", *out])
    train.configure(["--sampler", "lognormal", "--lognormal-mean", "0", *out])
    assert capsys.readouterr().err == ""


# -------------------------------------------------------------------------------------------------
# Outputs and resume
# -------------------------------------------------------------------------------------------------


def test_train_writes_its_outputs(tmp_path):
    """A short tiny run writes ckpt, grids, log, heatmap, metrics plot and config."""
    ckpt = run(tmp_path, "--steps", "4")
    assert ckpt["step"] == 4 and ckpt["config"]["ch"] == 16 and ckpt["unet"]["ch"] == 16
    for name in ("ckpt.pt", "grid_0000004.png", "log.jsonl", "sampler.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    records = log_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lr", "img_per_s", "sampler"} <= set(records[-1])
    assert "quarters" in records[-1]["sampler"]
    assert json.loads((tmp_path / "config.json").read_text()) == {**ckpt["config"], "ckpt_step": 4}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "metrics.png").is_file()


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopping at step 3 and resuming to 6 gives bit-identical weights, EMA and sampler state."""
    whole = run(tmp_path / "whole", "--steps", "6")
    run(tmp_path / "split", "--steps", "3")
    resumed = run(tmp_path / "split", "--steps", "6", "--resume")
    assert_same_state(whole, resumed)
    assert [r["step"] for r in log_records(tmp_path / "split")] == [2, 4, 6]


def test_resume_restores_the_sampler_summary(tmp_path):
    """The first log line after a resume carries the policy's summary before the next update."""
    run(tmp_path, "--steps", "4", "--update-every", "3")                 # updates at steps 1 and 4
    run(tmp_path, "--steps", "5", "--update-every", "3", "--resume", "--log-every", "1")
    last = log_records(tmp_path)[-1]
    assert last["step"] == 5 and "quarters" in last["sampler"] and "mean_t" in last["sampler"]


def test_resume_applies_or_refuses_changed_flags(tmp_path):
    """On --resume, --lr takes effect; a run-defining flag that differs is refused, naming both
    values, with nothing written."""
    run(tmp_path, "--steps", "2", "--lr", "1e-3")
    before = {n: (tmp_path / n).read_bytes() for n in ("ckpt.pt", "config.json", "log.jsonl")}
    for flags, match in [(["--T", "40"], "--T 40 differs from the stored run's T = 50"),
                         (["--schedule", "cosine"], "--schedule cosine differs"),
                         (["--sampler", "uniform"], "--sampler uniform differs"),
                         (["--steps", "2"], "already at step 2")]:
        with pytest.raises(SystemExit, match=match):
            run(tmp_path, "--steps", "4", "--resume", *flags)
        assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    run(tmp_path, "--steps", "4", "--resume", "--lr", "3e-3", "--log-every", "1")
    assert log_records(tmp_path)[-1]["lr"] == pytest.approx(3e-3)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 3e-3


def test_v_prediction_run_trains_resumes_bit_identically_and_samples(tmp_path):
    """A --prediction v run with --sweep-stride 5 trains, resumes bit-identically, refuses a
    changed --prediction or --sweep-stride on resume, and sample.py rebuilds it from its
    checkpoint alone."""
    flags = ["--prediction", "v", "--sweep-stride", "5"]
    whole = run(tmp_path / "whole", "--steps", "6", *flags)
    run(tmp_path / "split", "--steps", "3", *flags)
    for changed, match in [(["--prediction", "eps"], "--prediction eps differs"),
                           (["--sweep-stride", "1"], "--sweep-stride 1 differs")]:
        with pytest.raises(SystemExit, match=match):
            run(tmp_path / "split", "--steps", "6", "--resume", *changed)
    assert_same_state(whole, run(tmp_path / "split", "--steps", "6", "--resume"))
    assert whole["diffusion"]["prediction"] == "v" and whole["sampler"]["sweep_stride"] == 5
    assert set(whole["sampler"]["S"].tolist()) <= set(range(0, 50, 5))
    records = log_records(tmp_path / "whole")
    assert records[-1]["loss"] < records[0]["loss"]
    sample.main(["--ckpt", str(tmp_path / "whole" / "ckpt.pt"), "--n", "4", "--steps", "3",
                 "--grid", str(tmp_path / "v.png"), "--device", "cpu"])
    assert Image.open(tmp_path / "v.png").size[0] > 8


def test_config_json_holds_what_the_checkpoint_holds(tmp_path):
    """A resume that diverges before its first save leaves config.json as ckpt.pt's config."""
    run(tmp_path, "--steps", "2", "--lr", "1e-3")
    with pytest.raises(SystemExit, match="stopped without saving|diverged; not saved"):
        run(tmp_path, "--steps", "6", "--resume", "--lr", "1")
    stored = ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["config"]
    assert json.loads((tmp_path / "config.json").read_text()) == {**stored, "ckpt_step": 2}
    assert stored["lr"] == 1e-3


class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs, nothing catches it."""


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path, monkeypatch):
    """A run killed after logging step 3 (checkpoint at 2) resumes with a log of each step once."""
    step = ats.Trainer.train_step

    def dies_at_step_4(self, x0):
        if self.step == 3:
            raise Killed
        return step(self, x0)
    monkeypatch.setattr(ats.Trainer, "train_step", dies_at_step_4)
    with pytest.raises(Killed):
        run(tmp_path, "--steps", "10", "--log-every", "1")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')                                     # a line cut short, too
    assert [r["step"] for r in pictures.read_log(tmp_path / "log.jsonl")] == [1, 2, 3]
    monkeypatch.undo()
    run(tmp_path, "--steps", "5", "--log-every", "1", "--resume")
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2, 3, 4, 5]


def test_fresh_run_refuses_to_overwrite(tmp_path):
    """Starting a fresh run into an out-dir that holds ckpt.pt stops and names --resume."""
    run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit, match="--resume"):
        run(tmp_path, "--steps", "2")


def test_config_json_is_ckpt_pts_again_after_a_kill_between_the_two_writes(tmp_path,
                                                                            monkeypatch):
    """Killed after ckpt.pt is replaced and before config.json is: config.json's ckpt_step shows
    that it lags, and the next start rewrites it from ckpt.pt before its first step."""
    run(tmp_path, "--steps", "2", "--lr", "1e-3")
    write = safety.write_config

    def killed_after_ckpt_4(out_dir, config, step):
        if step == 4:
            raise Killed
        write(out_dir, config, step)

    def killed(*_):
        raise Killed
    monkeypatch.setattr(safety, "write_config", killed_after_ckpt_4)
    with pytest.raises(Killed):
        run(tmp_path, "--steps", "4", "--resume", "--lr", "3e-3")
    ckpt, config = ats.load_checkpoint(str(tmp_path / "ckpt.pt")), json.loads(
        (tmp_path / "config.json").read_text())
    assert ckpt["step"] == 4 and ckpt["config"]["lr"] == 3e-3
    assert config["ckpt_step"] == 2 and config["lr"] == 1e-3      # lags, and says so
    monkeypatch.undo()
    monkeypatch.setattr(ats.Trainer, "train_step", killed)
    with pytest.raises(Killed):                                   # the next start, killed at once
        run(tmp_path, "--steps", "6", "--resume")
    assert json.loads((tmp_path / "config.json").read_text()) == {**ckpt["config"], "ckpt_step": 4}


@pytest.mark.parametrize("log", ["folder", "not utf-8"])
def test_a_log_that_is_a_folder_or_not_utf8_is_no_traceback(tmp_path, log):
    """A log.jsonl that is a folder stops the run with one line before any step; one with bytes
    that are not UTF-8 loses those lines as if a crash had cut them, and the run resumes."""
    run(tmp_path, "--steps", "2", "--log-every", "1")
    if log == "folder":
        (tmp_path / "log.jsonl").unlink()
        (tmp_path / "log.jsonl").mkdir()
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--steps", "4", "--resume")
        assert e.value.code == (f"error: cannot read {tmp_path / 'log.jsonl'} (Is a directory): "
                                "it is not this run's log; move it away, then run again")
        return
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(b'{"step": 2, "loss": "\xff\xfe"}\n')
    run(tmp_path, "--steps", "3", "--log-every", "1", "--resume")
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2, 3]


# -------------------------------------------------------------------------------------------------
# FID over training
# -------------------------------------------------------------------------------------------------


def test_fid_over_training_is_logged_plotted_and_kept_on_resume(tmp_path, stand_in_fid):
    """--fid-every logs FID and KID of the EMA weights at its steps and at the end, draws them in
    metrics.png, and a resume keeps the earlier values."""
    ref = real_images(tmp_path / "ref", 12)
    fid_flags = ["--fid-every", "2", "--fid-n", "6", "--fid-batch", "4", "--fid-ref", str(ref)]
    run(tmp_path / "run", "--steps", "3", *fid_flags)
    records = [r for r in log_records(tmp_path / "run") if "fid" in r]
    assert [r["step"] for r in records] == [2, 3]
    assert all(r["fid"] > 0 and r["fid_n"] == 6 and "kid_std" in r for r in records)
    run(tmp_path / "run", "--steps", "4", "--resume", *fid_flags)
    fids = [r for r in log_records(tmp_path / "run") if "fid" in r]
    assert [r["step"] for r in fids] == [2, 3, 4] and fids[:2] == records
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "metrics.png").is_file()


@pytest.mark.parametrize("missing", ["torch-fidelity", "weights"])
def test_fid_that_cannot_run_stops_at_start_with_one_line(tmp_path, monkeypatch, missing):
    """Without torch-fidelity, or offline without its Inception weights, --fid-every fails before
    anything is trained or written; the line names what is missing and where the weights go."""
    ref = real_images(tmp_path / "ref", 4)
    fid_unavailable(monkeypatch, tmp_path, missing)
    monkeypatch.setattr(ats.Trainer, "train_step", lambda *a: pytest.fail("a step ran"))
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", "--steps", "2", "--fid-every", "2", "--fid-ref", str(ref))
    message = e.value.code
    assert message.startswith("error: --fid-every:") and "\n" not in message
    if missing == "torch-fidelity":
        assert "pip install torch-fidelity" in message
    else:
        weights = os.path.join(str(tmp_path / "torch-home"), "hub", "checkpoints",
                               "weights-inception-2015-12-05-6726825d.pth")
        assert "Inception weights" in message and weights in message
    assert not (tmp_path / "run").exists()


def test_a_run_without_fid_never_imports_torch_fidelity(tmp_path):
    """Training without --fid-every imports neither fid.py nor torch-fidelity."""
    argv = [*TINY, "--out-dir", str(tmp_path), "--steps", "2"]
    code = (f"import sys, train; train.main({argv!r}); print(sorted(m for m in sys.modules "
            "if m == 'fid' or m.startswith('torch_fidelity')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# -------------------------------------------------------------------------------------------------
# Several processes: gloo on CPU, in-process ranks and torchrun
# -------------------------------------------------------------------------------------------------


def _ddp_rank(rank, world, port, out_dir, extra):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), TORCH_HOME=os.path.join(out_dir, "th"))
    torch.set_num_threads(1)
    use_stand_in_fid()
    built, build = [], train.build
    train.build = lambda cfg, device: built.append(build(cfg, device)) or built[-1]
    train.main([*TINY, "--out-dir", out_dir, *extra])
    trainer = built[0]
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
                "policy": trainer.sampler.policy.state_dict(), "queue_x": trainer.sampler.queue_x,
                "S": trainer.sampler.S}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_run_stays_in_sync_resumes_and_splits_fid(tmp_path, stand_in_fid):
    """With 2 gloo processes, weights, policy, queue and S match across ranks; ckpt.pt resumes in
    1 and in 2 processes; the FID of samples split over the ranks equals sample.py's FID of the
    same images made by one process."""
    ref = real_images(tmp_path / "ref", 12)
    fid_flags = ["--fid-every", "8", "--fid-n", "7", "--fid-ref", str(ref)]
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "8", *fid_flags]),
             nprocs=2)                                                 # updates at 0, 2, 4, 6
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("model", "ema", "policy"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key}.{name} differs between ranks"
    assert len(r0["queue_x"]) == 3 and torch.equal(r0["queue_x"], r1["queue_x"])
    assert torch.equal(r0["S"], r1["S"])
    start = ats.AdaptiveTimestepSampler(50, vlb_fn=None, in_channels=3).policy.state_dict()
    assert not torch.equal(r0["policy"]["15.weight"], start["15.weight"])  # the policy did move
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 8
    logged = [r for r in log_records(tmp_path) if "fid" in r]
    assert len(logged) == 1 and logged[0]["fid_n"] == 7
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--n", "7", "--steps", "3", "--out-dir",
                 str(tmp_path / "samples"), "--fid", str(ref)])
    scored = json.loads((tmp_path / "samples" / "fid.json").read_text())
    assert scored["fid"] == pytest.approx(logged[0]["fid"], rel=1e-6)
    assert run(tmp_path, "--steps", "10", "--resume")["step"] == 10
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path), ["--steps", "12", "--resume"]),
             nprocs=2)
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 12


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_torchrun_signal_saves_within_seconds(tmp_path, sig):
    """A signal to torchrun with 2 gloo workers and no save due for 100,000 steps leaves a
    checkpoint within seconds, reported once, by rank 0."""
    proc = torchrun(tmp_path)
    try:
        wait_for(tmp_path / "log.jsonl")                               # opened before step 1
        time.sleep(3.0)
        proc.send_signal(sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    step = ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]
    assert step > 0 and output.count("interrupted at step") == 1, output
    assert f"interrupted at step {step}" in output


def test_torchrun_workers_stop_when_the_launcher_is_killed(tmp_path):
    """kill -9 of the torchrun launcher: both workers notice within seconds, rank 0 saves, and no
    worker is left training as an orphan."""
    proc = torchrun(tmp_path)
    try:
        wait_for(tmp_path / "log.jsonl")
        time.sleep(2.0)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                                  capture_output=True, text=True).stdout.split()]
        assert len(workers) == 2
        proc.kill()                                                    # SIGKILL: no forwarding
        proc.wait()
        deadline = time.time() + 60
        while any(os.path.exists(f"/proc/{w}") and not zombie(w) for w in workers):
            assert time.time() < deadline, "a worker kept training after its launcher died"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):                  # nothing may outlive it
            os.killpg(proc.pid, signal.SIGKILL)
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] > 0


def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_torchrun_run_that_finishes_exits_0(tmp_path):
    """A normal 2-process run ends with exit code 0 and its checkpoint, grid and heatmap."""
    proc = torchrun(tmp_path, steps="20")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 20
    assert (tmp_path / "grid_0000020.png").is_file() and (tmp_path / "sampler.png").is_file()


def ranks(proc):
    """{rank: pid} of the workers of a torchrun launcher."""
    pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                           text=True).stdout.split()]
    environ = {p: open(f"/proc/{p}/environ", "rb").read().split(b"\0") for p in pids}
    return {int(v[5:]): p for p, env in environ.items() for v in env if v.startswith(b"RANK=")}


def signal_rank_1(tmp_path, sig, wait_file, *flags):
    """Start a two-worker torchrun run, send `sig` to rank 1 alone once `wait_file` exists; return
    the launcher's output and the step ckpt.pt holds."""
    proc = torchrun(tmp_path, *flags)
    try:
        wait_for(tmp_path / wait_file)
        time.sleep(1.0)
        os.kill(ranks(proc)[1], sig)
        output = proc.communicate(timeout=60)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return output, ats.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"]


def test_torchrun_signal_to_one_rank_is_named_as_such(tmp_path):
    """SIGTERM to rank 1 alone: both ranks save and stop, and rank 0's one line says that another
    rank received a signal, not '(None received)'."""
    output, step = signal_rank_1(tmp_path, signal.SIGTERM, "log.jsonl")
    assert f"interrupted at step {step} (another rank received a signal)" in output, output
    assert "None received" not in output


def test_torchrun_kill_9_of_one_rank_is_one_line(tmp_path):
    """kill -9 of rank 1: rank 0 does not die in a gloo 'Connection reset by peer' traceback; it
    says in one line that a process of the run was lost and which step ckpt.pt holds."""
    output, step = signal_rank_1(tmp_path, signal.SIGKILL, "ckpt.pt", "--ckpt-every", "5")
    line = (rf"error: at step \d+ another process of this run was lost \([^)]+\)\. "
            rf"{re.escape(str(tmp_path / 'ckpt.pt'))} still holds step {step}\. Resume with "
            r"--resume once every process can start again\.\n")
    assert re.search(line, output), output
    assert "[rank0]: Traceback" not in output and "[rank0]:" not in output
