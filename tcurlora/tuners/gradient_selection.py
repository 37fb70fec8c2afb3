"""Columns and rows of 𝒲 chosen by their alignment with the task's first gradient (``selection="gradient"``).

The energy rule picks the columns and rows where 𝒲 is large; this one picks those between which a core would
receive the largest first gradient of the task's loss (:func:`tcurlora.tensor.gradient_aligned_indices`). The
gradient is that of the loss on a few training patches with respect to every stack member's weight, taken with
the adapter as it is at the start (its new head already started), so it needs training patches at injection:
``finetune`` computes the indices and the adapter file keeps them, and loading needs no gradient.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..tensor import gradient_aligned_indices
from .layers import weight_to_matrix
from .stacks import find, member_matrix


def first_gradients(network: nn.Module, record, patches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Stack name -> the (K, n1, n2) gradient of the loss summed over ``patches`` with respect to its members'
    weights (eval mode; every ``requires_grad`` flag and the mode are restored, and no ``.grad`` is written).

    Args:
        network: the adapted network.
        record: the adapter's :class:`~tcurlora.tuners.strategies.AdapterRecord` (its stacks).
        patches: (image, target) batches.
        loss: ``loss(logits, target)``.
    """
    stacks = list(record.stacks.values())
    modules = {m.module: find(network, m.module) for s in stacks for m in s.members}
    weights = list({id(mod.weight): mod.weight for mod in modules.values()}.values())
    flags = [(p, p.requires_grad) for p in [*weights, *(s.delta_u for s in stacks)]]
    training = network.training
    total = [torch.zeros_like(w) for w in weights]
    try:
        for s in stacks:  # a core that needs no gradient takes the dense path, whose weight gradient we read
            s.delta_u.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        network.eval()
        device = weights[0].device
        with torch.enable_grad():
            for image, target in patches:
                logits = network(image.to(device))
                if isinstance(logits, (list, tuple)):
                    logits = logits[0]
                grads = torch.autograd.grad(loss(logits.float(), target.to(device).float()), weights, allow_unused=True)
                for acc, grad in zip(total, grads):
                    if grad is not None:
                        acc.add_(grad)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        network.train(training)
    by_weight = {id(w): g for w, g in zip(weights, total)}
    out = {}
    for s in stacks:
        mats = []
        for m in s.members:
            module = modules[m.module]
            matrix = weight_to_matrix(module, by_weight[id(module.weight)])
            mats.append(matrix[m.rows[0]:m.rows[1]] if m.rows else matrix)
        out[s.name] = torch.stack(mats)
    return out


def gradient_layout(network: nn.Module, record, patches, loss) -> List[dict]:
    """The adapter's stacks as an adapter file lists them, each with the columns and rows that align best with the
    first gradient (same members and ranks; see :func:`first_gradients` for the arguments)."""
    gradients = first_gradients(network, record, patches, loss)
    layout = []
    for name, stack in record.stacks.items():
        weights = torch.stack([member_matrix(network, m) for m in stack.members])
        cols, rows = gradient_aligned_indices(weights.float(), gradients[name].float(), stack.rank)
        layout.append({**stack.describe(), "I": cols.tolist(), "J": rows.tolist()})
    return layout
