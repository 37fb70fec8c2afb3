"""The PEFT methods the tCURLoRA paper compares against, through the same tuner, files and training code.

``pissa``    HF PEFT's PiSSA (LoRA initialised to the top-r singular triplets, residual left in the base) on
             the ``lora`` target layers.  PEFT initialises PiSSA on Linear layers only; on Conv layers the same
             rule is applied here to the out × in·k³ matrix (PEFT's conv LoRA is B · A of that matrix).
``dora``     HF PEFT's DoRA (``use_dora=True``) on the ``lora`` target layers (PEFT 0.21 covers Linear and
             Conv1d/2d/3d; ConvTranspose has no LoRA in PEFT at all).
``curlora``  CURLoRA (arXiv 2408.14572): per layer ΔW = C U R with columns and rows drawn by inverted
             probability (:func:`tcurlora.tensor.curlora_indices`, seeded), U trainable from 0: a tCURLoRA
             stack of one member (K = 1) with those indices computes exactly that.
``lorapt``   LoRA-PT (arXiv 2407.11292): t-SVD of the tCURLoRA stacks; the top-r tubal components 𝒜 * ℬ
             train, the residual stays frozen (:class:`TSVDStack`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..config import TCURLoRAConfig
from ..tensor import curlora_indices, rfft3, t_svd_factors
from . import fourier
from .layers import TCURStack
from .stacks import Member, StackSpec, member_matrix, resolve_stacks
from .registry import register_strategy
from .strategies import LoraStrategy, Strategy


# ------------------------------------------------------------------------------------------------
# PEFT's PiSSA and DoRA


@register_strategy
class PissaStrategy(LoraStrategy):
    """PiSSA: the adapter starts as the principal part of each weight, the base keeps the residual.

    The base weights change at injection, so (``trains_base``) the file records the fingerprint of the
    original base; loading onto that base reruns the (deterministic) SVD and then sets the trained factors.
    """

    method = "pissa"

    def initialise(self, tuner, record) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        layers = [layer for layer in self._lora_layers(tuner) if record.name in layer.lora_A]
        # kept for remove(): a failed load or a deleted adapter must leave the original weights, not the residual
        record.base_backup = [(p, p.detach().clone()) for p in (layer.get_base_layer().weight for layer in layers)]
        for layer in layers:
            if isinstance(layer, LoraLinear):
                layer.pissa_init(record.name, "pissa")  # PEFT's own
            else:
                _pissa_init_conv(layer, record.name)

    def remove(self, tuner, record) -> None:
        with torch.no_grad():
            for weight, value in record.base_backup:
                weight.data = value  # PEFT's pissa_init replaced the tensor: put the original back the same way
        record.base_backup = []
        super().remove(tuner, record)


def _pissa_init_conv(layer, adapter: str) -> None:
    """PEFT's ``pissa_init`` rule on a conv LoRA layer: B A = the top-r part of the out × in·k³ matrix."""
    base = layer.get_base_layer()
    weight = base.weight
    matrix = weight.detach().float().reshape(weight.shape[0], -1)
    r, scaling = layer.r[adapter], layer.scaling[adapter]
    v, s, uh = torch.linalg.svd(matrix, full_matrices=False)
    s = s[:r] / scaling
    a = torch.diag(s.sqrt()) @ uh[:r]  # (r, in·k³): lora_A's conv kernel
    b = v[:, :r] @ torch.diag(s.sqrt())  # (out, r): lora_B's 1×…×1 kernel
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.no_grad():
        # a rank above the matrix's (a 4×16 kernel at r = 8): the components past it are zero, and stay so
        lora_a.zero_().view(r, -1)[:len(s)] = a
        lora_b.zero_().view(-1, r)[:, :len(s)] = b
        weight.copy_((matrix - scaling * b @ a).reshape(weight.shape).to(weight.dtype))


@register_strategy
class DoraStrategy(LoraStrategy):
    method = "dora"
    peft_options = {"use_dora": True}


# ------------------------------------------------------------------------------------------------
# CURLoRA


def _member_stack_name(member: Member) -> str:
    name = member.module.replace(".", "__")  # a ModuleDict key holds no dots
    return f"{name}__rows{member.rows[0]}_{member.rows[1]}" if member.rows else name


@register_strategy
class CurloraStrategy(Strategy):
    """One single-member stack per layer that tCURLoRA would stack (a fused qkv: one per q, k, v block)."""

    method = "curlora"

    def stack_specs(self, tuner, record):
        model, config = tuner.model, record.config
        generator = torch.Generator().manual_seed(config.seed)  # one draw per layer, in stack order
        built = []
        for spec in resolve_stacks(model, config):
            for member in spec.members:
                matrix = member_matrix(model, member)
                cols, rows = curlora_indices(matrix, min(config.rank, *matrix.shape), generator)
                built.append((StackSpec(_member_stack_name(member), [member]), (cols.tolist(), rows.tolist())))
        return built


# ------------------------------------------------------------------------------------------------
# LoRA-PT


