"""data.py: CIFAR-10, folders of images and synthetic shapes; resident and streamed batches. CPU
only."""

import zlib

import pytest
import torch
import torchvision
from PIL import Image

import data
import train
from conftest import TINY_CFG, run


def test_cifar10_without_data_or_network_gives_clear_error(tmp_path, monkeypatch):
    """With no local CIFAR-10 and a failing download, one message names the fixes."""
    def no_network(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(SystemExit) as e:
        train.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"),
                    "--device", "cpu", "--ch", "16", "--ch-mult", "1,2", "--num-res", "1"])
    assert "CIFAR-10" in e.value.code and "--dataset synthetic" in e.value.code
    assert not (tmp_path / "run").exists()


def test_cifar10_is_decoded_into_one_uint8_tensor(monkeypatch):
    """CIFAR-10's (N, 32, 32, 3) array becomes a (N, 3, S, S) uint8 tensor, resized if S != 32."""
    arrays = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data = arrays.numpy()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    full = data.make_dataset(train.Config())
    assert full.dtype == torch.uint8 and torch.equal(full, arrays.permute(0, 3, 1, 2))
    assert data.make_dataset(train.Config(image_size=16)).shape == (5, 3, 16, 16)


def test_folder_dataset_reads_resizes_and_names_a_corrupt_file(tmp_path):
    """--dataset folder reads images resized and cropped; a corrupt file stops training with one
    line naming it, whether the data is decoded on the device or streamed by workers."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), "red").save(tmp_path / "a.png")
    Image.new("L", (9, 30)).save(tmp_path / "sub" / "b.jpg")
    folder = data.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path), image_size=8))
    assert len(folder) == 2 and all(folder[i].shape == (3, 8, 8) for i in range(2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        data.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path / "empty"),
                                        image_size=8))
    for i in range(14):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for on_device, workers in (("yes", "0"), ("no", "0"), ("no", "1")):
        with pytest.raises(SystemExit, match=r"error: cannot read image .*broken\.png"):
            run(tmp_path / f"out{on_device}{workers}", "--dataset", "folder", "--data-dir",
                str(tmp_path), "--on-device", on_device, "--workers", workers, "--channels", "3",
                "--steps", "8")


def test_an_image_claiming_to_be_huge_is_named(tmp_path):
    """A PNG whose header claims 30000x30000 pixels (PIL's decompression-bomb guard) is an
    unreadable image like any other, named in one line."""
    Image.new("L", (8, 8)).save(tmp_path / "bomb.png")
    png = bytearray((tmp_path / "bomb.png").read_bytes())
    png[16:24] = (30000).to_bytes(4, "big") * 2                  # IHDR width and height
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # a valid header checksum
    (tmp_path / "bomb.png").write_bytes(bytes(png))
    folder = data.make_dataset(train.Config(dataset="folder", data_dir=str(tmp_path),
                                            image_size=8))
    with pytest.raises(data.UnreadableImage, match=r"cannot read image .*bomb\.png"):
        folder[0]


def test_resident_data_gives_the_dataloader_batches():
    """Batches indexed from a resident tensor equal the DataLoader's, epoch after epoch, from any
    step."""
    cfg = train.Config(**{**TINY_CFG, "workers": 0})
    images = data.synthetic_shapes(20, 8, 1, seed=0)
    dataset = [images[i] for i in range(len(images))]
    cpu = torch.device("cpu")
    for start in (0, 3):
        a = data.batches(cfg, images, data.batch_indices(20, 4, 0, 1, 0, start), cpu)
        b = data.batches(cfg, dataset, data.batch_indices(20, 4, 0, 1, 0, start), cpu)
        for _ in range(12):  # three epochs of 5 batches
            assert torch.equal(next(a), next(b))


def test_synthetic_data_is_deterministic_and_structured():
    """The same seed gives the same images, another seed others, and images are not flat noise."""
    a, b = data.synthetic_shapes(8, 16, 3, seed=0), data.synthetic_shapes(8, 16, 3, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 16, 16)
    assert torch.equal(a, data.synthetic_shapes(8, 16, 3, seed=0)) and not torch.equal(a, b)
    x = a.float()
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 0.5 * (x - x.mean()).abs().mean()


def test_a_corrupt_cifar10_archive_is_named_as_corrupt(tmp_path, monkeypatch):
    """A cifar-10-python.tar.gz whose MD5 is wrong (cut short by a failed download) is named as
    corrupt, with the fix (delete it), not reported as a download that failed."""
    def no_network(self):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b half an archive")
    with pytest.raises(SystemExit) as e:
        data.make_dataset(train.Config(data_dir=str(tmp_path)))
    assert e.value.code == (f"error: {tmp_path / 'cifar-10-python.tar.gz'} is corrupt (its MD5 is "
                            "not CIFAR-10's): delete it and run again to download it, or put a "
                            "good copy there")


