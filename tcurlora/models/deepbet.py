"""deepbet brain-extraction LinkNet3d as an eager ``nn.Module``, with pinned weights.

deepbet 1.0.2 (MIT, Fisch et al., Comput. Biol. Med. 2024) ships two TorchScript LinkNet3d
nets in its wheel: ``data/models/model.pt`` (the brain-mask net, input 256^3) and
``data/models/bbox_model.pt`` (same architecture, other weights: a coarse localiser run at
128^3 to find the brain's bounding box). We rebuild the architecture in eager PyTorch with
the exact parameter names, convert each TorchScript file's weights once to ``.safetensors``
in the cache (the wheel's and the member's sha256 are pinned; the conversion reads the archive
with a restricted unpickler, so it neither needs ``torch.jit`` -- deprecated in recent torch --
nor runs any code), and from then on load only the safetensors file.

``LinkNet3d.forward`` returns **logits** (the scripted graph ends in ``softmax(dim=1)``, which
we leave out so losses can use logits); ``LinkNet3d.probabilities`` gives deepbet's exact
output, channel 1 = brain.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_write
from ..fetch import FetchError, PathLike, PinnedArchive, cache_dir, extract_member, sha256_file

__all__ = [
    "DEEPBET_PIN", "DEEPBET_MEMBERS", "DEEPBET_PREPROCESSING", "DEEPBET_ENGINE_PREPROCESSING",
    "DEEPBET_CREDIT",
    "LinkNet3d", "load_deepbet", "deepbet_weights_path", "deepbet_roi",
    "deepbet_normalize", "read_torchscript_weights",
]

DEEPBET_PIN = PinnedArchive(
    "deepbet", "1.0.2", "deepbet-1.0.2-py3-none-any.whl",
    "1999e2ea00ec48f6233b95b96f3901a962d3f70431c63aeb985e8a49a198473c", "MIT", size=10252582)

# variant -> (wheel member, sha256 of that member), checked again before the one-time conversion.
DEEPBET_MEMBERS: Dict[str, Tuple[str, str]] = {
    "model": ("data/models/model.pt",
              "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd"),
    "bbox": ("data/models/bbox_model.pt",
             "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa"),
}

DEEPBET_CREDIT = ("deepbet 1.0.2 brain-extraction LinkNet3d weights (L. Fisch et al., 'deepbet: "
                  "Fast brain extraction of T1-weighted MRI using Convolutional Neural Networks', "
                  "Computers in Biology and Medicine 2024; MIT licence).")

# What deepbet 1.0.2 (deepbet/bet.py, deepbet/utils.py) does around the net, step by step.
# Axis order is the RAS-reoriented array's (I, J, K); no step resamples to a fixed spacing.
DEEPBET_PREPROCESSING: Dict[str, Any] = {
    "orientation": "RAS",          # nibabel.as_closest_canonical: permute/flip axes, no resampling
    "spacing": None,               # none: the ROI is resized to patch_size whatever its mm size
    "nan_to_num": True,
    "intensity": {
        # low/high = linear-interpolated quantiles of the WHOLE reoriented volume after a
        # nearest-exact resize to 128^3 (not of the ROI); then, on the resized ROI:
        "percentiles": [0.5, 99.5],
        "percentiles_of": "whole volume resized to [128, 128, 128] (nearest-exact)",
        "scale_to": [0.0, 1.0],     # x = (x - low) / (high - low)
        "clip": True,               # clamp to [0, 1]
        "zscore": True,             # x = (x - mean) / std over the network input (std unbiased)
        "multiply": 0.226,          # x = 0.226 * x + 0.449 (ImageNet-style grey statistics)
        "add": 0.449,
    },
    "roi": {
        # The brain box comes from a second net (variant "bbox", same LinkNet3d):
        "method": "localizer",
        "localizer_variant": "bbox",
        "localizer_input_shape": [128, 128, 128],   # whole volume, nearest-exact, same intensity rule
        "localizer_threshold": 0.5,                 # on softmax channel 1
        "localizer_largest_component": True,        # 26-connectivity
        "box_projection_threshold": 0.02,  # per axis: slices where mean of the binary mask > 0.02
        "margin": 0.1,                     # box grows by 10 % of its size on each side, clipped
    },
    "patch_size": [256, 256, 256],          # ROI resized to this (anisotropic scaling allowed)
    "resize_mode": "nearest-exact",         # both ways: ROI -> 256^3 and probabilities -> ROI
    "output": {"activation": "softmax", "channel": 1, "num_classes": 2},
    "threshold": 0.5,                       # probability > 0.5
    "postprocessing": {
        "outside_roi": 0,
        "largest_component": True,          # 26-connectivity, inside the ROI
        "fill_holes": True,                 # 3-D void filling (fill_voids / binary_fill_holes)
        "dilate": 0,                        # deepbet's n_dilate default
    },
    "input_divisible_by": 32,               # stride of the encoder (init /4, down1..3 /2 each)
}

# The same, in the vocabulary of tcurlora.preprocess.Preprocessing.to_dict(). Measured on mni152
# and robex with the localiser box (a template and one reference head, not a cohort): intensity
# "percentile" alone gives the same Dice as deepbet's percentile+zscore+affine (0.9522 vs 0.9518,
# 0.9682 vs 0.9682; the first conv has no bias and feeds an InstanceNorm, which absorbs an
# affine intensity change), and trilinear instead of nearest-exact resizing changes Dice by
# < 0.001. What it cannot express is the ROI step: without the localiser box robex drops to
# 0.62 (whole volume resized to 256^3) or 0.69 (0.7 mm grid + 256^3 sliding window), because
# its field of view includes the neck. An engine must therefore add: crop to a box (from the
# "bbox" localiser at inference, from the label's box + 10 % margin when training), then resize
# the box to patch_size (a fixed shape, not a spacing), and paste the result back.
DEEPBET_ENGINE_PREPROCESSING: Dict[str, Any] = {
    "orientation": "RAS",
    "spacing": None,
    "intensity": {"kind": "percentile", "lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0,
                  "clip": True},
    "patch_size": [256, 256, 256],
    "divisible_by": 32,
}


# ---------------------------------------------------------------------------------------------
# Architecture. Names mirror the TorchScript module tree (init, down0-3.block1/2, up0-3,
# tp_conv1, conv, tp_conv2); ReLUs are out-of-place (the scripted net used relu_; same numbers,
# but safer for adapters and hooks that keep activations).


def _norm(c: int) -> nn.InstanceNorm3d:
    # affine=False, no running stats: the scripted instance_norm had no weight/bias/buffers.
    return nn.InstanceNorm3d(c, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False)


class _Block(nn.Module):
    """ResNet basic block: conv3-IN-ReLU-conv3-IN (+ 1x1 strided projection) + skip, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.ReLU(),
            nn.Conv3d(cout, cout, 3, 1, 1, bias=False), _norm(cout))
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, 0, bias=False),
                                            _norm(cout))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(self.double_conv(x) + residual)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.block1 = _Block(cin, cout, stride)
        self.block2 = _Block(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class _Up(nn.Module):
    """LinkNet decoder block: 1x1 squeeze to cin/4, 3x3 transposed conv, 1x1 expand."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cin // 4
        self.conv1 = nn.Sequential(nn.Conv3d(cin, mid, 1, bias=False), _norm(mid), nn.ReLU())
        self.tp_conv = nn.Sequential(
            nn.ConvTranspose3d(mid, mid, 3, stride, 1, output_padding=stride - 1, bias=False),
            _norm(mid), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv3d(mid, cout, 1, bias=False), _norm(cout), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """deepbet's 3-D LinkNet (2.13 M parameters). ``forward`` -> logits (N, 2, D, H, W).

    Input (N, 1, D, H, W) with D, H, W divisible by 32; output has the input's spatial size.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.init = nn.Sequential(nn.Conv3d(in_channels, 16, 7, 2, 3, bias=False), _norm(16),
                                  nn.ReLU(), nn.MaxPool3d(3, 2, 1))
        self.down0 = _Down(16, 16, 1)
        self.down1 = _Down(16, 32, 2)
        self.down2 = _Down(32, 64, 2)
        self.down3 = _Down(64, 128, 2)
        self.up0 = _Up(128, 64, 2)
        self.up1 = _Up(64, 32, 2)
        self.up2 = _Up(32, 16, 2)
        self.up3 = _Up(16, 16, 1)
        self.tp_conv1 = nn.Sequential(nn.ConvTranspose3d(16, 8, 3, 2, 1, output_padding=1),
                                      _norm(8), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv3d(8, 8, 3, 1, 1), _norm(8), nn.ReLU())
        self.tp_conv2 = nn.ConvTranspose3d(8, num_classes, 2, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.init(x)
        x1 = self.down0(x0)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        y = self.up0(x4) + x3
        y = self.up1(y) + x2
        y = self.up2(y) + x1
        y = self.up3(y) + x0
        return self.tp_conv2(self.conv(self.tp_conv1(y)))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """What the TorchScript module returns: softmax over the 2 classes (1 = brain)."""
        return torch.softmax(self(x), dim=1)


# ---------------------------------------------------------------------------------------------
# Weights


def deepbet_weights_path(variant: str = "model") -> Path:
    """Cache path of the converted ``.safetensors`` weights of ``variant`` ("model" or "bbox")."""
    member, sha = _member(variant)
    return (cache_dir() / "converted" /
            f"deepbet-{DEEPBET_PIN.version}-{variant}-{sha[:12]}.safetensors")


def _member(variant: str) -> Tuple[str, str]:
    try:
        return DEEPBET_MEMBERS[variant]
    except KeyError:
        raise ValueError(f"unknown deepbet variant {variant!r}; use one of "
                         f"{', '.join(DEEPBET_MEMBERS)}") from None


class _ScriptObject:
    """Placeholder for a pickled ``__torch__.*`` module: only its attribute dict is kept."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {})


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                   "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "LongStorage": torch.int64, "IntStorage": torch.int32}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Sequence[int],
                    stride: Sequence[int], *unused: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def read_torchscript_weights(path: PathLike) -> Dict[str, torch.Tensor]:
    """Parameters of a TorchScript archive, read WITHOUT TorchScript and without running code.

    A TorchScript file is a zip whose ``data.pkl`` pickles the module tree and whose ``data/<k>``
    entries hold raw little-endian storages. A restricted unpickler accepts only module
    placeholders, OrderedDict, storage types and the tensor-rebuild call (like
    ``torch.load(weights_only=True)``, which refuses TorchScript archives).
    """
    import pickle
    import zipfile
    from collections import OrderedDict

    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise FetchError(f"{Path(path).name} is not a TorchScript archive")
        root = pkl[0].split("/")[0]

        class _Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module == "__torch__" or module.startswith("__torch__."):
                    return _ScriptObject
                if (module, name) == ("collections", "OrderedDict"):
                    return OrderedDict
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return _rebuild_tensor
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]
                raise pickle.UnpicklingError(f"refusing {module}.{name} in {Path(path).name}")

            def persistent_load(self, pid: Any) -> torch.Tensor:
                kind, dtype, key, _location, numel = pid
                if kind != "storage" or not isinstance(dtype, torch.dtype):
                    raise pickle.UnpicklingError(f"unexpected storage record {pid!r}")
                raw = bytearray(zf.read(f"{root}/data/{key}"))
                return torch.frombuffer(raw, dtype=dtype, count=int(numel))

        with zf.open(pkl[0]) as f:
            tree = _Unpickler(f).load()

    out: Dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> None:
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(tree, "")
    return out


def _convert_to_safetensors(variant: str, local_wheel: Optional[PathLike]) -> Path:
    from safetensors.torch import save_file

    member, sha = _member(variant)
    dest = deepbet_weights_path(variant)
    script = extract_member(DEEPBET_PIN, member, local_wheel)
    actual = sha256_file(script)
    if actual != sha:
        raise FetchError(f"sha256 mismatch for {script}: expected {sha}, got {actual}")
    tensors = {k: v.detach().to(torch.float32).contiguous()
               for k, v in read_torchscript_weights(script).items()}
    atomic_write(dest, lambda tmp: save_file(tensors, tmp, metadata={
        "source": f"{DEEPBET_PIN.filename}:{member}", "source_sha256": sha,
        "architecture": "tcurlora.models.deepbet.LinkNet3d", "licence": DEEPBET_PIN.licence}))
    return dest


def load_deepbet(local_wheel: Optional[PathLike] = None, variant: str = "model",
                 device: Union[str, torch.device] = "cpu") -> LinkNet3d:
    """The eager deepbet net with its pretrained weights, in eval mode, float32.

    ``variant``: "model" (brain mask, 256^3) or "bbox" (localiser, 128^3).
    ``local_wheel``: the pinned deepbet wheel for offline sites (see :mod:`tcurlora.fetch`).
    """
    from safetensors.torch import load_file

    path = deepbet_weights_path(variant)
    if not path.is_file():
        path = _convert_to_safetensors(variant, local_wheel)
    model = LinkNet3d()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device=device, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# deepbet's intensity normalisation and localiser box (the base model's preprocessing uses them; the
# whole reference pipeline built on them lives with the tests: Testing/deepbet_reference.py).


def deepbet_normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    x = ((x - low) / (high - low)).clamp(0.0, 1.0)
    x = (x - x.mean()) / x.std()
    return 0.226 * x + 0.449


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(counts.argmax())


def _resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x[None, None], size=tuple(int(s) for s in shape),
                         mode="nearest-exact")[0, 0]


def deepbet_roi(bbox_model: nn.Module, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor
                ) -> Tuple[slice, slice, slice]:
    """Brain box from the localiser, as deepbet's ``get_bbox_with_margin`` computes it."""
    spec = DEEPBET_PREPROCESSING["roi"]
    small = _resize(x, spec["localizer_input_shape"])
    with torch.no_grad():
        p = torch.softmax(bbox_model(deepbet_normalize(small, low, high)[None, None]), 1)[0, 1]
    m = _largest_component((p > spec["localizer_threshold"]).cpu().numpy())
    mt = torch.from_numpy(m.astype(np.float32))
    ranges = [torch.where(mt.mean(dims) > spec["box_projection_threshold"])[0]
              for dims in ((1, 2), (0, 2), (0, 1))]
    if any(r.numel() == 0 for r in ranges):
        raise ValueError("deepbet localiser found no brain in this image")
    center = torch.tensor([(r.max() + 1 + r.min()) / 2 for r in ranges])
    size = torch.tensor([float((r.max() + 1) - r.min()) for r in ranges])
    scale = torch.tensor(x.shape, dtype=torch.float32) / torch.tensor(mt.shape, dtype=torch.float32)
    center, size = (scale * center).round(), ((1 + 2 * spec["margin"]) * scale * size).round()
    return tuple(slice(max(0, int(c - s / 2)), min(int(n), int(c + s / 2)))  # type: ignore[return-value]
                 for c, s, n in zip(center.tolist(), size.tolist(), x.shape))
