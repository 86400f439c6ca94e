"""pictures.py: the sampler heatmap with and without matplotlib. CPU only."""

import sys

import pytest
import torch
import torchvision
from PIL import Image

import pictures


def test_the_heatmap_has_axes_with_matplotlib_and_is_bare_without(tmp_path, monkeypatch):
    """sampler.png: a figure with axes and a colour scale when matplotlib is there; else the bare
    image, one column per t and --heatmap-height rows, uniform drawn as the ramp's middle."""
    uniform, peaked = torch.full((50,), 1 / 50), torch.softmax(torch.arange(50.0) / 5, 0)
    history = [uniform] * 3 + [peaked] * 3
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # import fails
    pictures.save_heatmap(history, tmp_path / "bare.png", 40, 10.0)
    bare = torchvision.transforms.functional.pil_to_tensor(Image.open(tmp_path / "bare.png"))
    assert bare.shape == (3, 40, 50)
    middle = (pictures.HEAT[1] + pictures.HEAT[2]) / 2 * 255                   # the ramp at 0.5
    assert (bare[:, 0].float().T - middle).abs().max() <= 1               # first rows: uniform
    assert bare[:, -1, -1].float().mean() > bare[:, -1, 0].float().mean()  # likelier is brighter
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    pictures.save_heatmap(history, tmp_path / "figure.png", 256, 10.0, steps=[2, 4, 6, 8, 10, 12])
    width, height = Image.open(tmp_path / "figure.png").size
    assert width > 50 and height > 256                     # the image plus axes, title and scale