class TSVDStack(TCURStack):
    """LoRA-PT's stack: the top-r tubal components 𝒜 (K, n1, r) and ℬ (K, r, n2) of the stacked weights train.

    ΔW = 𝒜 * ℬ − 𝒜₀ * ℬ₀ (the residual 𝒲 − 𝒜₀ * ℬ₀ stays frozen), built as Δ𝒜 * ℬ₀ + 𝒜 * Δℬ so that it is
    exactly zero at the start.  𝒜₀, ℬ₀ are recomputed from the base (the file stores the trained 𝒜, ℬ; the
    product 𝒜₀ * ℬ₀ does not depend on the phases an SVD picks).  The wrapper, merging and the Δ𝒲 cache are
    :class:`TCURStack`'s.
    """

    def __init__(self, name: str, members: list, matrices: torch.Tensor, rank: int, scale: float = 1.0) -> None:
        nn.Module.__init__(self)
        k, n1, n2 = matrices.shape
        rank = min(int(rank), n1, n2)
        self.name, self.members, self.k, self.n1, self.n2, self.rank = name, members, k, n1, n2, rank
        self.scale = float(scale)
        a0, b0 = t_svd_factors(matrices.detach().float(), rank)
        identity = torch.zeros(k, 2 * rank, 2 * rank, device=a0.device)
        identity[0] = torch.eye(2 * rank)  # its rfft is the identity in every slice: see _build
        self._factors: Dict[str, torch.Tensor] = {"a0": a0, "b0": b0, "b0_hat": rfft3(b0), "identity": identity,
                                                  "idft": fourier.inverse_dft_matrix(k).to(a0.device)}
        self.principal_left = nn.Parameter(a0.clone())  # 𝒜 = 𝒰_r * 𝒮_r^{1/2}
        self.principal_right = nn.Parameter(b0.clone())  # ℬ = 𝒮_r^{1/2} * 𝒱_rᵀ
        self.projected = False
        self._tuner = None
        self.clear_cache()

    @property
    def delta_u(self) -> torch.Tensor:
        """The tensor whose device and ``requires_grad`` :meth:`TCURStack.delta_w` follows (𝒜; ℬ goes with it)."""
        return self.principal_left

    def projects_gradient(self) -> bool:
        return False

    def _snapshot(self):
        return self.scale, (self.principal_left.detach().clone(), self.principal_right.detach().clone())

    def _core_unchanged(self, snapshot) -> bool:
        if snapshot is None:
            return False
        scale, cores = snapshot
        return scale == self.scale and all(
            c.device == p.device and c.dtype == p.dtype and torch.equal(c, p)
            for c, p in zip(cores, (self.principal_left, self.principal_right)))

    def _build(self, grad: bool) -> torch.Tensor:
        device = self.principal_left.device
        with torch.set_grad_enabled(grad), torch.autocast(device.type, enabled=False):
            f = self._factors
            a = self.principal_left.float()
            left = torch.cat([rfft3(a - f["a0"]), rfft3(a)], 2)  # [Δ𝒜̂, 𝒜̂] (F, n1, 2r)
            if self.scale != 1.0:
                left = left * self.scale
            right = torch.cat([f["b0_hat"], rfft3(self.principal_right.float() - f["b0"])], 1)  # [ℬ̂₀; Δℬ̂]
            # tCURLoRA's kernel irfft(Ĉ · (rfft(Δ𝒰) ℛ̂)) with Ĉ = [Δ𝒜̂, 𝒜̂], Δ𝒰 = the identity, ℛ̂ = [ℬ̂₀; Δℬ̂]
            c_block = fourier.real_block(left)
            if grad:
                return fourier.delta_w(f["identity"], c_block, right, f["idft"])
            if self._buffer is None or self._buffer.device != device:
                self._buffer = torch.empty(self.k, self.n1, self.n2, device=device)
            work = None
            if self._tuner is not None:
                work = self._tuner.work_buffer((c_block.shape[0], 2 * self.n1, self.n2), device)
            return fourier.delta_w(f["identity"], c_block, right, f["idft"], out=self._buffer, work=work)

    def describe(self) -> dict:
        return {"name": self.name, "shape": [self.n1, self.n2], "k": self.k, "rank": self.rank,
                "members": [m.to_dict() for m in self.members]}


@register_strategy
class LoraptStrategy(Strategy):
    """t-SVD stacks in place of tensor-CUR ones; listed as ``tsvd_stacks`` (they have no CUR indices)."""

    method = "lorapt"
    layout_key = "tsvd_stacks"

    def stored_spec(self, stack: dict) -> Tuple[StackSpec, None]:
        members = [Member(str(m["module"]), tuple(int(r) for r in m["rows"]) if m["rows"] else None)
                   for m in stack["members"]]
        if not members:
            raise ValueError(f"stack {stack['name']!r} has no members")
        return StackSpec(str(stack["name"]), members), None

    def make_stack(self, spec: StackSpec, matrices: torch.Tensor, config: TCURLoRAConfig, indices: Optional[tuple],
                   projectable: Optional[str]) -> TSVDStack:
        return TSVDStack(spec.name, spec.members, matrices, config.rank, config.scale)

