"""What an nnU-Net v2 trained-model folder may hold, checked before nnU-Net's own code reads it.

nnU-Net trusts its plans and checkpoints: a ``transpose_forward`` out of range, a zero spacing, a mirroring
axis given as an int, an unknown resampling argument or a missing intensity table each fail deep inside its
preprocessor or predictor (``IndexError``, ``ZeroDivisionError``, ``TypeError``, ``KeyError``), and a patch
of 10⁹ voxels is allocated before anything fails. Here every field tcurlora or nnU-Net acts on gets its type,
range and consistency checked, with one line naming the file; then nnU-Net's code only sees values it can
handle. What is checked (the configuration used, after nnU-Net resolves ``inherits_from``):

* ``plans.json``: ``transpose_forward``/``transpose_backward`` permutations of 0..2, one the inverse of the
  other; ``foreground_intensity_properties_per_channel["0"]`` with finite ``mean``, ``std`` >= 0 and
  percentiles in order; per configuration ``spacing`` (three finite numbers > 0), ``patch_size`` (three sizes
  1..1024, divisible by the network's down-sampling), one normalisation scheme and ``use_mask_for_norm``
  flag, resampling arguments nnU-Net's resampler takes (with their types), and the architecture's sizes
  (stages, features, kernels, strides, convolutions per stage, with consistent lengths).
* ``dataset.json``: labels (see :func:`tcurlora.models.nnunet.labels_from_dataset_json`) whose names are
  valid segment names.
* the checkpoint: ``network_weights`` a mapping of names to tensors, ``trainer_name`` a name,
  ``init_args["configuration"]`` a configuration of the plans, ``inference_allowed_mirroring_axes`` null or
  distinct axes 0..2.
"""

from __future__ import annotations

import math
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

from ..errors import InputError, unsafe_character
from ..limits import check_bytes, check_grid, segmentation_bytes, size_text
from ..manifest import MAX_NAME
from ..protocol import MAX_PATCH

PathLike = Union[str, "os.PathLike[str]"]

