"""Memory a grid or a network window will take, known before it is allocated.

Images, resampled images, the network input with its class probabilities, the sliding window and the
patches a base model declares are all checked here against the memory this machine has available, so a
crafted header, spacing or model config is refused with the figures (one line naming the file) instead of an
attempted allocation of terabytes (or, with swap, a workstation that stops answering).

:func:`forward_cost` needs torch; the rest is standard library plus psutil.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import Any, Sequence, Tuple, Union

from .errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

#: What a voxel of the model-space image costs while it is segmented: the float32 input, and per class
#: the float32 probabilities, their running sum and the logits of one pass.
INPUT_BYTES_PER_VOXEL = 4
PROBABILITY_BYTES_PER_VOXEL_AND_CLASS = 12
#: The module outputs alive at once in a forward pass are a lower bound of its peak: convolution workspaces
#: and tensors made between modules (concatenated skips) come on top.
ACTIVATION_MARGIN = 2


def available_memory() -> int:
    """Bytes of memory this machine can give a process now (free plus reclaimable caches)."""
    import psutil

    return int(psutil.virtual_memory().available)


def size_text(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


def voxel_count(size: Sequence[int]) -> int:
    return math.prod(max(int(s), 1) for s in size)


def check_bytes(where: PathLike, what: str, need: int, advice: str = "free memory") -> None:
    """Refuse (:class:`InputError` naming ``where``) when ``need`` bytes exceed the available memory."""
    have = available_memory()
    if need > have:
        raise InputError(where, f"{what} needs about {need / 2 ** 30:.1f} GB of memory, {have / 2 ** 30:.1f} GB is "
                                f"available; {advice}")


def check_grid(where: PathLike, what: str, size: Sequence[int], bytes_per_voxel: float,
               advice: str = "crop or downsample it, or free memory") -> None:
    """Refuse a grid of ``size`` voxels at ``bytes_per_voxel`` that this machine cannot hold, e.g.
    ``huge.nii: an image of 32767x32767x32767 voxels needs about 851890.0 GB of memory, 20.6 GB is available``."""
    check_bytes(where, f"{what} of {size_text(size)} voxels", int(voxel_count(size) * bytes_per_voxel), advice)


def segmentation_bytes(size: Sequence[int], classes: int, window: int = 0, windows_at_once: int = 1) -> int:
    """Memory of segmenting a model-space image of ``size``: the input, the class probabilities and
    ``windows_at_once`` sliding windows of ``window`` bytes each (see :func:`forward_cost`)."""
    per_voxel = INPUT_BYTES_PER_VOXEL + PROBABILITY_BYTES_PER_VOXEL_AND_CLASS * max(int(classes), 1)
    return voxel_count(size) * per_voxel + int(window) * max(int(windows_at_once), 1)


def forward_cost(network: Any, shape: Sequence[int]) -> Tuple[int, Any]:
    """``(peak bytes, output)`` of one forward pass of ``network`` on an input of ``shape`` (batch and channels
    first), without computing it: ``network`` lives on torch's ``meta`` device, where tensors have shapes but
    no storage, and the module outputs alive at once are tracked (times :data:`ACTIVATION_MARGIN`). The
    output is the network's, on the meta device (its shape tells the output channels).

    Raises whatever the forward pass raises for an input the network cannot take (a window that is not a
    multiple of its down-sampling, a wrong channel count).
    """
    import torch

    state = {"live": 0, "peak": 0}
    seen = set()

    def count(module, args, output):
        outputs = output if isinstance(output, (list, tuple)) else [output]
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:  # in-place modules return their input
                n = tensor.numel() * tensor.element_size()
                seen.add(id(tensor))
                state["live"] += n
                state["peak"] = max(state["peak"], state["live"])
                weakref.finalize(tensor, _release, state, seen, id(tensor), n)

    x = torch.empty(tuple(int(s) for s in shape), device="meta")
    hooks = [m.register_forward_hook(count) for m in network.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            output = network(x)
    finally:
        for hook in hooks:
            hook.remove()
    return (state["peak"] + x.numel() * x.element_size()) * ACTIVATION_MARGIN, output


def _release(state: dict, seen: set, key: int, n: int) -> None:
    state["live"] -= n
    seen.discard(key)
