"""sample.py: grids, a folder of PNGs that continues exactly and refuses what it did not write,
Ctrl-C, and --fid (against a stand-in feature network). CPU only."""

import hashlib
import json
import os

import pytest
import torch

import ats
import sample
from conftest import real_images, run


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two checkpoints at the same path's step 2 from different runs, and one from a third."""
    root = tmp_path_factory.mktemp("ckpts")
    run(root / "a", "--steps", "2")
    run(root / "b", "--steps", "2", "--seed", "1")
    return root / "a" / "ckpt.pt", root / "b" / "ckpt.pt"


def folder_digests(folder):
    return [hashlib.sha256((folder / f"{i:06d}.png").read_bytes()).hexdigest()
            for i in range(json.loads((folder / "samples.json").read_text())["sha256"].__len__())]


def draw(ckpt, *flags):
    sample.main(["--ckpt", str(ckpt), "--steps", "3", "--batch-size", "3", "--device", "cpu",
                 *flags])


def test_a_folder_continues_exactly_and_a_grid_is_written(ckpts, tmp_path):
    """Images 0-3 made in one call equal images made 2 then 4 at a time; the grid holds the
    call's images."""
    draw(ckpts[0], "--n", "4", "--out-dir", str(tmp_path / "one"), "--grid",
         str(tmp_path / "g.png"))
    draw(ckpts[0], "--n", "2", "--out-dir", str(tmp_path / "two"))
    draw(ckpts[0], "--n", "4", "--out-dir", str(tmp_path / "two"))
    assert folder_digests(tmp_path / "one") == folder_digests(tmp_path / "two")
    assert len(folder_digests(tmp_path / "one")) == 4 and (tmp_path / "g.png").stat().st_size > 0


def test_a_folder_refuses_images_it_cannot_vouch_for(ckpts, tmp_path):
    """A folder is refused when an image was changed or removed, when it holds an image this
    script did not make, or when another checkpoint (its content, whatever its path) would add
    to it; leftovers of an interrupted call are removed and made again."""
    out = tmp_path / "s"
    draw(ckpts[0], "--n", "3", "--out-dir", str(out))
    (out / "000003.png").write_bytes(b"half")                  # an interrupted call's leftover
    (out / "000004.png.tmp").write_bytes(b"half")
    draw(ckpts[0], "--n", "4", "--out-dir", str(out))
    assert len(folder_digests(out)) == 4 and not (out / "000004.png.tmp").exists()
    swapped = tmp_path / "same-path"
    swapped.mkdir()
    (swapped / "ckpt.pt").write_bytes(ckpts[0].read_bytes())
    draw(swapped / "ckpt.pt", "--n", "2", "--out-dir", str(tmp_path / "x"))
    (swapped / "ckpt.pt").write_bytes(ckpts[1].read_bytes())  # another run's, at the same path
    with pytest.raises(SystemExit, match="made otherwise"):
        draw(swapped / "ckpt.pt", "--n", "3", "--out-dir", str(tmp_path / "x"))
    (out / "mine.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit, match="did not make"):
        draw(ckpts[0], "--n", "5", "--out-dir", str(out))
    os.remove(out / "mine.jpg")
    (out / "000001.png").write_bytes(b"changed")
    with pytest.raises(SystemExit, match="not the image this script wrote"):
        draw(ckpts[0], "--n", "5", "--out-dir", str(out))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("")
    with pytest.raises(SystemExit, match="no samples.json"):
        draw(ckpts[0], "--n", "2", "--out-dir", str(tmp_path / "other"))


def test_ctrl_c_keeps_every_image_written_and_exits_130(ckpts, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second batch leaves the first batch vouched for; the same command
    then makes the rest, equal to an uninterrupted call."""
    ddim, calls = ats.ddim_sample, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ddim(*a, **k)
    monkeypatch.setattr(ats, "ddim_sample", interrupted)
    with pytest.raises(SystemExit) as e:
        draw(ckpts[0], "--n", "6", "--out-dir", str(tmp_path / "s"))
    assert e.value.code == 130 and "the same command makes the rest" in capsys.readouterr().err
    assert len(folder_digests(tmp_path / "s")) == 3
    draw(ckpts[0], "--n", "6", "--out-dir", str(tmp_path / "s"))
    draw(ckpts[0], "--n", "6", "--out-dir", str(tmp_path / "whole"))
    assert folder_digests(tmp_path / "s") == folder_digests(tmp_path / "whole")


def test_mistakes_get_one_line(ckpts, tmp_path):
    """No output named, a missing or foreign checkpoint, and impossible DDIM steps: one line."""
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(ckpts[0])])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    for ckpt, flags, match in [(tmp_path / "none.pt", [], "no checkpoint at"),
                               (tmp_path / "foreign.pt", [], "not an ats checkpoint"),
                               (ckpts[0], ["--steps", "500"], "DDIM steps must be in")]:
        with pytest.raises(SystemExit, match=match):
            sample.main(["--ckpt", str(ckpt), "--grid", str(tmp_path / "g.png"), *flags])


def test_fid_scores_the_folder_against_a_reference(ckpts, tmp_path, stand_in_fid):
    """--fid writes fid.json with FID and KID of the folder's images; a reference that is not
    there is refused before any image is made."""
    ref = real_images(tmp_path / "real", 8)
    draw(ckpts[0], "--n", "6", "--out-dir", str(tmp_path / "s"), "--fid", str(ref))
    result = json.loads((tmp_path / "s" / "fid.json").read_text())
    assert result["n"] == 6 and result["fid"] >= 0 and "kid" in result
    with pytest.raises(SystemExit, match="neither a folder nor"):
        draw(ckpts[0], "--n", "2", "--out-dir", str(tmp_path / "t"), "--fid", "nowhere")
    assert not (tmp_path / "t").exists()
