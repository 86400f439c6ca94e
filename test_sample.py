"""sample.py: grids, the folder of numbered PNGs it vouches for, and --fid. CPU only."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import ats
import sample
from conftest import HERE, real_images, run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of the toy train.py setup after 2 steps."""
    out = tmp_path_factory.mktemp("run")
    run(out, "--steps", "2")
    return str(out / "ckpt.pt")


def make(ckpt, folder, n, *extra):
    sample.main(["--ckpt", ckpt, "--steps", "3", "--n", str(n), "--batch-size", "4",
                 "--out-dir", str(folder), *extra])


def refused(argv, match):
    """sample.main(argv) exits with one 'error:' line matching `match`."""
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code.startswith("error:") and "\n" not in e.value.code, e.value.code
    assert match in e.value.code, e.value.code


# -------------------------------------------------------------------------------------------------
# Grids and arguments
# -------------------------------------------------------------------------------------------------


def test_grid_and_folder(ckpt, tmp_path):
    """One call writes a grid and a folder of 8x8 PNGs with its samples.json record."""
    grid, folder = tmp_path / "grid.png", tmp_path / "imgs"
    sample.main(["--ckpt", ckpt, "--n", "3", "--batch-size", "2", "--steps", "3",
                 "--grid", str(grid), "--out-dir", str(folder)])
    assert grid.is_file() and sorted(os.listdir(folder)) == ["000000.png", "000001.png",
                                                             "000002.png", "samples.json"]
    assert Image.open(folder / "000000.png").size == (8, 8)
    record = json.loads((folder / "samples.json").read_text())
    assert record["count"] == 3 and record["step"] == 2 and record["method"] == "ddim-3"


def test_every_output_is_checked_before_any_forward(ckpt, tmp_path, monkeypatch):
    """Bad --grid and --out-dir paths, an unknown image type and a device file as grid fail with
    one line before the model runs a single forward."""
    monkeypatch.setattr(ats.UNet, "forward", lambda *a: pytest.fail("a forward ran"))
    (tmp_path / "file").write_text("x")
    for flags, match in ((["--grid", "/nonexistent/x.png"], "does not exist"),
                         (["--grid", str(tmp_path)], "unknown image type"),
                         (["--grid", str(tmp_path / "g.xyz")], "unknown image type"),
                         (["--out-dir", str(tmp_path / "file")], "is not a writable folder"),
                         (["--out-dir", str(tmp_path / "file" / "sub")], "not a writable folder"),
                         (["--out-dir", ""], "not a writable folder"),
                         (["--grid", str(tmp_path / "g.png"), "--fid", "cifar10-train"],
                          "--fid scores the images of --out-dir")):
        refused(["--ckpt", ckpt, *flags], match)
    if os.path.exists("/dev/full"):
        os.symlink("/dev/full", tmp_path / "full.png")
        refused(["--ckpt", ckpt, "--grid", str(tmp_path / "full.png")], "not a regular file")
    refused(["--ckpt", ckpt], "--grid FILE and/or --out-dir")
    refused(["--ckpt", ckpt, "--steps", "51", "--grid", str(tmp_path / "g.png")],
            "--steps: DDIM steps must be in [1, T=50]")


@pytest.mark.parametrize("kind", ["missing", "corrupt", "foreign"])
def test_bad_checkpoint_gives_clear_error(tmp_path, kind):
    """A missing, corrupt or foreign checkpoint gives one 'error:' line naming the file."""
    path = tmp_path / "ckpt.pt"
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    refused(["--ckpt", str(path), "--grid", str(tmp_path / "g.png")], str(path))


