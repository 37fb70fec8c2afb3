"""The modules a tuner puts into a model: the stack (trainable core + frozen Fourier factors), the layer
wrapper that adds the active adapter's Δ𝒲 slice to a Linear/Conv/ConvTranspose weight, the norm wrapper that
scales and shifts a normalisation layer's output per channel (SSF), and the switch that runs the active
adapter's own copy of a fully trained module (decoder, new head).

Every wrapper holds its stacks/copies as submodules, so ``model.parameters()``, ``model.to()``, deep copies
and ``state_dict()`` see them, and nothing is added to the model's root.
"""

from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TCURLoRAError
from ..protocol import REFERENCE_RANK
from ..tensor import irfft3, rfft3, select_indices, t_orthonormal_columns, t_pinv, t_transpose
from . import fourier

CORES = "tcurlora_cores"  # attribute of a wrapped layer holding its stacks, per adapter
COPIES = "tcurlora_copies"  # attribute of a switch holding the adapters' module copies
NORMS = "tcurlora_norms"  # attribute of a norm wrapper holding each adapter's scale and shift
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # channel-first norms: BatchNorm, InstanceNorm, GroupNorm
WEIGHTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d)


class AdapterError(TCURLoRAError, ValueError):
    """The adapter does not fit the model (wrong modules, shapes, or state)."""


def weight_to_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as the n1×n2 matrix that goes into a stack (out × in·k³ for convolutions)."""
    if isinstance(module, nn.Linear):
        return weight
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return weight.transpose(0, 1).reshape(weight.shape[1], -1)  # (in, out, k…) -> out × in·k³
    return weight.reshape(weight.shape[0], -1)


def matrix_to_weight(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_to_matrix` for ``module``'s weight shape."""
    shape = module.weight.shape
    if isinstance(module, nn.Linear):
        return matrix
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return matrix.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    return matrix.reshape(shape)


