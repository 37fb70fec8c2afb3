"""nnU-Net v2 trained-model folders as base models (every TotalSegmentator task, every SlicerNNUnet model).

A folder ``Dataset…/{Trainer}__{Plans}__{configuration}/`` holds ``dataset.json`` (labels), ``plans.json`` and
``fold_N/checkpoint_final.pth`` (or ``checkpoint_best.pth``).  What is ours and what is nnU-Net's:

* **Reading** is ours and refuses what it cannot vouch for: the checkpoint is read with
  ``torch.load(weights_only=True)`` and an allow-list of the numpy scalar/dtype types nnU-Net's training log
  pickles (nothing that runs code); the network class and its layer types are resolved against allow-lists
  (``PlainConvUNet``, ``ResidualEncoderUNet`` of ``dynamic_network_architectures``; torch conv/norm/dropout/
  activation layers), never by importing a name from the plans or through nnU-Net's trainer lookup; every other
  class name in the plans (reader, preprocessor, normalisation, resampling, label manager) must be one of
  nnU-Net's stock ones.  Region-based, ignore-label and cascade models are refused.
* **Everything between the image and the label map is nnU-Net's own code**: its image reader/writer, its
  ``DefaultPreprocessor`` (transpose, crop to non-zero, normalise, resample) for inference and for training
  cases, and its ``nnUNetPredictor`` (Gaussian sliding window, mirroring over the checkpoint's axes, logits
  resampled back, un-cropped, un-transposed), initialised with our network (adapter merged) through
  ``manual_initialization`` — so a base with no (or a zero) adapter gives ``nnUNetv2_predict``'s label map.
* **TotalSegmentator task folders** (``Dataset…_TotalSegmentator_…``) get TotalSegmentator's wrapping around
  nnU-Net: the input reoriented to RAS and resampled (cubic) to the task's spacing, the label map resampled
  back (nearest), tiles at step 0.8, no mirroring.

Mirroring is nnU-Net's test-time augmentation: as ``nnUNetv2_predict`` does, ``tcurlora segment`` mirrors when the
trainer allows it (its checkpoint's mirroring axes), and ``--no-tta`` turns it off (``--disable_tta``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn as nn

from ..errors import InputError, TCURLoRAError
from ..limits import check_bytes
from ..preprocess import Preprocessing, image_source
from ..safejson import read_json_object
from ..userfiles import check_regular_file
from . import BaseModel, construct
from .construct import Built
from .nnunet_checks import check_case_grid, check_checkpoint, check_configuration, check_label_names, check_plans_file

INSTALL_HINT = ("nnU-Net bases need nnunetv2 2.8.1 and dynamic-network-architectures 0.4.4: pip install "
                "'tcurlora[nnunet]', then pip install --no-deps -r requirements-nnunet.txt (see the README)")

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
DEFAULT_STEP = 0.5  # nnUNetv2_predict's tile step
TOTALSEGMENTATOR_STEP = 0.8  # TotalSegmentator's

# plans' class names -> what we accept (nnU-Net's stock components only)
NETWORK_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
    # the name nnU-Net's converter writes for old (< 2.3) plans; the class lives in .unet since
    "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": "ResidualEncoderUNet",
}
LAYER_TYPES = {  # arch_kwargs that name a torch layer: accepted short names (as torch.nn.X or torch.nn.modules.*.X)
    "conv_op": {"Conv3d"},
    "norm_op": {"InstanceNorm3d", "BatchNorm3d"},
    "dropout_op": {"Dropout", "Dropout3d"},
    "nonlin": {"LeakyReLU", "ReLU", "PReLU", "ELU", "GELU"},
}
READERS = {"SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"}
NORMALIZATIONS = {"CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization"}
RESAMPLING = "resample_data_or_seg_to_shape"


# ----------------------------------------------------------------------------------------------
# finding the folder and reading its files


def is_nnunet_folder(path: Path) -> bool:
    """A trained-model folder, or a dataset folder with trainer folders in it (cheap: looks at file names only)."""
    path = Path(path)
    return _is_model_folder(path) or (path.is_dir() and any(_is_model_folder(p) for p in path.iterdir() if p.is_dir()))


def _is_model_folder(path: Path) -> bool:
    return (path / "dataset.json").is_file() and (path / "plans.json").is_file()


def find_model_folder(path: Path) -> Path:
    """The trained-model folder: ``path`` itself, or its one trainer folder (a dataset folder)."""
    path = Path(path)
    if _is_model_folder(path):
        return path
    found = sorted(p for p in path.iterdir() if p.is_dir() and _is_model_folder(p))
    if len(found) != 1:
        names = ", ".join(p.name for p in found)
        raise InputError(path, f"holds {len(found)} nnU-Net trained-model folders ({names}): "
                               "pass one of them as --base")
    return found[0]


def find_checkpoint(folder: Path, fold: Optional[int]) -> Path:
    """``fold_N/checkpoint_final.pth`` (else ``checkpoint_best.pth``); the only fold when ``fold`` is None."""
    folds = sorted((p for p in folder.glob("fold_*") if p.is_dir() and any((p / c).is_file() for c in CHECKPOINTS)),
                   key=lambda p: p.name)
    if fold is None:
        if len(folds) != 1:
            listed = ", ".join(p.name[len("fold_"):] for p in folds) or "none"
            raise InputError(folder, f"has trained folds {listed}: pass --fold N (an adapter belongs to one fold)")
        fold_dir = folds[0]
    else:
        fold_dir = folder / f"fold_{fold}"
        if fold_dir not in folds:
            listed = ", ".join(p.name[len("fold_"):] for p in folds) or "none"
            raise InputError(folder, f"has no checkpoint for fold {fold} (folds with one: {listed})")
    return next(fold_dir / c for c in CHECKPOINTS if (fold_dir / c).is_file())


def _checkpoint_safe_globals() -> list:
    """What nnU-Net checkpoints pickle besides tensors and containers: numpy scalars (training-log values)
    and their dtypes, under numpy 2's module name and numpy 1's (files written with numpy 1)."""
    try:
        scalar = np._core.multiarray.scalar  # numpy >= 2
        names = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    except AttributeError:
        scalar = np.core.multiarray.scalar  # numpy 1
        names = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
    dtype_classes = [type(np.dtype(code)) for code in ("f4", "f8", "i4", "i8")]
    return [(scalar, names[0]), (scalar, names[1]), np.dtype, *dtype_classes]


def read_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint dict, read without running any pickled code."""
    size = check_regular_file(path, "checkpoint")
    check_bytes(path, f"reading a {size / 2 ** 20:.1f} MB checkpoint", 2 * size)
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError names the refused global; zip/EOF errors for a damaged file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else
                      type(exc).__name__)
        raise InputError(path, f"refused or unreadable nnU-Net checkpoint ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict) or \
            not all(isinstance(v, torch.Tensor) for v in checkpoint["network_weights"].values()):
        raise InputError(path, "not an nnU-Net checkpoint (no network_weights state dict)")
    return checkpoint


def labels_from_dataset_json(dataset_json: dict, where: Path) -> List[dict]:
    """The label table (value > 0, name, colour) of a plain label-map model; regions and ignore labels refused."""
    from ..io import default_color

    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError(where, "has no \"labels\" mapping")
    if "regions_class_order" in dataset_json or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise InputError(where, "is a region-based nnU-Net model (labels map to lists of values): not supported")
    if "ignore" in labels:
        raise InputError(where, "uses an nnU-Net ignore label (partial annotations): not supported")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise InputError(where, "label values must be integers")
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise InputError(where, f"label values must be 0..{len(values) - 1} (nnU-Net's rule), got {values}")
    return check_label_names([{"value": v, "name": str(name), "color": default_color(v)}
                              for name, v in sorted(labels.items(), key=lambda kv: kv[1]) if v > 0], where)


# ----------------------------------------------------------------------------------------------
# plans -> network


def _import_nnunet():
    try:
        import dynamic_network_architectures.architectures.unet as dna_unet
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError as exc:
        raise TCURLoRAError(f"{INSTALL_HINT} ({exc})") from None
    return dna_unet, PlansManager


def _torch_layer(name: Any, allowed: set, key: str, where: Path) -> Optional[type]:
    if name is None and key == "dropout_op":
        return None
    short = str(name).rsplit(".", 1)[-1]
    module_path = str(name).rsplit(".", 1)[0] if "." in str(name) else ""
    if not isinstance(name, str) or short not in allowed or not (
            module_path == "torch.nn" or module_path.startswith("torch.nn.modules.")):
        raise InputError(where, f"network {key} {str(name)[:80]!r} is not one of torch.nn."
                                f"{', torch.nn.'.join(sorted(allowed))}")
    return getattr(nn, short)


def check_plans(plans_manager, configuration: str, where: Path):
    """The configuration's manager, once every class name in the plans is one of nnU-Net's stock ones."""
    plans = plans_manager.plans
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration not in configurations:
        raise InputError(where, f"has no configuration {configuration!r}")
    check_plans_file(plans, where)
    try:
        cm = plans_manager.get_configuration(configuration)
        previous, patch = cm.previous_stage_name, cm.configuration.get("patch_size")
    except Exception as exc:  # old-format conversion and inheritance raise RuntimeError/KeyError on bad plans
        raise InputError(where, f"configuration {configuration!r} is unusable ({' '.join(str(exc).split())[:200]})") from None
    if previous is not None:
        raise InputError(where, f"configuration {configuration!r} is a cascade stage (needs the "
                                f"{str(previous)[:60]} model's output): not supported")
    if isinstance(patch, list) and len(patch) in (1, 2):
        raise InputError(where, f"configuration {configuration!r} is {len(patch)}D: tcurlora adapts 3D networks")
    check_configuration(cm.configuration, configuration, where)
    checks = [("image_reader_writer", plans.get("image_reader_writer"), READERS),
              ("label_manager", plans.get("label_manager", "LabelManager"), {"LabelManager"}),
              ("preprocessor_name", cm.preprocessor_name, {"DefaultPreprocessor"})]
    checks += [("normalization_schemes", s, NORMALIZATIONS) for s in cm.normalization_schemes]
    checks += [(k, cm.configuration.get(k), {RESAMPLING})
               for k in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")]
    for key, value, allowed in checks:
        if not isinstance(value, str) or value not in allowed:
            raise InputError(where, f"{key} {str(value)[:80]!r} is not one of nnU-Net's stock "
                                    f"{', '.join(sorted(allowed))}")
    return cm


def build_network(configuration_manager, num_input_channels: int, num_outputs: int, where: Path) -> Built:
    """The plans' network (deep supervision off, as nnU-Net predicts), from allow-listed classes only, measured
    on the meta device with the configuration's patch before it is allocated (see :mod:`.construct`)."""
    dna_unet, _ = _import_nnunet()
    class_name = configuration_manager.network_arch_class_name
    if class_name not in NETWORK_CLASSES:
        accepted = ", ".join(sorted(set(NETWORK_CLASSES.values())))
        raise InputError(where, f"network {str(class_name)[:80]!r} is not one of {accepted}")
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if key not in LAYER_TYPES:
            raise InputError(where, f"network argument {key[:60]!r} names a class tcurlora does not resolve")
        kwargs[key] = _torch_layer(kwargs.get(key), LAYER_TYPES[key], key, where)
    cls = getattr(dna_unet, NETWORK_CLASSES[class_name])
    return construct.build_network(
        lambda: cls(input_channels=num_input_channels, num_classes=num_outputs, deep_supervision=False, **kwargs),
        where, NETWORK_CLASSES[class_name], windows=[configuration_manager.patch_size], in_channels=num_input_channels)


# ----------------------------------------------------------------------------------------------
# the base


def _quiet():
    """nnU-Net prints progress to standard output, which carries the worker's JSON events: send it to stderr."""
    return contextlib.redirect_stdout(sys.stderr)


class NnUNetBase(BaseModel):
    """An nnU-Net v2 model: nnU-Net's preprocessing and predictor around our (adapted) network."""

    def __init__(self, *args, plans_manager, configuration_manager, dataset_json: dict, trainer_name: str,
                 mirror_axes: Optional[Tuple[int, ...]], tile_step: float, totalsegmentator: bool, **kwargs) -> None:
        self.plans_manager = plans_manager
        self.configuration_manager = configuration_manager
        self.dataset_json = dataset_json
        self.trainer_name = trainer_name
        self.mirror_axes = tuple(mirror_axes) if mirror_axes is not None else None
        self.tile_step = float(tile_step)
        self.totalsegmentator = bool(totalsegmentator)
        super().__init__(*args, **kwargs)

    # -- geometry around nnU-Net (TotalSegmentator's wrapping) ----------------------------------

    def task_spacing(self) -> Tuple[float, float, float]:
        """The configuration's voxel size in SimpleITK (x, y, z) order."""
        cm, pm = self.configuration_manager, self.plans_manager
        array_order = [cm.spacing[pm.transpose_backward[i]] for i in range(3)]  # (z, y, x)
        return tuple(float(s) for s in reversed(array_order))

    def _nnunet_input(self, image: sitk.Image, label: Optional[sitk.Image] = None):
        """What nnU-Net is given: the image itself, or (TotalSegmentator) RAS-canonical and at the task's spacing."""
        if not self.totalsegmentator:
            return image, label
        from ..preprocess import _grid, _resampled_grid, _set_grid

        oriented = sitk.DICOMOrient(image, "RAS")
        target = _resampled_grid(_grid(oriented), self.task_spacing(), image_source(image))
        ref = _set_grid(sitk.Image(target["size"], sitk.sitkUInt8), target)
        resampled = sitk.Resample(oriented, ref, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
        if label is not None:
            label = sitk.Resample(sitk.DICOMOrient(label, "RAS"), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                  label.GetPixelID())
        return resampled, label

    def _reader(self):
        from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        return {"SimpleITKIO": SimpleITKIO, "NibabelIO": NibabelIO,
                "NibabelIOWithReorient": NibabelIOWithReorient}[self.plans_manager.plans["image_reader_writer"]]()

    def _read_as_nnunet(self, image: sitk.Image, folder: Path, name: str, seg: bool = False):
        """``image`` as nnU-Net's reader (from the plans) gives it: (array [C, ...], properties)."""
        path = folder / f"{name}.nii"  # nnU-Net reads files; uncompressed NIfTI is quick and every reader takes it
        sitk.WriteImage(image, str(path))
        reader = self._reader()
        return reader.read_seg(str(path)) if seg else reader.read_images([str(path)])

    # -- training: nnU-Net-preprocessed cases ----------------------------------------------------

    def prepare(self, image: sitk.Image, label: Optional[sitk.Image] = None):
        """Image (and label) as nnU-Net's DefaultPreprocessor makes them: ``(image [C, ...], label [1, ...] | None,
        properties)`` — transposed, cropped to the non-zero box, normalised, resampled to the plans' spacing."""
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        source = image_source(image)
        image, label = self._nnunet_input(image, label)
        with tempfile.TemporaryDirectory(prefix="tcurlora-nnunet-") as tmp:
            data, props = self._read_as_nnunet(image, Path(tmp), "image")
            check_case_grid(source, data.shape[1:], props["spacing"], self.plans_manager, self.configuration_manager)
            seg = self._read_as_nnunet(label, Path(tmp), "label", seg=True)[0] if label is not None else None
        with _quiet():
            data, seg, props = DefaultPreprocessor(verbose=False).run_case_npy(
                data, seg, props, self.plans_manager, self.configuration_manager, self.dataset_json)
        x = torch.from_numpy(np.ascontiguousarray(data)).float()
        # outside the non-zero box nnU-Net marks -1 ("not annotated"); for the loss that is background
        y = torch.from_numpy(np.ascontiguousarray(seg)).long().clamp_min(0) if label is not None else None
        return x, y, props

    def restore(self, probabilities, meta, reference, channel_values=None):
        raise TCURLoRAError("nnU-Net bases restore through nnU-Net's predictor (segment_image), not restore()")

    restore_probabilities = restore

    # -- inference: nnU-Net's predictor -----------------------------------------------------------

    def segment_image(self, image: sitk.Image, labels: List[dict], device: torch.device, tta: Optional[bool] = None,
                      stop: Optional[Callable[[], bool]] = None, probabilities: bool = False,
                      events=None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Label map (values of ``labels``) on ``image``'s grid, as nnUNetv2_predict computes it with this network,
        and with ``probabilities`` the class probabilities ``[C, z, y, x]`` (background first) on that grid.
        ``tta``: mirror (None: when the trainer allows it, nnUNetv2_predict's default)."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from ..runtime import InferenceStopped

        mirroring = tta is not False and self.mirror_axes is not None and not self.totalsegmentator
        if tta and not mirroring and events is not None:
            events.warning("this nnU-Net model predicts without mirroring (its trainer or TotalSegmentator): "
                           "--tta ignored")
        reorients = self.totalsegmentator or self.plans_manager.plans["image_reader_writer"] == "NibabelIOWithReorient"
        if probabilities and reorients:
            raise TCURLoRAError("--probabilities is not available for this nnU-Net model (it reorients the input)")
        # the label table may be the adapter's (a new head): nnU-Net exports channel indices 0..N, mapped to
        # the table's values below
        channels = {"background": 0, **{label["name"]: i for i, label in enumerate(labels, 1)}}
        dataset_json = {**self.dataset_json, "labels": channels}
        network = self.network
        with _quiet():
            predictor = nnUNetPredictor(tile_step_size=self.tile_step, use_gaussian=True, use_mirroring=mirroring,
                                        perform_everything_on_device=device.type == "cuda", device=device,
                                        verbose=False, verbose_preprocessing=False, allow_tqdm=False)
            # the predictor loads its parameter list into the network before predicting: give it the network's own
            predictor.manual_initialization(network, self.plans_manager, self.configuration_manager,
                                            [network.state_dict()], dataset_json, self.trainer_name, self.mirror_axes)

        def check_stop(module, args):
            if stop is not None and stop():
                raise InferenceStopped()

        nn_image, _ = self._nnunet_input(image)
        hook = network.register_forward_pre_hook(check_stop)
        try:
            with tempfile.TemporaryDirectory(prefix="tcurlora-nnunet-") as tmp, _quiet():
                data, props = self._read_as_nnunet(nn_image, Path(tmp), "image")
                check_case_grid(image_source(image), data.shape[1:], props["spacing"], self.plans_manager,
                                self.configuration_manager, len(labels) + 1, self.window_bytes)
                ret = predictor.predict_single_npy_array(data, props, None, None, probabilities)
                seg, probs = ret if probabilities else (ret, None)
                out = Path(tmp) / "seg.nii"
                self._reader().write_seg(seg.astype(np.uint16), str(out), props)  # nnU-Net's own export
                seg_image = sitk.ReadImage(str(out))
        finally:
            hook.remove()
        if self.totalsegmentator:  # back from the task's RAS grid onto the input grid
            seg_image.CopyInformation(nn_image)
            seg_image = sitk.Resample(seg_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        index = sitk.GetArrayFromImage(seg_image)
        if index.shape != sitk.GetArrayViewFromImage(image).shape:
            raise TCURLoRAError("nnU-Net's export did not return the input's grid")
        lut = np.asarray([0] + [int(l["value"]) for l in labels], dtype=np.int64)
        label_map = lut[index.astype(np.int64)]
        return label_map.astype(np.uint8 if lut.max() <= 255 else np.uint16), probs


# ----------------------------------------------------------------------------------------------


def load_nnunet(path: Path, fold: Optional[int] = None) -> NnUNetBase:
    """An nnU-Net v2 trained-model folder (or the dataset folder above its one trainer folder) as a base."""
    _, PlansManager = _import_nnunet()
    folder = find_model_folder(Path(path))
    checkpoint_path = find_checkpoint(folder, fold)
    dataset_json = read_json_object(folder / "dataset.json", strict=False)
    plans = read_json_object(folder / "plans.json", strict=False)
    labels = labels_from_dataset_json(dataset_json, folder / "dataset.json")
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    if not isinstance(channels, dict) or len(channels) != 1:
        count = len(channels) if isinstance(channels, dict) else "?"
        raise InputError(folder / "dataset.json", f"the model takes {count} input channels; tcurlora gives it one "
                                                 "image per case")
    checkpoint = read_checkpoint(checkpoint_path)
    configuration, trainer_name, mirror_axes = check_checkpoint(checkpoint, checkpoint_path)
    configuration = configuration or folder.name.split("__")[-1]
    try:
        plans_manager = PlansManager(plans)
    except Exception as exc:  # nnU-Net converts old plans on reading: bad ones raise anything
        raise InputError(folder / "plans.json", f"unusable plans ({' '.join(str(exc).split())[:200]})") from None
    cm = check_plans(plans_manager, configuration, folder / "plans.json")
    built = build_network(cm, 1, len(labels) + 1, folder / "plans.json")
    network = built.network
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(checkpoint_path, f"weights do not fit the plans' network ({first})") from None
    # without deep supervision (how nnU-Net predicts) only the last segmentation layer runs: the coarser ones are
    # left out, so that adapters neither stack nor store layers that never see data
    for i in range(len(network.decoder.seg_layers) - 1):
        network.decoder.seg_layers[i] = nn.Identity()
    totalseg = "totalsegmentator" in folder.parent.name.lower()
    patch = [int(p) for p in cm.patch_size]
    # array axes as SimpleITKIO gives them for an axial scan with identity direction: toward S, P, L (after
    # transpose_forward); only used to keep training flips off the left-right axis for lateral labels
    orientation = "".join("SPL"[i] for i in plans_manager.transpose_forward)
    preprocessing = Preprocessing(orientation=orientation, spacing=tuple(float(s) for s in cm.spacing),
                                  intensity={"kind": "none"},  # nnU-Net's normalisation runs in prepare()
                                  patch_size=tuple(patch), divisible_by=math.gcd(*patch))
    last_head = len(network.decoder.seg_layers) - 1
    fold_name = checkpoint_path.parent.name
    return NnUNetBase(
        name=f"{folder.parent.name}/{folder.name}/{fold_name}", network=network, labels=labels,
        preprocessing=preprocessing, head=f"decoder.seg_layers.{last_head}",
        # decoder.encoder is the encoder itself (an alias): the decoder's own blocks only, one by one (forward
        # iterates the ModuleLists, so those stay lists)
        decoder_modules=[r"decoder\.(stages|transpconvs)\.\d+(\..*)?", rf"decoder\.seg_layers\.{last_head}(\..*)?"],
        inference_roi=tuple(patch), source=f"nnU-Net {folder.name} {fold_name}/{checkpoint_path.name}",
        plans_manager=plans_manager, configuration_manager=cm, dataset_json=dataset_json,
        trainer_name=trainer_name or folder.name.split("__")[0], mirror_axes=mirror_axes, window_bytes=built.window_bytes,
        tile_step=TOTALSEGMENTATOR_STEP if totalseg else DEFAULT_STEP, totalsegmentator=totalseg, kind="nnunet")
