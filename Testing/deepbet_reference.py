"""deepbet's own inference pipeline (its ``run_model`` + postprocess) re-expressed on the eager LinkNet3d: the
reference the zero-shot tests compare against. Test code, not shipped in ``tcurlora``."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from tcurlora.models.deepbet import (DEEPBET_PREPROCESSING, _largest_component, _resize, deepbet_normalize,
                                     deepbet_roi)


def deepbet_segment(image: np.ndarray, affine: Optional[np.ndarray], model: nn.Module,
                    bbox_model: Optional[nn.Module] = None,
                    roi: Union[str, Tuple[slice, slice, slice]] = "localizer",
                    threshold: Optional[float] = None, return_probabilities: bool = False
                    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Brain mask (uint8, on ``image``'s grid) following :data:`DEEPBET_PREPROCESSING`.

    ``roi``: "localizer" (deepbet's default, needs ``bbox_model``), "full" (whole volume, no
    localiser), or explicit slices in the RAS-reoriented array. ``affine`` None = already RAS.
    """
    import nibabel as nib

    spec = DEEPBET_PREPROCESSING
    thr = spec["threshold"] if threshold is None else float(threshold)
    img = np.asarray(image)
    while img.ndim > 3 and img.shape[-1] == 1:
        img = img[..., 0]
    ornt = None
    if affine is not None:
        ornt = nib.orientations.io_orientation(np.asarray(affine))
        img = nib.orientations.apply_orientation(img, ornt)
    device = next(model.parameters()).device
    x = torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(device))
    small = _resize(x, spec["roi"]["localizer_input_shape"])
    lo_pct, hi_pct = spec["intensity"]["percentiles"]
    low, high = small.quantile(lo_pct / 100.0), small.quantile(hi_pct / 100.0)

    if isinstance(roi, str):
        if roi == "localizer":
            if bbox_model is None:
                raise ValueError("roi='localizer' needs bbox_model (load_deepbet(variant='bbox'))")
            box = deepbet_roi(bbox_model, x, low, high)
        elif roi == "full":
            box = tuple(slice(0, n) for n in x.shape)
        else:
            raise ValueError(f"unknown roi {roi!r}")
    else:
        box = tuple(roi)

    crop = x[box]
    net_in = deepbet_normalize(_resize(crop, spec["patch_size"]), low, high)
    with torch.no_grad():
        p = torch.softmax(model(net_in[None, None]), 1)[0, spec["output"]["channel"]]
    prob = torch.zeros_like(x)
    prob[box] = _resize(p, crop.shape)
    prob_np = prob.cpu().numpy()

    from scipy import ndimage

    mask = np.zeros(prob_np.shape, dtype=bool)
    inner = prob_np[box] > thr
    if inner.any():
        inner = _largest_component(inner)
        inner = ndimage.binary_fill_holes(inner)
    mask[box] = inner
    if ornt is not None:
        inv = nib.orientations.ornt_transform([[0, 1], [1, 1], [2, 1]], ornt)
        mask = nib.orientations.apply_orientation(mask, inv)
        prob_np = nib.orientations.apply_orientation(prob_np, inv)
    mask = np.ascontiguousarray(mask.astype(np.uint8))
    if return_probabilities:
        return mask, np.ascontiguousarray(prob_np)
    return mask
