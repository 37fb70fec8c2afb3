"""Where a new label's output channel starts: at its prototype (imprinting), so that training begins from a head
that already separates the label from the background in the base's last-decoder features.

A new head's label channel that starts as a copy of the background's (at a low prior, as
:func:`~tcurlora.tuners.heads.start_new_head` does) predicts nothing, and it sends the body no gradient:
for a two-channel softmax the feature gradient is w_bg·∂L/∂z_bg + w_label·∂L/∂z_label, and with equal weights
the two logit gradients cancel.  Training then waits for the head alone to pull the label channel away before
any adapter in the body learns (measured on deepbet: a body gradient of 1e-8 at the first step,
``benchmarks/diagnose_new_structure.py``).

The prototype start (the few-shot "imprinting" of a new class, Qi et al. 2018; prototypical networks, Snell
et al. 2017) puts the label channel at the linear discriminant along the direction between the mean feature
inside the training mask and the mean feature of the background: with d = μ_label − μ_background,
t(p) = ⟨d, φ(p)⟩ the feature of output voxel p projected on d, m and s² the two classes' means and mean
variance of t, the channel's log-odds against the background start as

    z_label − z_bg = a·(t − (m_label + m_bg)/2) + log(π / (1 − π)),  a = (m_label − m_bg) / s²,

the Gaussian (equal-variance) posterior along d with the label's share π of the voxels seen as its prior.
φ(p) is whatever the head's weight multiplies for output voxel p (the input voxel for a 1×1×1 convolution, the
input voxel at the right kernel offset for a transposed one, a patch for a k³ convolution): the sums of φ over
a mask are read off as the gradient of the head's summed output there, so every Linear / Conv / ConvTranspose
head is handled by one rule.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import _apply
from .heads import output_dim

#: patches the prototypes are measured on (drawn like training patches, without augmentation)
PROTOTYPE_PATCHES = 4
#: the label's prior share is kept inside these bounds (a label that fills a patch is no prior)
PRIOR_BOUNDS = (1e-4, 0.5)


def head_inputs(network: nn.Module, head: nn.Module, patches: Sequence[Tuple[torch.Tensor, torch.Tensor]]
                ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(the head's input, the patch's target) for each (image, target) patch, from the network as it is now
    (eval mode, no gradient; the mode is restored)."""
    captured: List[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, out: captured.append(args[0].detach()))
    training = network.training
    network.eval()
    out = []
    try:
        with torch.no_grad():
            for image, target in patches:
                captured.clear()
                network(image.to(head.weight.device))
                if captured:
                    out.append((captured[-1], target.to(head.weight.device)))
    finally:
        hook.remove()
        network.train(training)
    return out


def _masked_sums(head: nn.Module, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over the masked output voxels of φ(p), in the shape of one output channel's weight."""
    weight = head.weight.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = _apply(head, features, weight, None)
        (out.select(1, 0) * mask).sum().backward()
    return weight.grad.select(output_dim(head), 0)


def prototype_channel(head: nn.Module, inputs: Sequence[Tuple[torch.Tensor, torch.Tensor]], channel: int,
                      background: int = 0, ignore_index: int = -1) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) that start output ``channel`` of ``head`` at the label's prototype discriminant
    against channel ``background`` (see the module's text), or None when the patches hold no voxel of the
    label, or none of the background, or the head's output grid is not the target's.

    Args:
        head: the new head (Linear / Conv / ConvTranspose); its ``background`` channel is read, nothing written.
        inputs: (the head's input, target of channel indices) pairs, as :func:`head_inputs` returns.
        channel: the label's output channel (its index in the targets).
        background: the channel the label is scored against.
        ignore_index: target value of unannotated voxels (left out of both classes).
    """
    out_dim = output_dim(head)
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    for features, target in inputs:
        with torch.no_grad():
            shape = _apply(head, features[:1], head.weight, None).shape[2:]
        if tuple(shape) != tuple(target.shape[2:]):
            return None
        inside_mask = target[:, 0] == channel
        outside_mask = (target[:, 0] != ignore_index) & ~inside_mask
        for inside, mask in ((True, inside_mask), (False, outside_mask)):
            mask = mask.to(features.dtype)
            sums[inside] = sums[inside] + _masked_sums(head, features, mask)
            counts[inside] += int(mask.sum())
    if not counts[True] or not counts[False]:
        return None
    direction = sums[True] / counts[True] - sums[False] / counts[False]
    if not float(direction.norm()) > 0:
        return None
    weight_d = torch.zeros_like(head.weight)
    weight_d.select(out_dim, 0).copy_(direction)
    values = {True: [], False: []}
    with torch.no_grad():
        for features, target in inputs:
            t = _apply(head, features, weight_d, None)[:, 0]
            annotated = target[:, 0] != ignore_index
            values[True].append(t[target[:, 0] == channel])
            values[False].append(t[annotated & (target[:, 0] != channel)])
    t_in, t_out = torch.cat(values[True]).double(), torch.cat(values[False]).double()
    m_in, m_out = float(t_in.mean()), float(t_out.mean())
    variance = 0.5 * (float(t_in.var(unbiased=False)) + float(t_out.var(unbiased=False)))
    if not (m_in > m_out and variance > 0):
        return None
    slope = (m_in - m_out) / variance
    prior = min(max(counts[True] / (counts[True] + counts[False]), PRIOR_BOUNDS[0]), PRIOR_BOUNDS[1])
    offset = -slope * 0.5 * (m_in + m_out) + math.log(prior / (1 - prior))
    weight = head.weight.detach().select(out_dim, background) + slope * direction
    bias = head.bias.detach()[background] + offset if head.bias is not None else None  # no bias: no prior
    return weight, bias


def start_at_prototypes(network: nn.Module, head: nn.Module, channels: Sequence[int],
                        patches: Sequence[Tuple[torch.Tensor, torch.Tensor]], background: int = 0,
                        ignore_index: int = -1) -> List[int]:
    """Start each of ``channels`` of ``head`` at its prototype (:func:`prototype_channel`), measured on
    ``patches`` (model-space image and channel-index target, batch dimension first) forwarded through
    ``network``; a channel without a prototype keeps its start.  Returns the channels that were set."""
    inputs = head_inputs(network, head, patches)
    out_dim = output_dim(head)
    done = []
    for channel in channels:
        start = prototype_channel(head, inputs, channel, background, ignore_index)
        if start is None:
            continue
        weight, bias = start
        with torch.no_grad():
            head.weight.select(out_dim, channel).copy_(weight)
            if bias is not None:
                head.bias[channel] = bias
        done.append(channel)
    return done