def projectable_kind(module: nn.Module) -> Optional[str]:
    """``"linear"`` or ``"conv"`` when the layer's core gradient can come straight from activations
    (:class:`_ProjectedLayer`): Linear, and plain convolutions (one group, zero padding), whose dL/dW is a sum of
    output-gradient × input-patch products; else None (transposed convolutions: measured slower that way)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if (isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd)
            and module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)):
        return "conv"
    return None


def slot(adapter: str) -> str:
    """An adapter's key in the wrappers' ModuleDicts ('train', 'eval'… are attributes of every module)."""
    return f"adapter_{adapter}"


def _keep(tensor):  # identity saved-tensor hook: see TCURStack.delta_w
    return tensor


class TCURStack(nn.Module):
    """One stack: the trainable core Δ𝒰 (K, r, r) and the frozen Fourier factors of 𝒞 and ℛ.

    The factors are plain attributes, not buffers: they follow the core's device but never its dtype
    (``model.half()`` must not round them; ``torch.fft`` has no half kernels), and never enter a state dict.
    """

    def __init__(self, name: str, members: list, matrices: torch.Tensor, rank: int,
                 selection: str = "deterministic", seed: int = 0, scale: float = 1.0,
                 indices: Optional[Tuple[List[int], List[int]]] = None, projectable: Optional[str] = None,
                 basis: str = "cur", rank_stable: bool = False) -> None:
        super().__init__()
        k, n1, n2 = matrices.shape
        # stored indices carry the stack's own rank (a rank budget gives stacks different ones)
        rank = min(int(rank) if indices is None else len(indices[0]), n1, n2)
        self.name, self.members, self.k, self.n1, self.n2, self.rank = name, members, k, n1, n2, rank
        # rank-stable (rsLoRA's reasoning): Adam moves each of the r² core entries by about the rate, and a core of
        # such entries acts on a direction with a gain of about sqrt(r); 1/sqrt(r), normalised to the reference
        # rank, keeps a step's effect on the layer what it is at rank 8, whatever rank the stack has
        self.scale = float(scale) * (math.sqrt(REFERENCE_RANK / rank) if rank_stable else 1.0)
        w = matrices.detach().float()
        if indices is None:
            cols, rows = select_indices(w, rank, selection, torch.Generator().manual_seed(int(seed)))
        else:
            cols, rows = (torch.as_tensor(i, dtype=torch.long) for i in indices)
            if (len(cols) != rank or len(rows) != rank or int(cols.min()) < 0 or int(rows.min()) < 0
                    or int(cols.max()) >= n2 or int(rows.max()) >= n1):
                raise AdapterError(f"stack {name}: stored indices do not fit a {n1}×{n2} rank-{rank} stack")
        self.cols, self.rows = cols.cpu().clone(), rows.cpu().clone()
        c = w[:, :, cols.to(w.device)]  # (K, n1, r)
        r = w[:, rows.to(w.device), :]  # (K, r, n2)
        self.basis = basis
        if basis == "orthonormal":  # the same spans, orthonormal per Fourier slice (see TCURLoRAConfig.basis)
            c = t_orthonormal_columns(c)
            r = t_transpose(t_orthonormal_columns(t_transpose(r)))
        factors = {"c_block": fourier.real_block(rfft3(c)), "r_hat": rfft3(r),
                   "idft": fourier.inverse_dft_matrix(k).to(w.device)}
        # Projected gradient (Linear and plain conv members): contract dL/dW_k with 𝒞, ℛ straight from
        # activations instead of forming the dense n1×n2 weight gradient, whose path also pays a K·n1·n2 FFT,
        # a stack of the K slice gradients and a Fourier-domain bmm per stack (hence the 1.5 margin). Linear:
        # per token (n1 + n2)·K·r against n1·n2, true for the paper's MLP and attention stacks at r = 8. Conv:
        # a weight gradient with K·r output channels instead of n1, on a CPU no cheaper while reading the input
        # dominates (measured: 0.04 vs 0.07 s at 32 channels, K·r = 16, 64³; 0.09 vs 0.07 s at K·r = 32; 0.23 vs
        # 0.21 s at 16 channels, K·r = 8, 128³). Allowing K·r up to half of n1 changed no whole deepbet step
        # beyond noise, so it stays at a quarter. Other stacks go the dense way.
        rk = rank * k
        self.projected = ((projectable == "linear" and (n1 + n2) * rk + rk * rk <= 1.5 * n1 * n2)
                          or (projectable == "conv" and 4 * rk <= n1))
        if self.projected:
            a = torch.arange(k, device=w.device)
            factors.update(c_flat=c.permute(1, 0, 2).reshape(n1, rk).contiguous(),
                           r_flat=r.reshape(rk, n2).contiguous(),
                           # grad ΔU_b = Σ_a H[a, (k_layer - a - b) mod K]; the index per (layer, a, b)
                           shift=(a[:, None, None] - a[None, :, None] - a[None, None, :]) % k)
        self._factors: Dict[str, torch.Tensor] = factors
        self.delta_u = nn.Parameter(torch.zeros(k, rank, rank, device=w.device))
        self._tuner = None  # set by the tuner: owner of the shared work buffer
        self.clear_cache()

    def factor(self, name: str) -> torch.Tensor:
        return self._factors[name]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.delta_u.device
        self._factors = {key: value.to(device) for key, value in self._factors.items()}
        self.clear_cache()
        return self

    def u0(self) -> torch.Tensor:
        """𝒰₀ = t-pinv(𝒲(J, I, :)), recomputed from 𝒞 (only for reporting 𝒰 = 𝒰₀ + Δ𝒰; the CUR basis only)."""
        if self.basis != "cur":
            raise AdapterError(f"stack {self.name}: 𝒰₀ exists in the CUR basis only, not the {self.basis} one")
        block = self._factors["c_block"]
        c_hat = torch.complex(block[:, :self.n1, :self.rank], block[:, self.n1:, :self.rank])
        return t_pinv(irfft3(c_hat, self.k)[:, self.rows.to(block.device), :])

    def describe(self) -> dict:
        return {"name": self.name, "shape": [self.n1, self.n2], "k": self.k, "rank": self.rank,
                "members": [m.to_dict() for m in self.members],
                "I": self.cols.tolist(), "J": self.rows.tolist(), "projected_gradient": bool(self.projected)}

    # -- Δ𝒲 ----------------------------------------------------------------------------------------

    def _core_unchanged(self, snapshot) -> bool:
        # Compared by value, not by ``_version``: fused optimisers and ``.data`` writes leave the version alone.
        if snapshot is None:
            return False
        scale, core = snapshot
        du = self.delta_u
        return scale == self.scale and core.device == du.device and core.dtype == du.dtype and torch.equal(core, du)

    def _snapshot(self):
        return self.scale, self.delta_u.detach().clone()

    def delta_w(self, detached: bool = False) -> torch.Tensor:
        """Δ𝒲 as one (K, n1, n2) fp32 tensor, built once and reused until the core changes.

        With autograd the tensor belongs to a graph: it is reused by every member layer and by activation
        checkpointing's recomputation, and dropped once a backward pass has gone through it (so the next
        forward builds a fresh graph; gradient accumulation and direct calls of submodules just work).
        Detached (no autograd: the projected-gradient path, merging, inference) it is written into a buffer
        the stack keeps, so a training step allocates nothing large; a projected layer's backward reads the
        same buffer, and autograd's version check refuses a backward whose Δ𝒲 was rewritten meanwhile.
        """
        if not detached and torch.is_grad_enabled() and self.delta_u.requires_grad:
            if self._grad is None or not self._core_unchanged(self._grad_snapshot):
                # Saved outside any activation-checkpointing region the first user may sit in: the build is
                # not part of that region, so recomputation reads this cache instead of rebuilding.
                with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                    built = self._build(grad=True)
                self._grad, self._grad_slices, self._grad_snapshot = built, built.unbind(0), self._snapshot()
                owner = weakref.ref(self)
                token = self._grad_token = object()

                def _backward_done(grad, owner=owner, token=token):
                    stack = owner()
                    if stack is not None and stack._grad_token is token:
                        stack._drop_grad()
                    return grad

                built.register_hook(_backward_done)
            return self._grad
        if (self._detached is None or self._detached.device != self.delta_u.device
                or not self._core_unchanged(self._detached_snapshot)):
            self._detached = self._build(grad=False)
            self._detached_snapshot = self._snapshot()
        return self._detached

    def member_slices(self) -> Tuple[torch.Tensor, ...]:
        """The K slices of the autograd Δ𝒲 from one ``unbind``: its backward stacks the K slice gradients
        once, where indexing the tensor per member would allocate and fill a (K, n1, n2) gradient each."""
        self.delta_w(detached=False)
        return self._grad_slices

    def projects_gradient(self) -> bool:
        """Whether the core trains through the projected gradient now: then the layers read the detached Δ𝒲."""
        return self.projected and torch.is_grad_enabled() and self.delta_u.requires_grad

    def _build(self, grad: bool) -> torch.Tensor:
        device = self.delta_u.device
        # fp32 outside autocast: torch.fft has no bf16, and the product must not drop to bf16 either
        with torch.set_grad_enabled(grad), torch.autocast(device.type, enabled=False):
            du = self.delta_u.float()
            if self.scale != 1.0:
                du = du * self.scale
            f = self._factors
            if grad:
                return fourier.delta_w(du, f["c_block"], f["r_hat"], f["idft"])
            if self._buffer is None or self._buffer.device != device:
                self._buffer = torch.empty(self.k, self.n1, self.n2, device=device)
            work = None
            if self._tuner is not None:
                work = self._tuner.work_buffer((f["c_block"].shape[0], 2 * self.n1, self.n2), device)
            return fourier.delta_w(du, f["c_block"], f["r_hat"], f["idft"], out=self._buffer, work=work)

    def _drop_grad(self) -> None:
        self._grad, self._grad_slices, self._grad_snapshot, self._grad_token = None, None, None, None

    def clear_cache(self) -> None:
        """Drop the cached Δ𝒲 and its buffer (after merging, switching adapters, or to free memory)."""
        self._drop_grad()
        self._detached, self._detached_snapshot, self._buffer = None, None, None


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``layer``'s operation with another weight (and bias)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.dim() - 2]
        return conv(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation)
    return layer._conv_forward(x, weight, bias)


class _ProjectedLayer(torch.autograd.Function):
    """y = layer(x; W + ΔW) whose backward gives Δ𝒰 its gradient without the dense dL/dW.

    Linear: dL/dW = Gᵀ X, so Cᵀ dL/dW Rᵀ = (G C)ᵀ (X Rᵀ). A convolution's dL/dW is the same sum over output
    positions with X's rows the input patches: (G C)ᵀ X is the weight gradient of a convolution with K·r output
    channels whose output gradient is G C, then times Rᵀ. ``blocks``: (member index k, first row, last row) of
    each stack member in this layer's weight (a fused qkv projection holds three); all from one stack.
    """

    @staticmethod
    def forward(ctx, x, delta_u, weight, delta, bias, layer, stack, blocks):  # noqa: D401
        ctx.stack, ctx.blocks, ctx.layer = stack, blocks, layer
        # keep W (the frozen parameter) and ΔW (a view of the stack's buffer), not their sum: the sums of
        # all layers would stay alive from forward to backward (0.34 GB fp32 for a ViT-B)
        ctx.save_for_backward(x, weight, delta)
        ctx.has_bias = bias is not None and bias.requires_grad
        effective = (weight + delta.to(weight.dtype)).to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        return _apply(layer, x, effective, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, delta = ctx.saved_tensors
        stack: TCURStack = ctx.stack
        layer = ctx.layer
        # W + ΔW only for the input gradient (the first layer of a network needs none); in the dtype the forward
        # ran in (bf16 under autocast, whatever the dtype of x: a norm layer before hands autocast fp32 inputs)
        effective = (weight + delta.to(weight.dtype)) if ctx.needs_input_grad[0] else weight
        effective = effective.to(grad_out.dtype)
        grad_x = grad_u = grad_b = None
        c_flat = stack.factor("c_flat")
        heads = []  # H per member block: (dL/dY · C)ᵀ (X · Rᵀ), (K·r, K·r)
        if isinstance(layer, nn.Linear):
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[0]:
                grad_x = (g2 @ effective).reshape(x.shape)
            if ctx.has_bias:
                grad_b = g2.sum(0)
            if ctx.needs_input_grad[1]:
                xr = x.reshape(-1, stack.n2).float() @ stack.factor("r_flat").t()
                heads = [(g2[:, start:stop].float() @ c_flat).t() @ xr for _, start, stop in ctx.blocks]
        else:
            x_in = x.to(grad_out.dtype)
            # input (and bias) gradient in one call, the weight gradient not asked for
            grad_x, _, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x_in, effective, [grad_out.shape[1]] if ctx.has_bias else None, layer.stride,
                layer.padding, layer.dilation, False, [0] * (x.dim() - 2), layer.groups,
                [ctx.needs_input_grad[0], False, ctx.has_bias])
            if grad_x is not None:
                grad_x = grad_x.to(x.dtype)
            if ctx.needs_input_grad[1]:
                # H = ((G C)ᵀ X) Rᵀ through the weight-gradient kernel with K·r output channels: faster on a
                # CPU than convolving x with ℛ's rows as kernels, (G C) (X Rᵀ) (nnU-Net's 64→32 conv at 80×48×80,
                # batch 2: 0.18 s against 0.23 s; its dense weight gradient 0.48 s)
                spatial = x.dim() - 2
                rk = c_flat.shape[1]
                for _, start, stop in ctx.blocks:
                    g = grad_out[:, start:stop]
                    gc = torch.matmul(c_flat.t().to(g.dtype), g.reshape(*g.shape[:2], -1)).view(-1, rk, *g.shape[2:])
                    _, grad_w, _ = torch.ops.aten.convolution_backward(
                        gc, x_in, x_in.new_empty(()).expand(rk, *weight.shape[1:]), None, layer.stride,
                        layer.padding, layer.dilation, False, [0] * spatial, layer.groups, [False, True, False])
                    heads.append(grad_w.reshape(rk, -1).float() @ stack.factor("r_flat").t())
        if ctx.needs_input_grad[1]:
            for (index, _, _), h in zip(ctx.blocks, heads):
                g = fourier.core_grad_from_h(h, stack.factor("shift")[index], stack.k, stack.rank)
                grad_u = g if grad_u is None else grad_u + g
            if stack.scale != 1.0:
                grad_u = grad_u * stack.scale
            grad_u = grad_u.to(stack.delta_u.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(layer.bias.dtype)
        return grad_x, grad_u, None, None, grad_b, None, None, None


class TCURLayer(nn.Module):
    """Wraps a Linear/Conv/ConvTranspose layer; adds the active adapter's Δ𝒲 slice to its weight.

    The same wrapper replaces the layer under every name the model reaches it by (aliases), so an adapter
    can never be inert on one of them.
    """

    def __init__(self, base_layer: nn.Module, tuner) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tuner = tuner
        setattr(self, CORES, nn.ModuleDict())  # adapter -> stack name -> stack (shared with the other members)
        # adapter -> (stack, member index, rows) of each block of this weight, in row order
        self._entries: Dict[str, List[Tuple[TCURStack, int, Optional[Tuple[int, int]]]]] = {}
        self._merge_backup: Optional[torch.Tensor] = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def add_entry(self, adapter: str, stack: TCURStack, index: int, rows: Optional[Tuple[int, int]]) -> None:
        cores = getattr(self, CORES)
        if slot(adapter) not in cores:
            cores[slot(adapter)] = nn.ModuleDict()
        cores[slot(adapter)][stack.name] = stack
        self._entries.setdefault(adapter, []).append((stack, index, rows))
        self._entries[adapter].sort(key=lambda e: (e[2] or (0, 0))[0])

    def remove_adapter(self, adapter: str) -> None:
        self._entries.pop(adapter, None)
        cores = getattr(self, CORES)
        if slot(adapter) in cores:
            del cores[slot(adapter)]

    def delta_weight(self, adapter: str, detached: bool = False) -> Optional[torch.Tensor]:
        entries = self._entries.get(adapter)
        if not entries:
            return None
        detached = detached or not torch.is_grad_enabled()
        base = self.base_layer
        n_rows = weight_to_matrix(base, base.weight).shape[0]
        stack, first = entries[0][0], entries[0][1]
        if detached and all(e[0] is stack and e[1] == first + i and (e[2] or (0, n_rows))[0] == i * stack.n1
                            for i, e in enumerate(entries)) and len(entries) * stack.n1 == n_rows:
            # consecutive members that tile the weight (a fused qkv): a view of the stack's Δ𝒲, no copy
            matrix = stack.delta_w(detached=True)[first:first + len(entries)].reshape(n_rows, stack.n2)
            return matrix_to_weight(base, matrix)
        pieces, cursor = [], 0
        for stack, index, rows in entries:
            frozen = detached or not stack.delta_u.requires_grad  # a frozen core has no graph to slice
            block = stack.delta_w(detached=True)[index] if frozen else stack.member_slices()[index]
            start, stop = rows or (0, n_rows)
            if start > cursor:  # rows of a fused layer that are in no stack stay frozen
                pieces.append(block.new_zeros(start - cursor, block.shape[1]))
            pieces.append(block)
            cursor = stop
        if cursor < n_rows:
            pieces.append(pieces[-1].new_zeros(n_rows - cursor, pieces[-1].shape[1]))
        matrix = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        return matrix_to_weight(base, matrix)

    def merge(self, adapter: str) -> None:
        delta = self.delta_weight(adapter, detached=True)
        if delta is not None:
            weight = self.base_layer.weight
            self._merge_backup = weight.detach().clone()
            weight.data.add_(delta.to(weight.dtype))

    def unmerge(self) -> None:
        if self._merge_backup is not None:
            self.base_layer.weight.data.copy_(self._merge_backup)
            self._merge_backup = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tuner = self._tuner
        active = tuner.active
        if active is None or tuner.merged == active or active not in self._entries:
            return self.base_layer(x)
        entries = self._entries[active]
        base = self.base_layer
        stack = entries[0][0]
        if stack.projects_gradient() and all(e[0] is stack for e in entries):  # one stack: Linear or plain conv
            n_rows = weight_to_matrix(base, base.weight).shape[0]
            blocks = tuple((i, *(rows or (0, n_rows))) for _, i, rows in entries)
            return _ProjectedLayer.apply(x, stack.delta_u, base.weight, self.delta_weight(active, detached=True),
                                         base.bias, base, stack, blocks)
        delta = self.delta_weight(active)
        return _apply(base, x, base.weight + delta.to(base.weight.dtype), base.bias)


class ModuleSwitch(nn.Module):
    """A module trained fully by some adapters (decoder, new head): runs the active adapter's copy."""

    def __init__(self, base_module: nn.Module, tuner) -> None:
        super().__init__()
        self.base_module = base_module
        self._tuner = tuner
        setattr(self, COPIES, nn.ModuleDict())  # adapter -> its own copy

    def copy_of(self, adapter: Optional[str]) -> Optional[nn.Module]:
        copies = getattr(self, COPIES)
        return copies[slot(adapter)] if adapter is not None and slot(adapter) in copies else None

    def set_copy(self, adapter: str, module: Optional[nn.Module]) -> None:
        copies = getattr(self, COPIES)
        if module is not None:
            copies[slot(adapter)] = module
        elif slot(adapter) in copies:
            del copies[slot(adapter)]

    def forward(self, *args, **kwargs):
        module = self.copy_of(self._tuner.active) or self.base_module
        return module(*args, **kwargs)


