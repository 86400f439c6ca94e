"""fid.py: FID and KID through torch-fidelity's real code path, with a small stand-in feature
network registered in place of Inception (conftest.py), offline. CPU only."""


import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import ats
import sample
from conftest import fid_unavailable, real_images, run, stand_in_features


def noise_images(folder, n, seed=0):
    """n PNGs of uniform noise: a set unlike the blobs."""
    folder.mkdir(parents=True)
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    for i, img in enumerate(x):
        torchvision.utils.save_image(img, folder / f"{i:04d}.png")
    return folder


def folder_features(folder):
    """The stand-in's features of a folder, read as torch-fidelity reads it (PIL, RGB, uint8)."""
    files = sorted(folder.glob("*.png"))
    images = torch.stack([pil_to_tensor(Image.open(f).convert("RGB")) for f in files])
    return stand_in_features(images)


def frechet(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64, written here."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(sa)
    root = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root @ sb @ root).clamp(min=0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * cross).item()


def test_a_set_against_itself_has_fid_about_0(tmp_path, stand_in_fid):
    """FID of a set against itself is ~0: a millionth of its FID against a different set."""
    real = real_images(tmp_path / "real", 40)
    scorer = stand_in_fid.Scorer(str(real))
    same, other = scorer(str(real)), scorer(str(noise_images(tmp_path / "noise", 40)))
    assert other["fid"] > 0.01 and abs(same["fid"]) < 1e-6 * other["fid"]
    assert same["n"] == other["n"] == 40


def test_kid_of_two_halves_of_one_set_is_0_within_its_std(tmp_path, stand_in_fid):
    """KID between two halves of one set of real images is 0 within its std over subsets, while
    KID against noise is many stds away from 0."""
    real_images(tmp_path / "a", 100, seed=1)
    real_images(tmp_path / "b", 100, seed=2)
    scorer = stand_in_fid.Scorer(str(tmp_path / "a"))
    halves, noise = scorer(str(tmp_path / "b")), scorer(str(noise_images(tmp_path / "n", 100)))
    assert halves["kid_std"] > 0 and abs(halves["kid"]) < 3 * halves["kid_std"]
    assert noise["kid"] > 10 * noise["kid_std"]


def test_fid_equals_an_independent_frechet_computation(tmp_path, stand_in_fid):
    """The FID equals the Fréchet distance computed here from the same features, and a uint8
    tensor scores as the folder of its PNGs does."""
    real, fake = real_images(tmp_path / "real", 30, seed=1), real_images(tmp_path / "fake", 30,
                                                                          seed=2)
    for f in sorted(fake.glob("*.png"))[::3]:                          # unlike the real set
        Image.new("L", (8, 8), 128).save(f)
    scorer = stand_in_fid.Scorer(str(real))
    expected = frechet(folder_features(fake), folder_features(real))
    got = scorer(str(fake))["fid"]
    assert got == pytest.approx(expected, rel=1e-4)
    tensor = torch.stack([pil_to_tensor(Image.open(f).convert("L"))
                          for f in sorted(fake.glob("*.png"))])               # (N, 1, 8, 8)
    assert scorer(tensor)["fid"] == pytest.approx(got, rel=1e-6)


def test_too_few_images_and_bad_references_give_one_line(tmp_path, stand_in_fid):
    """Fewer than 4 images, an empty folder or an unknown name are refused with one line each."""
    real = real_images(tmp_path / "real", 8)
    with pytest.raises(stand_in_fid.FidError, match="at least 4 images, got 3"):
        stand_in_fid.Scorer(str(real))(torch.zeros(3, 1, 8, 8, dtype=torch.uint8))
    (tmp_path / "empty").mkdir()
    for ref, match in ((tmp_path / "empty", "holds 0 PNG"), ("cifar11-train", "neither a folder")):
        with pytest.raises(stand_in_fid.FidError, match=match):
            stand_in_fid.Scorer(str(ref))


def test_cifar10_reference_offline_gives_one_line(tmp_path, stand_in_fid, monkeypatch):
    """'cifar10-train' with no CIFAR-10 in data_dir and no network: one line naming the archive."""
    def offline(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(stand_in_fid.FidError) as e:
        stand_in_fid.Scorer("cifar10-train", data_dir=str(tmp_path / "data"))
    assert "cifar-10-python.tar.gz" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["torch-fidelity", "weights"])
def test_sample_fid_that_cannot_run_fails_before_sampling(tmp_path, monkeypatch, missing):
    """sample.py --fid without torch-fidelity, or offline without the Inception weights, stops with
    one line before it loads a model or makes an image."""
    fid_unavailable(monkeypatch, tmp_path, missing)
    run(tmp_path / "run", "--steps", "2")
    monkeypatch.setattr(ats, "load_checkpoint", lambda *a: pytest.fail("a checkpoint was loaded"))
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--n", "4", "--out-dir",
                     str(tmp_path / "s"), "--fid", "cifar10-train"])
    message = e.value.code
    assert message.startswith("error: --fid:") and "\n" not in message
    assert ("pip install torch-fidelity" if missing == "torch-fidelity" else
            "weights-inception-2015-12-05-6726825d.pth") in message
    assert not (tmp_path / "s").exists()