#: Keyword arguments of nnU-Net's ``resample_data_or_seg_to_shape`` that plans may set, with their check.
RESAMPLING_ARGUMENTS = {
    "is_seg": lambda v: isinstance(v, bool),
    "order": lambda v: _is_int(v) and 0 <= v <= 5,
    "order_z": lambda v: _is_int(v) and 0 <= v <= 5,
    "force_separate_z": lambda v: v is None or isinstance(v, bool),
    "separate_z_anisotropy_threshold": lambda v: _is_number(v) and v > 0,
}
MAX_STAGES = 12
MAX_FEATURES = 4096
MAX_KERNEL = 15
MAX_STRIDE = 8
MAX_CONVS = 16
#: What a voxel of an image resampled by nnU-Net's preprocessor costs: the float32 data before and after
#: resampling, and for a training case its segmentation before and after.
PREPROCESSED_BYTES_PER_VOXEL = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ints(value: Any, n: int, lo: int, hi: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(_is_int(v) and lo <= v <= hi for v in value)


def _permutation(value: Any) -> bool:
    return _ints(value, 3, 0, 2) and sorted(value) == [0, 1, 2]


def check_plans_file(plans: dict, where: PathLike) -> None:
    """The plans' top-level fields every configuration uses."""
    forward, backward = plans.get("transpose_forward"), plans.get("transpose_backward")
    for key, value in (("transpose_forward", forward), ("transpose_backward", backward)):
        if not _permutation(value):
            raise InputError(where, f"{key} must be a permutation of 0, 1, 2, got {_show(value)}")
    if [forward[b] for b in backward] != [0, 1, 2]:
        raise InputError(where, f"transpose_backward {backward} does not undo transpose_forward {forward}")
    properties = plans.get("foreground_intensity_properties_per_channel",
                           plans.get("foreground_intensity_properties_by_modality"))
    channel = properties.get("0") if isinstance(properties, dict) else None
    if not isinstance(channel, dict):
        raise InputError(where, "foreground_intensity_properties_per_channel needs the intensity statistics of "
                                "channel \"0\" (nnU-Net's fingerprint)")
    for key in ("mean", "std", "percentile_00_5", "percentile_99_5"):
        if not _is_number(channel.get(key)):
            raise InputError(where, f"foreground intensity {key} of channel 0 must be a finite number, "
                                    f"got {_show(channel.get(key))}")
    if channel["std"] < 0 or channel["percentile_00_5"] > channel["percentile_99_5"]:
        raise InputError(where, "foreground intensity statistics of channel 0 are inconsistent (std < 0 or "
                                "percentile_00_5 > percentile_99_5)")


def check_configuration(configuration: dict, name: str, where: PathLike) -> None:
    """A resolved configuration's fields (see the module docstring)."""
    at = f"configuration {name!r}"
    spacing, patch = configuration.get("spacing"), configuration.get("patch_size")
    if not (isinstance(spacing, (list, tuple)) and len(spacing) == 3 and all(_is_number(s) and s > 0 for s in spacing)):
        raise InputError(where, f"{at}: spacing must be three finite numbers > 0 (mm), got {_show(spacing)}")
    if not _ints(patch, 3, 1, MAX_PATCH):
        raise InputError(where, f"{at}: patch_size must be three sizes from 1 to {MAX_PATCH}, got {_show(patch)}")
    schemes, masks = configuration.get("normalization_schemes"), configuration.get("use_mask_for_norm")
    if not (isinstance(schemes, list) and len(schemes) == 1 and isinstance(schemes[0], str)):
        raise InputError(where, f"{at}: normalization_schemes must name one scheme (one input channel), "
                                f"got {_show(schemes)}")
    if not (isinstance(masks, list) and len(masks) == 1 and isinstance(masks[0], bool)):
        raise InputError(where, f"{at}: use_mask_for_norm must be one true/false, got {_show(masks)}")
    for which in ("data", "seg", "probabilities"):
        kwargs = configuration.get(f"resampling_fn_{which}_kwargs")
        if not isinstance(kwargs, dict):
            raise InputError(where, f"{at}: resampling_fn_{which}_kwargs must be a mapping, got {_show(kwargs)}")
        for key, value in kwargs.items():
            if key not in RESAMPLING_ARGUMENTS:
                raise InputError(where, f"{at}: resampling_fn_{which}_kwargs has the unknown argument {_show(key)} "
                                        f"(nnU-Net's resampler takes {', '.join(RESAMPLING_ARGUMENTS)})")
            if not RESAMPLING_ARGUMENTS[key](value):
                raise InputError(where, f"{at}: resampling_fn_{which}_kwargs {key}={_show(value)} is out of range")
    architecture = configuration.get("architecture")
    if not (isinstance(architecture, dict) and isinstance(architecture.get("network_class_name"), str)
            and isinstance(architecture.get("arch_kwargs"), dict)
            and isinstance(architecture.get("_kw_requires_import"), (list, tuple))
            and all(isinstance(k, str) for k in architecture["_kw_requires_import"])):
        raise InputError(where, f"{at}: architecture needs network_class_name, arch_kwargs and _kw_requires_import")
    _check_architecture(architecture["arch_kwargs"], patch, f"{at}: arch_kwargs", where)


def _check_architecture(kwargs: dict, patch: Sequence[int], at: str, where: PathLike) -> None:
    stages = kwargs.get("n_stages")
    if not (_is_int(stages) and 1 <= stages <= MAX_STAGES):
        raise InputError(where, f"{at}: n_stages must be 1 to {MAX_STAGES}, got {_show(stages)}")
    features = kwargs.get("features_per_stage")
    features = [features] * stages if _is_int(features) else features
    if not _ints(features, stages, 1, MAX_FEATURES):
        raise InputError(where, f"{at}: features_per_stage must be {stages} sizes from 1 to {MAX_FEATURES}, "
                                f"got {_show(kwargs.get('features_per_stage'))}")
    for key, hi in (("kernel_sizes", MAX_KERNEL), ("strides", MAX_STRIDE)):
        value = kwargs.get(key)
        value = [value] * stages if _is_int(value) else value
        if not (isinstance(value, (list, tuple)) and len(value) == stages
                and all(_ints([v] * 3 if _is_int(v) else v, 3, 1, hi) for v in value)):
            raise InputError(where, f"{at}: {key} must be {stages} triples of sizes from 1 to {hi}, "
                                    f"got {_show(kwargs.get(key))}")
    convs_key = "n_blocks_per_stage" if "n_blocks_per_stage" in kwargs else "n_conv_per_stage"
    for key, n in ((convs_key, stages), ("n_conv_per_stage_decoder", stages - 1)):
        value = kwargs.get(key)
        value = [value] * n if _is_int(value) else value
        if not _ints(value, n, 1, MAX_CONVS):
            raise InputError(where, f"{at}: {key} must be {n} counts from 1 to {MAX_CONVS}, got {_show(kwargs.get(key))}")
    strides = [[s] * 3 if _is_int(s) else s for s in kwargs["strides"]]
    factor = [math.prod(s[axis] for s in strides) for axis in range(3)]
    if any(p % f for p, f in zip(patch, factor)):
        raise InputError(where, f"{at}: patch_size {size_text(patch)} is not a multiple of the network's "
                                f"down-sampling {size_text(factor)}")


def check_label_names(labels: List[dict], where: PathLike) -> List[dict]:
    """The dataset's label table under the rules every label table follows (names fit a ``.seg.nrrd``)."""
    from ..errors import TCURLoRAError
    from ..io import validate_label_table

    try:
        return validate_label_table(labels)
    except TCURLoRAError as exc:
        raise InputError(where, str(exc)) from None


def check_checkpoint(checkpoint: dict, where: PathLike) -> Tuple[Optional[str], Optional[str], Optional[Tuple[int, ...]]]:
    """``(configuration, trainer name, mirroring axes)`` a checkpoint records, once their types are checked
    (None where it records none)."""
    weights = checkpoint["network_weights"]
    if not all(isinstance(k, str) for k in weights):
        raise InputError(where, "network_weights must map parameter names to tensors")
    init_args = checkpoint.get("init_args")
    configuration = init_args.get("configuration") if isinstance(init_args, dict) else None
    if configuration is not None and not (isinstance(configuration, str) and 0 < len(configuration) <= MAX_NAME):
        raise InputError(where, f"init_args configuration must be a configuration name, got {_show(configuration)}")
    trainer = checkpoint.get("trainer_name")
    if trainer is not None and not (isinstance(trainer, str) and 0 < len(trainer) <= MAX_NAME
                                    and not unsafe_character(trainer)):
        raise InputError(where, f"trainer_name must be a name, got {_show(trainer)}")
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    if axes is not None:
        if not (isinstance(axes, (list, tuple)) and len(axes) <= 3 and all(_is_int(a) and 0 <= a <= 2 for a in axes)
                and len(set(axes)) == len(axes)):
            raise InputError(where, f"inference_allowed_mirroring_axes must be null or distinct axes 0, 1, 2, "
                                    f"got {_show(axes)}")
        axes = tuple(axes)
    return configuration, trainer, axes


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], transpose_forward: Sequence[int],
                    target_spacing: Sequence[float]) -> List[int]:
    """The grid nnU-Net's preprocessor resamples an image of array ``shape`` and ``spacing`` (the reader's
    order) to, before the crop to its non-zero box (which only makes it smaller): nnU-Net's
    ``compute_new_shape`` after ``transpose_forward``, computed without its integer overflow."""
    shape_t = [int(shape[i]) for i in transpose_forward]
    spacing_t = [float(spacing[i]) for i in transpose_forward]
    return [max(1, int(round(s / t * n))) for s, t, n in zip(spacing_t, target_spacing, shape_t)]


def check_case_grid(where: PathLike, shape: Sequence[int], spacing: Sequence[float], plans_manager,
                    configuration_manager, classes: Optional[int] = None, window: int = 0) -> None:
    """Refuse an image whose grid at the plans' spacing this machine cannot hold: for training
    (``classes`` None) the preprocessed case, for inference (``classes``: output channels) the predictor's
    input, class logits and one sliding window."""
    if not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise InputError(where, f"has an invalid voxel spacing {_show(tuple(spacing))}")
    grid = resampled_shape(shape, spacing, plans_manager.transpose_forward, configuration_manager.spacing)
    what = "the image at the model's spacing"
    if classes is None:
        check_grid(where, what, grid, PREPROCESSED_BYTES_PER_VOXEL)
    else:
        check_bytes(where, f"{what} ({size_text(grid)} voxels, {classes} classes)",
                    segmentation_bytes(grid, classes, window), "crop or downsample it, or free memory")


__all__ = ["check_plans_file", "check_configuration", "check_checkpoint", "check_label_names", "check_case_grid",
           "resampled_shape", "RESAMPLING_ARGUMENTS"]