def test_cli_error_has_no_traceback(tmp_path):
    """Run as a script, a bad --ckpt gives exit code 1 and one line, not a traceback."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--ckpt",
                             str(tmp_path / "no.pt"), "--grid", "g.png"], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and result.stderr.startswith("error:")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_help_lists_every_flag(capsys):
    """--help exits 0 and documents every flag, --fid included."""
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--ckpt", "--n", "--batch-size", "--grid", "--out-dir", "--fid", "--data-dir",
                 "--steps", "--ddpm", "--seed", "--no-ema", "--device"):
        assert flag in text, flag


# -------------------------------------------------------------------------------------------------
# The folder: extended exactly, refused when it cannot be vouched for
# -------------------------------------------------------------------------------------------------


def test_folder_extension_equals_one_shot(ckpt, tmp_path, capsys):
    """Extending a folder from 6 to 10 images gives the images of one 10-image call, bitwise; a
    different seed is refused; progress uses no carriage returns when stdout is not a terminal."""
    make(ckpt, tmp_path / "a", 6)
    make(ckpt, tmp_path / "a", 10)
    sample.main(["--ckpt", ckpt, "--steps", "3", "--n", "10", "--batch-size", "3", "--out-dir",
                 str(tmp_path / "b")])
    for i in range(10):
        a, b = (pil_to_tensor(Image.open(tmp_path / d / f"{i:06d}.png")) for d in "ab")
        assert torch.equal(a, b), i
    assert "\r" not in capsys.readouterr().out
    refused(["--ckpt", ckpt, "--steps", "3", "--n", "12", "--seed", "1", "--out-dir",
             str(tmp_path / "a")], "seed 0 (now 1)")


class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs."""


def test_an_interrupted_call_is_completed_exactly(ckpt, tmp_path, monkeypatch):
    """A call killed while writing leaves no half image: images past the recorded count and
    temporary files are made again, and the folder equals one uninterrupted call's."""
    make(ckpt, tmp_path / "whole", 8)
    save_png = sample.save_png

    def killed_at_image_5(image, path):
        if path.endswith("000005.png"):
            with open(path + ".tmp", "wb") as f:
                f.write(b"\x89PNG half")                               # what kill -9 leaves
            raise Killed
        return save_png(image, path)
    monkeypatch.setattr(sample, "save_png", killed_at_image_5)
    with pytest.raises(Killed):
        make(ckpt, tmp_path / "cut", 8)
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut" / "samples.json").read_text())["count"] == 4
    assert "000005.png" not in os.listdir(tmp_path / "cut")            # atomic: no half file
    make(ckpt, tmp_path / "cut", 8)
    assert sorted(os.listdir(tmp_path / "cut")) == sorted(os.listdir(tmp_path / "whole"))
    for i in range(8):
        a, b = (pil_to_tensor(Image.open(tmp_path / d / f"{i:06d}.png")) for d in ("whole", "cut"))
        assert torch.equal(a, b), i


def test_ctrl_c_while_sampling_says_what_was_kept(ckpt, tmp_path, monkeypatch, capsys):
    """Ctrl-C during sampling exits 130 with one line saying how many images are complete; the
    same command then completes the folder."""
    save_png = sample.save_png

    def ctrl_c_at_image_5(image, path):
        if path.endswith("000005.png"):
            raise KeyboardInterrupt
        return save_png(image, path)
    monkeypatch.setattr(sample, "save_png", ctrl_c_at_image_5)
    with pytest.raises(SystemExit) as e:
        make(ckpt, tmp_path / "cut", 8)
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == (f"interrupted: {tmp_path / 'cut'} holds 4 complete "
                                               "images; the same command makes the rest")
    monkeypatch.undo()
    make(ckpt, tmp_path / "cut", 8)
    assert json.loads((tmp_path / "cut" / "samples.json").read_text())["count"] == 8


@pytest.mark.parametrize("damage, match", [
    ("remove 000005.png", "should hold 8 images, but 000005.png is missing:"),
    ("empty 000002.png", "000002.png is not the image this script wrote"),
    ("add cat.png", "holds cat.png, which this script did not make"),
    ("remove samples.json", "holds files but no samples.json"),
    ("corrupt samples.json", "samples.json is unreadable")])