class ScaleShift(nn.Module):
    """One adapter's per-channel scale (starts at 1) and shift (starts at 0) of a norm layer's output."""

    def __init__(self, channels: int, device=None) -> None:
        super().__init__()
        self.norm_scale = nn.Parameter(torch.ones(channels, device=device))
        self.norm_shift = nn.Parameter(torch.zeros(channels, device=device))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.norm_scale.to(y.dtype).view(shape) + self.norm_shift.to(y.dtype).view(shape)


def norm_channels(norm: nn.Module) -> int:
    return int(norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features)


def norm_has_affine(norm: nn.Module) -> bool:
    return getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None


class NormScaleShift(nn.Module):
    """Wraps a normalisation layer; scales and shifts its output per channel with the active adapter's values (SSF).

    Merging writes them into the norm's own affine parameters (weight·γ, bias·γ + β; the exact values are kept
    aside). A norm without affine parameters has none to write into: merged, the wrapper goes on applying them,
    and unloaded it becomes the same norm with affine parameters holding γ and β (see :meth:`plain`).
    """

    def __init__(self, base_layer: nn.Module, tuner) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tuner = tuner
        setattr(self, NORMS, nn.ModuleDict())  # adapter -> its ScaleShift
        self._merge_backup: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def pair(self, adapter: Optional[str]) -> Optional[ScaleShift]:
        pairs = getattr(self, NORMS)
        return pairs[slot(adapter)] if adapter is not None and slot(adapter) in pairs else None

    def add(self, adapter: str) -> ScaleShift:
        pair = ScaleShift(norm_channels(self.base_layer), device=next(self.base_layer.buffers(), torch.empty(0)).device)
        getattr(self, NORMS)[slot(adapter)] = pair
        return pair

    def remove_adapter(self, adapter: str) -> None:
        pairs = getattr(self, NORMS)
        if slot(adapter) in pairs:
            del pairs[slot(adapter)]

    def merge(self, adapter: str) -> None:
        pair = self.pair(adapter)
        if pair is None or not norm_has_affine(self.base_layer):
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        self._merge_backup = (weight.detach().clone(), bias.detach().clone())
        scale, shift = pair.norm_scale.detach().to(weight.dtype), pair.norm_shift.detach().to(bias.dtype)
        bias.data.mul_(scale).add_(shift)
        weight.data.mul_(scale)

    def unmerge(self) -> None:
        if self._merge_backup is not None:
            self.base_layer.weight.data.copy_(self._merge_backup[0])
            self.base_layer.bias.data.copy_(self._merge_backup[1])
            self._merge_backup = None

    def plain(self, adapter: Optional[str]) -> nn.Module:
        """The module a merged model runs here without the wrapper: the norm itself (``adapter``'s values merged
        into its affine parameters, or none), or, for a norm without affine parameters, its affine twin holding
        them (its state dict then has a ``weight`` and ``bias`` the base's lacks)."""
        norm, pair = self.base_layer, self.pair(adapter)
        self._merge_backup = None
        if pair is None or norm_has_affine(norm):
            return norm
        if getattr(self, "_twin", None) is not None:  # a norm the model holds under two names stays one module
            return self._twin
        if isinstance(norm, nn.GroupNorm):
            twin = nn.GroupNorm(norm.num_groups, norm.num_channels, norm.eps, affine=True)
        else:
            twin = type(norm)(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=True,
                              track_running_stats=norm.track_running_stats)
            if norm.track_running_stats:
                twin.load_state_dict(norm.state_dict(), strict=False)
        twin.train(norm.training)
        with torch.no_grad():
            device = pair.norm_scale.device
            twin.to(device)
            twin.weight.copy_(pair.norm_scale)
            twin.bias.copy_(pair.norm_shift)
        self._twin = twin
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tuner = self._tuner
        pair = self.pair(tuner.active)
        y = self.base_layer(x)
        if pair is None or (tuner.merged == tuner.active and self._merge_backup is not None):
            return y
        return pair(y)


WRAPPERS = (TCURLayer, ModuleSwitch, NormScaleShift)


def unwrap(module: nn.Module) -> nn.Module:
    """The base model's module behind any wrappers."""
    while isinstance(module, WRAPPERS):
        module = module.base_module if isinstance(module, ModuleSwitch) else module.base_layer
    return module