def test_a_folder_that_cannot_be_vouched_for_is_refused(ckpt, tmp_path, damage, match):
    """A missing or broken image, a foreign image, a lost or corrupt samples.json: each is refused
    with one line, and nothing in the folder changes."""
    folder = tmp_path / "imgs"
    make(ckpt, folder, 8)
    action, name = damage.split()
    if action == "remove":
        os.remove(folder / name)
    elif action == "empty":
        (folder / name).write_bytes(b"")
    elif action == "add":
        Image.new("RGB", (8, 8)).save(folder / name)
    else:
        (folder / name).write_text('{"ckpt": "x", "count": ')
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    refused(["--ckpt", ckpt, "--steps", "3", "--n", "12", "--out-dir", str(folder)], match)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before


def test_a_folder_of_other_images_is_refused(ckpt, tmp_path):
    """A folder that holds other PNGs and no samples.json gets no images mixed in."""
    real_images(tmp_path / "other", 3)
    refused(["--ckpt", ckpt, "--steps", "3", "--n", "4", "--out-dir", str(tmp_path / "other")],
            "holds files but no samples.json")
    assert len(os.listdir(tmp_path / "other")) == 3


@pytest.fixture(scope="module")
def folder8(ckpt, tmp_path_factory):
    """A folder of 8 images made by sample.py, to be copied and damaged."""
    folder = tmp_path_factory.mktemp("folder8") / "imgs"
    make(ckpt, folder, 8)
    return folder


def test_samples_json_records_the_sha256_of_every_image(folder8):
    """samples.json holds, in order, the SHA-256 of the bytes of each image written."""
    record = json.loads((folder8 / "samples.json").read_text())
    assert record["count"] == 8 and record["sha256"] == [
        hashlib.sha256((folder8 / f"{i:06d}.png").read_bytes()).hexdigest() for i in range(8)]


def damage(folder, how):
    """Change a copy of a sample.py folder the way a user, a script or a crash might."""
    image, record = folder / "000003.png", json.loads((folder / "samples.json").read_text())
    if how == "link to a copy":
        shutil.copy(image, folder.parent / "copy.png")
        image.unlink()
        image.symlink_to(folder.parent / "copy.png")
    elif how == "dangling link":
        image.unlink()
        image.symlink_to(folder.parent / "gone.png")
    elif how == "folder":
        image.unlink()
        image.mkdir()
    elif how == "cut short":
        image.write_bytes(image.read_bytes()[:40])                   # a PNG header, no image
    elif how == "swapped":
        image.write_bytes((folder / "000004.png").read_bytes())      # decodes, but not image 3
    elif how == "folder past the count":
        (folder / "000013.png").mkdir()
    else:
        record = {"count -1": {**record, "count": -1}, "count 10": {
            **record, "count": 10, "sha256": record["sha256"] + ["0" * 64] * 2},
            "no hashes": {k: v for k, v in record.items() if k != "sha256"}}[how]
        (folder / "samples.json").write_text(json.dumps(record))


def snapshot(folder):
    return {f: (os.readlink(p) if os.path.islink(p) else None if os.path.isdir(p) else
                open(p, "rb").read()) for f in os.listdir(folder) for p in [folder / f]}


@pytest.mark.parametrize("how, match", [
    ("link to a copy", "000003.png is a symbolic link, not an image this script wrote"),
    ("dangling link", "000003.png is a symbolic link, not an image this script wrote"),
    ("folder", "000003.png is a folder, not an image this script wrote"),
    ("cut short", "000003.png is not the image this script wrote (its SHA-256 differs"),
    ("swapped", "000003.png is not the image this script wrote (its SHA-256 differs"),
    ("folder past the count", "000013.png is a folder, not a file this script wrote"),
    ("count -1", "gives the count -1, which no folder holds"),
    ("count 10", "should hold 10 images, but 000008.png is missing with 1 more"),
    ("no hashes", "does not record the SHA-256 of each of its 8 images")])
def test_a_folder_whose_images_are_not_the_ones_written_is_refused(ckpt, folder8, tmp_path, how,
                                                                    match):
    """Every image is checked against its SHA-256 in samples.json when the folder is reopened: a
    link, a folder, an image cut short or swapped, a count below 0 or above the images present, or
    no hashes are each refused with one line naming the file, and nothing in the folder changes."""
    folder = tmp_path / "imgs"
    shutil.copytree(folder8, folder, symlinks=True)
    damage(folder, how)
    before = snapshot(folder)
    refused(["--ckpt", ckpt, "--steps", "3", "--n", "12", "--out-dir", str(folder)], match)
    assert snapshot(folder) == before


def test_sighup_while_sampling_is_like_ctrl_c(ckpt, tmp_path, monkeypatch, capsys):
    """SIGHUP (a closed terminal) during sampling exits 130 with the Ctrl-C line saying how many
    images are complete, leaves Python's default handler, and the same command completes the
    folder."""
    save_png = sample.save_png

    def hang_up_at_image_5(image, path):
        if path.endswith("000005.png"):
            os.kill(os.getpid(), signal.SIGHUP)
        return save_png(image, path)
    monkeypatch.setattr(sample, "save_png", hang_up_at_image_5)
    with pytest.raises(SystemExit) as e:
        make(ckpt, tmp_path / "cut", 8)
    assert e.value.code == 130 and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    assert capsys.readouterr().err.strip() == (f"interrupted: {tmp_path / 'cut'} holds 4 complete "
                                               "images; the same command makes the rest")
    monkeypatch.undo()
    make(ckpt, tmp_path / "cut", 8)
    assert json.loads((tmp_path / "cut" / "samples.json").read_text())["count"] == 8


def test_a_batch_that_does_not_fit_in_memory_is_one_line(ckpt, tmp_path, monkeypatch):
    """A failed allocation while sampling (std::bad_alloc, what building 10,000,000 per-image
    generators under a memory limit raises) is the one-line memory error naming --batch-size."""
    def bad_alloc(seed, indices):
        raise RuntimeError("std::bad_alloc")
    monkeypatch.setattr(ats, "image_generators", bad_alloc)
    refused(["--ckpt", ckpt, "--steps", "3", "--n", "100", "--batch-size", "100", "--out-dir",
             str(tmp_path / "s")], "error: out of memory: lower --batch-size")


# -------------------------------------------------------------------------------------------------
# --fid
# -------------------------------------------------------------------------------------------------


def test_fid_of_the_folder_is_printed_and_recorded(ckpt, tmp_path, stand_in_fid, capsys):
    """--fid scores every image of the folder against the reference, prints FID and KID, and
    writes fid.json beside the images; on a complete folder it scores without sampling."""
    ref = real_images(tmp_path / "ref", 12)
    make(ckpt, tmp_path / "s", 10, "--fid", str(ref))
    record = json.loads((tmp_path / "s" / "fid.json").read_text())
    assert record["n"] == 10 and record["reference"] == str(ref) and record["fid"] > 0
    assert record["samples"]["seed"] == 0 and record["samples"]["method"] == "ddim-3"
    out = capsys.readouterr().out
    assert f"FID {record['fid']:.3f}" in out and "KID" in out
    make(ckpt, tmp_path / "s", 10, "--fid", str(ref))                  # nothing to make: rescored
    assert json.loads((tmp_path / "s" / "fid.json").read_text())["fid"] == record["fid"]
    refused(["--ckpt", ckpt, "--steps", "3", "--n", "4", "--out-dir", str(tmp_path / "s"),
             "--fid", str(ref)], "holds 10 images, more than --n 4")


@pytest.mark.parametrize("reference, match", [
    ("nowhere", "neither a folder nor a dataset torch-fidelity knows"),
    ("empty", "holds 0 PNG or JPEG images")])
def test_a_bad_fid_reference_is_refused_before_sampling(ckpt, tmp_path, stand_in_fid, monkeypatch,
                                                         reference, match):
    """An FID reference that is not there is refused with one line before any image is made."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(ats.UNet, "forward", lambda *a: pytest.fail("a forward ran"))
    refused(["--ckpt", ckpt, "--n", "4", "--out-dir", str(tmp_path / "s"), "--fid",
             str(tmp_path / reference)], match)
    assert not (tmp_path / "s").exists()
