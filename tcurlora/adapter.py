"""tCURLoRA layers and the model-level injector (HF PEFT's config / layer / model split).

A *stack* is K same-shape weight matrices W_1..W_K (n1×n2) taken from K layers (or from parts of a
layer: a fused qkv projection gives three members).  Its update is Δ𝒲 = 𝒞 * Δ𝒰 * ℛ with frozen
𝒞 = 𝒲(:, I, :), ℛ = 𝒲(J, :, :) and the trainable real core Δ𝒰 ∈ ℝ^{K×r×r}, zero at start, so the
adapted model starts exactly at the base model.  Δ𝒲 is built once per forward pass per stack (one
real bmm in the Fourier domain, one inverse-DFT GEMM) and split among its members.  Linear layers
whose stack is cheap to contract (a ViT's MLP and attention stacks at r = 8: r·K small against
n1, n2) get the core gradient straight from their activations, never forming the dense weight
gradient.  Merging writes Δ𝒲 into the base weights (zero inference overhead); unmerging restores
the exact base weights kept aside at merge time.
"""

from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TCURLoRAConfig
from .errors import TCURLoRAError
from .tensor import irfft3, rfft3, select_indices, t_pinv

ADAPTERS_ATTR = "tcurlora_adapters"
WEIGHTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = (nn.Conv3d, nn.ConvTranspose3d)
# Longest stack whose inverse FFT runs as a GEMM (measured on CPU: GEMM 79 ms vs complex + irfft 91 ms
# at K = 256, 256×256; 41 vs 163 ms at K = 48, 768×768); longer stacks use torch.fft.irfft.
IDFT_GEMM_MAX_K = 256


# ----------------------------------------------------------------------------------------------
# weight <-> matrix views


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


# ----------------------------------------------------------------------------------------------
# stack description (what the manifest stores)


@dataclass
class Member:
    module: str
    rows: Optional[Tuple[int, int]] = None  # a row block of the module's matrix (qkv split), else all

    def to_dict(self) -> dict:
        return {"module": self.module, "rows": list(self.rows) if self.rows else None}


@dataclass
class StackSpec:
    name: str
    members: List[Member]


class AdapterError(TCURLoRAError, ValueError):
    """The adapter does not fit the model (wrong modules, shapes, or state)."""


# ----------------------------------------------------------------------------------------------
# the stack


class _ForwardState:
    """Shared, per-model bookkeeping: active adapter, merge state and a forward-pass counter."""

    def __init__(self) -> None:
        self.active: Optional[str] = None
        self.merged: Optional[str] = None
        self.forward_id = 0
        self.scratch: Optional[torch.Tensor] = None  # Fourier-domain work buffer of the Δ𝒲 builds


def _inverse_dft_matrix(k: int) -> torch.Tensor:
    """(K, 2F) real matrix D with irfft(X, K) = D · [Re X_0; Im X_0; Re X_1; …] along the stack axis."""
    f = k // 2 + 1
    angle = 2 * math.pi * torch.outer(torch.arange(k, dtype=torch.float64), torch.arange(f, dtype=torch.float64)) / k
    weight = torch.full((f,), 2.0, dtype=torch.float64)  # each conjugate pair counted twice …
    weight[0] = 1.0  # … but DC and (even K) Nyquist once; their imaginary parts drop out (sin = 0)
    if k % 2 == 0:
        weight[-1] = 1.0
    d = torch.stack([weight * torch.cos(angle), -weight * torch.sin(angle)], dim=2) / k
    return d.reshape(k, 2 * f).float()


def _scratch(state: Optional["_ForwardState"], shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A work buffer shared by the stacks of one model, grown as needed (fresh if there is no model)."""
    numel = math.prod(shape)
    if state is None:
        return torch.empty(shape, device=device)
    buf = state.scratch
    if buf is None or buf.device != device or buf.numel() < numel:
        buf = state.scratch = torch.empty(numel, device=device)
    return buf[:numel].view(shape)


class TCURStack(nn.Module):
    """One stack: frozen Fourier factors of 𝒞 and ℛ and the trainable core Δ𝒰 (K, r, r)."""

    def __init__(self, name: str, members: List[Member], matrices: torch.Tensor, rank: int,
                 selection: str = "deterministic", seed: int = 0, scale: float = 1.0,
                 indices: Optional[Tuple[List[int], List[int]]] = None, linear: bool = False) -> None:
        super().__init__()
        k, n1, n2 = matrices.shape
        rank = min(int(rank), n1, n2)
        self.name, self.members, self.k, self.n1, self.n2, self.rank = name, members, k, n1, n2, rank
        self.scale = float(scale)
        w = matrices.detach().float()
        if indices is None:
            gen = torch.Generator().manual_seed(int(seed))
            cols, rows = select_indices(w, rank, selection, gen)
        else:
            cols, rows = (torch.as_tensor(i, dtype=torch.long) for i in indices)
            if len(cols) != rank or len(rows) != rank or int(cols.max()) >= n2 or int(rows.max()) >= n1:
                raise AdapterError(f"stack {name}: stored indices do not fit a {n1}×{n2} rank-{rank} stack")
        self.register_buffer("cols", cols.clone(), persistent=False)
        self.register_buffer("rows", rows.clone(), persistent=False)
        c = w[:, :, cols.to(w.device)]  # (K, n1, r)
        r = w[:, rows.to(w.device), :]  # (K, r, n2)
        c_hat = rfft3(c)  # (F, n1, r) complex
        # Ĉ as the real block [[Re, -Im], [Im, Re]]: one real bmm computes the big Fourier-domain
        # product (complex bmm takes a slow path on CPU, ~10x slower here).
        self.register_buffer("c_block", torch.cat([torch.cat([c_hat.real, -c_hat.imag], 2),
                                                   torch.cat([c_hat.imag, c_hat.real], 2)], 1).contiguous(),
                             persistent=False)
        self.register_buffer("r_hat", rfft3(r), persistent=False)
        # Projected gradient (Linear members): contract dL/dW_k with 𝒞, ℛ straight from activations
        # instead of forming the dense n1×n2 weight gradient, whose path also pays a K·n1·n2 FFT, a
        # stack of the K slice gradients and a Fourier-domain bmm per stack (hence the 1.5 margin).
        # True for the paper's MLP and attention stacks at r = 8; large r·K goes the dense way.
        rk = rank * k
        self.projected = linear and (n1 + n2) * rk + rk * rk <= 1.5 * n1 * n2
        if self.projected:
            self.register_buffer("c_flat", c.permute(1, 0, 2).reshape(n1, rk).contiguous(), persistent=False)
            self.register_buffer("r_flat", r.reshape(rk, n2).contiguous(), persistent=False)
            a = torch.arange(k)
            # grad ΔU_b = Σ_a H[a, (k_layer - a - b) mod K]; precomputed index per (layer, a, b)
            self.register_buffer("_shift", (a[:, None, None] - a[None, :, None] - a[None, None, :]) % k,
                                 persistent=False)
        self.delta_u = nn.Parameter(torch.zeros(k, rank, rank))
        self._state: Optional[_ForwardState] = None
        self.register_buffer("idft", _inverse_dft_matrix(k), persistent=False)
        self._cache_key = None
        self._cache: Optional[torch.Tensor] = None
        self._slices: Optional[Tuple[torch.Tensor, ...]] = None
        self._buffer: Optional[torch.Tensor] = None  # Δ𝒲 of the detached path, reused across steps

    def u0(self) -> torch.Tensor:
        """𝒰₀ = t-pinv(𝒲(J, I, :)), recomputed from 𝒞 (only for reporting 𝒰 = 𝒰₀ + Δ𝒰)."""
        c_hat = torch.complex(self.c_block[:, :self.n1, :self.rank], self.c_block[:, self.n1:, :self.rank])
        return t_pinv(irfft3(c_hat, self.k)[:, self.rows, :])

    def describe(self) -> dict:
        return {"name": self.name, "shape": [self.n1, self.n2], "k": self.k, "rank": self.rank,
                "members": [m.to_dict() for m in self.members],
                "I": self.cols.tolist(), "J": self.rows.tolist(), "projected_gradient": bool(self.projected)}

    def delta_w(self, detached: bool = False) -> torch.Tensor:
        """Δ𝒲 as one (K, n1, n2) tensor, built once per forward pass (and again only after the core changed).

        Detached (no autograd: the projected-gradient path, merging, inference) it is written into a
        buffer the stack keeps, so a training step allocates nothing large.  With autograd, members
        read it through :meth:`member_slices` (one ``unbind``, see there).
        """
        grad = torch.is_grad_enabled() and not detached
        # With autograd Δ𝒲 belongs to one forward's graph; detached it depends on the core alone, so it is
        # rebuilt only after the core changed (an optimiser step, a load): a projected layer's backward
        # reads the same buffer, and autograd's version check refuses a backward whose Δ𝒲 was rewritten.
        fid = self._state.forward_id if self._state is not None and grad else None
        key = (fid, grad, self.delta_u._version, self.delta_u.device)
        if self._cache_key != key:
            self._cache = self._build(grad)
            self._slices = self._cache.unbind(0) if grad else None
            self._cache_key = key
        return self._cache

    def projects_gradient(self) -> bool:
        """Whether the core trains through the projected gradient now: then the layers read the detached Δ𝒲."""
        return self.projected and torch.is_grad_enabled() and self.delta_u.requires_grad

    def member_slices(self) -> Tuple[torch.Tensor, ...]:
        """The K slices of the autograd Δ𝒲 from one ``unbind``: its backward stacks the K slice gradients
        once, where indexing the tensor per member would allocate and fill a (K, n1, n2) gradient each."""
        self.delta_w(detached=False)
        return self._slices

    def _build(self, grad: bool) -> torch.Tensor:
        # Δ𝒲 = irfft(Ĉ · (Δ𝒰̂ ℛ̂)).  The big product is one real bmm (Ĉ as the block [[Re, −Im], [Im, Re]]
        # gives [Re; Im] of Ĉ·M per frequency) and the inverse FFT is one GEMM with the (K, 2F) real
        # inverse-DFT matrix: both read and write memory once, where torch.complex + a strided irfft
        # along the stack axis made three passes (about 4x slower on CPU for the ViT-B attention stack).
        device = self.delta_u.device
        # fp32 outside autocast: torch.fft has no bf16, and the product must not drop to bf16 either
        with torch.set_grad_enabled(grad), torch.autocast(device.type, enabled=False):
            du = self.delta_u.float()
            du_hat = rfft3(du * self.scale if self.scale != 1.0 else du)
            m = du_hat @ self.r_hat  # (F, r, n2), small
            m = torch.cat([m.real, m.imag], 1)  # (F, 2r, n2)
            f, n = self.c_block.shape[0], self.n1 * self.n2
            fft = self.k > IDFT_GEMM_MAX_K  # the GEMM's K + 2 products per value outgrow an FFT's log K
            if grad or fft:
                prod = self.c_block @ m  # (F, 2·n1, n2): rows [Re; Im] of Ĉ_f M_f
            else:
                prod = torch.bmm(self.c_block, m, out=_scratch(self._state, (f, 2 * self.n1, self.n2), device))
            if fft:
                return irfft3(torch.complex(prod[:, :self.n1], prod[:, self.n1:]), self.k)
            if grad:
                return (self.idft @ prod.view(2 * f, n)).view(self.k, self.n1, self.n2)
            if self._buffer is None or self._buffer.device != device:
                self._buffer = torch.empty(self.k, self.n1, self.n2, device=device)
            torch.mm(self.idft, prod.view(2 * f, n), out=self._buffer.view(self.k, n))
            return self._buffer

    def clear_cache(self) -> None:
        """Drop the cached Δ𝒲 and its buffer (after loading cores, merging, or to free memory)."""
        self._cache_key, self._cache, self._slices, self._buffer = None, None, None, None


class _ProjectedLinear(torch.autograd.Function):
    """y = x (W + ΔW)ᵀ + b whose backward gives Δ𝒰 its gradient without the dense dL/dW.

    ``blocks``: (member index k, first row, last row) of each stack member in this layer's weight (a
    fused qkv projection holds three); all from one stack.
    """

    @staticmethod
    def forward(ctx, x, delta_u, weight, delta, bias, stack, blocks):  # noqa: D401
        ctx.stack, ctx.blocks = stack, blocks
        # keep W (the frozen parameter) and ΔW (a view of the stack's buffer), not their sum: the sums of
        # all layers would stay alive from forward to backward (0.34 GB fp32 for a ViT-B)
        ctx.save_for_backward(x, weight, delta)
        ctx.has_bias = bias is not None and bias.requires_grad
        return F.linear(x, (weight + delta.to(weight.dtype)).to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, delta = ctx.saved_tensors
        stack: TCURStack = ctx.stack
        n2, k, r = stack.n2, stack.k, stack.rank
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, n2)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ (weight + delta.to(weight.dtype)).to(g2.dtype)).reshape(x.shape)
        grad_u = None
        if ctx.needs_input_grad[1]:
            xr = x2.float() @ stack.r_flat.t()  # (T, K·r) = x · R_cᵀ, shared by the blocks
            a = torch.arange(k, device=xr.device)
            for index, start, stop in ctx.blocks:
                gc = g2[:, start:stop].float() @ stack.c_flat  # (T, K·r) = dL/dy · C_a
                h = (gc.t() @ xr).reshape(k, r, k, r)  # H[a, :, c, :] = C_aᵀ G_k R_cᵀ
                g = h[a[:, None], :, stack._shift[index], :].sum(dim=0)  # (b, r, r): Σ_a H[a, (k-a-b) mod K]
                grad_u = g if grad_u is None else grad_u + g
            if stack.scale != 1.0:
                grad_u = grad_u * stack.scale
            grad_u = grad_u.to(stack.delta_u.dtype)
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_u, None, None, grad_b, None, None


# ----------------------------------------------------------------------------------------------
# the layer wrapper


class TCURLayer(nn.Module):
    """Wraps a Linear/Conv/ConvTranspose layer; adds the active adapter's Δ𝒲 slice to its weight."""

    def __init__(self, base_layer: nn.Module, state: _ForwardState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._state = state
        # adapter name -> list of (stack, member index, rows); python references, not submodules,
        # so each stack's parameters appear once (under the adapter) in state_dict/parameters().
        self._entries: Dict[str, List[Tuple[TCURStack, int, Optional[Tuple[int, int]]]]] = {}
        self._merge_backup: Optional[torch.Tensor] = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def add_entry(self, adapter: str, stack: TCURStack, index: int, rows: Optional[Tuple[int, int]]) -> None:
        self._entries.setdefault(adapter, []).append((stack, index, rows))
        self._entries[adapter].sort(key=lambda e: (e[2] or (0, 0))[0])

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
            block = stack.delta_w(detached=True)[index] if detached else stack.member_slices()[index]
            start, stop = rows or (0, n_rows)
            if start > cursor:  # rows of a fused layer that are in no stack stay frozen
                pieces.append(block.new_zeros(start - cursor, block.shape[1]))
            pieces.append(block)
            cursor = stop
        if cursor < n_rows:
            pieces.append(pieces[-1].new_zeros(n_rows - cursor, pieces[-1].shape[1]))
        matrix = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        return matrix_to_weight(base, matrix)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        if isinstance(base, nn.modules.conv._ConvTransposeNd):
            conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.dim() - 2]
            return conv(x, weight, base.bias, base.stride, base.padding, base.output_padding, base.groups,
                        base.dilation)
        return base._conv_forward(x, weight, base.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self._state.active
        if active is None or self._state.merged == active or active not in self._entries:
            return self.base_layer(x)
        entries = self._entries[active]
        base = self.base_layer
        stack = entries[0][0]
        if stack.projects_gradient() and all(e[0] is stack for e in entries):  # projected stacks are all Linear
            blocks = tuple((i, *(rows or (0, base.out_features))) for _, i, rows in entries)
            return _ProjectedLinear.apply(x, stack.delta_u, base.weight, self.delta_weight(active, detached=True),
                                          base.bias, stack, blocks)
        delta = self.delta_weight(active)
        return self._apply_weight(x, base.weight + delta.to(base.weight.dtype))


class ModuleSwitch(nn.Module):
    """A module trained fully by some adapters (decoder, new head): runs the active adapter's copy."""

    def __init__(self, base_module: nn.Module, state: _ForwardState) -> None:
        super().__init__()
        self.base_module = base_module
        self._state = state
        self._copies: Dict[str, nn.Module] = {}  # references into the adapter modules

    def forward(self, *args, **kwargs):
        module = self._copies.get(self._state.active, self.base_module)
        return module(*args, **kwargs)


class AdapterModule(nn.Module):
    """Everything one named adapter trains: stack cores and fully trained module copies."""

    def __init__(self, config: TCURLoRAConfig) -> None:
        super().__init__()
        self.config = config
        self.stacks = nn.ModuleDict()
        self.trained = nn.ModuleDict()  # key: module path with '.' -> '__'
        self.trained_paths: Dict[str, str] = {}


# ----------------------------------------------------------------------------------------------
# finding stacks


def _submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _leaf_weighted(model: nn.Module, path: str) -> nn.Module:
    module = _submodule(model, path)
    if isinstance(module, TCURLayer):
        module = module.base_layer
    return module


def _base_named_modules(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """Named modules with wrapper levels and adapter copies hidden, under the base model's names."""
    for name, module in model.named_modules():
        if name.startswith(ADAPTERS_ATTR) or isinstance(module, (TCURLayer, ModuleSwitch)):
            continue
        parts = name.split(".")
        if "base_layer" in parts or "base_module" in parts:
            name = ".".join(p for p in parts if p not in ("base_layer", "base_module"))
        yield name, module


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(getattr(m, "qkv", None), nn.Linear) for _, m in _base_named_modules(model))


def _vit_stacks(model: nn.Module, excluded: List[str]) -> List[StackSpec]:
    """Per stage (shape): attention [out, q, k, v] of every block; MLP up; MLP down."""
    groups: "OrderedDict[Tuple[str, Tuple[int, int]], List[Member]]" = OrderedDict()

    def add(kind: str, shape, member: Member) -> None:
        groups.setdefault((kind, tuple(shape)), []).append(member)

    for name, module in _base_named_modules(model):
        if _under(name, excluded):
            continue
        qkv = getattr(module, "qkv", None)
        out = getattr(module, "out_proj", None) or getattr(module, "proj", None)
        if isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear) and qkv.out_features % 3 == 0:
            d = qkv.out_features // 3
            prefix = f"{name}." if name else ""
            out_name = prefix + ("out_proj" if getattr(module, "out_proj", None) is out else "proj")
            if tuple(out.weight.shape) == (d, qkv.in_features):
                add("attn", (d, qkv.in_features), Member(out_name))
            for i in range(3):
                add("attn", (d, qkv.in_features), Member(prefix + "qkv", (i * d, (i + 1) * d)))
        up = getattr(module, "linear1", None) or getattr(module, "fc1", None)
        down = getattr(module, "linear2", None) or getattr(module, "fc2", None)
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
            prefix = f"{name}." if name else ""
            add("mlp_up", up.weight.shape, Member(prefix + ("linear1" if getattr(module, "linear1", None) is up else "fc1")))
            add("mlp_down", down.weight.shape, Member(prefix + ("linear2" if getattr(module, "linear2", None) is down else "fc2")))
    order = {"attn": 0, "mlp_up": 1, "mlp_down": 2}  # the paper's order, stable across MONAI versions
    keys = sorted(groups, key=lambda key: order[key[0]])
    return [StackSpec(f"{kind}_{shape[0]}x{shape[1]}", groups[(kind, shape)]) for kind, shape in keys]


def _conv_stacks(model: nn.Module, excluded: List[str]) -> List[StackSpec]:
    """Same-shape Conv3d / ConvTranspose3d kernels grouped into stacks (as out × in·k³ matrices)."""
    groups: "OrderedDict[Tuple[str, Tuple[int, ...]], List[Member]]" = OrderedDict()
    for name, module in _base_named_modules(model):
        if isinstance(module, CONV_TYPES) and not _under(name, excluded):
            kind = "convT" if isinstance(module, nn.ConvTranspose3d) else "conv"
            groups.setdefault((kind, tuple(module.weight.shape)), []).append(Member(name))
    specs = []
    for (kind, shape), members in groups.items():
        n1, n2 = weight_to_matrix(_leaf_weighted(model, members[0].module), torch.empty(shape, device="meta")).shape
        specs.append(StackSpec(f"{kind}_{n1}x{n2}", members))
    return specs


def _explicit_stacks(model: nn.Module, stacks: Dict[str, List[str]], excluded: List[str]) -> List[StackSpec]:
    specs = []
    for stack_name, patterns in stacks.items():
        members = [Member(n) for n, m in _base_named_modules(model)
                   if isinstance(m, WEIGHTED_TYPES) and _matches(n, patterns) and not _under(n, excluded)]
        if not members:
            raise AdapterError(f"stack {stack_name!r}: no Linear/Conv module matches {patterns}")
        specs.append(StackSpec(stack_name, members))
    return specs


def resolve_stacks(model: nn.Module, config: TCURLoRAConfig) -> List[StackSpec]:
    """The stacks a config asks for on ``model`` (names and members, not yet built)."""
    if config.method in ("decoder", "full"):
        return []
    excluded = [n for n, _ in _base_named_modules(model) if n and (_matches(n, config.exclude_modules)
                                                                  or _matches(n, config.train_modules))]
    if config.new_head:
        excluded.append(str(config.new_head["module"]))
    preset = config.preset
    if preset == "auto":
        preset = "vit" if has_attention(model) else "conv"
    specs: List[StackSpec] = []
    if preset == "vit":
        specs += _vit_stacks(model, excluded)
    elif preset == "conv":
        specs += _conv_stacks(model, excluded)
    specs += _explicit_stacks(model, config.stacks, excluded)
    seen = set()
    for spec in specs:
        for m in spec.members:
            key = (m.module, m.rows)
            if key in seen:
                raise AdapterError(f"module {m.module} is in two stacks")
            seen.add(key)
    return specs


def _member_matrix(model: nn.Module, member: Member) -> torch.Tensor:
    module = _leaf_weighted(model, member.module)
    matrix = weight_to_matrix(module, module.weight.detach())
    if member.rows:
        matrix = matrix[member.rows[0]:member.rows[1]]
    return matrix


# ----------------------------------------------------------------------------------------------
# public API


def _state_of(model: nn.Module) -> _ForwardState:
    state = getattr(model, "_tcurlora_state", None)
    if state is None:
        state = _ForwardState()
        model._tcurlora_state = state

        def _next_forward(module, args):
            # A new forward pass: build each active stack's Δ𝒲 once, here, before any block runs, so that
            # blocks (and activation checkpointing's recomputation of them) only read the cache.
            state.forward_id += 1
            if state.active is None or state.merged == state.active:
                return
            adapters = getattr(module, ADAPTERS_ATTR, None)
            if adapters is None or state.active not in adapters:
                return
            for stack in adapters[state.active].stacks.values():
                stack.delta_w(detached=stack.projects_gradient())

        model.register_forward_pre_hook(_next_forward)
    return state


def _adapters(model: nn.Module) -> nn.ModuleDict:
    if not hasattr(model, ADAPTERS_ATTR):
        model.add_module(ADAPTERS_ATTR, nn.ModuleDict())
    return getattr(model, ADAPTERS_ATTR)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(_submodule(model, parent_path), child, new)


def _wrap_layer(model: nn.Module, path: str, state: _ForwardState) -> TCURLayer:
    module = _submodule(model, path)
    if isinstance(module, TCURLayer):
        return module
    if isinstance(module, ModuleSwitch):
        raise AdapterError(f"module {path} is trained fully by another adapter; it cannot also be in a stack")
    if not isinstance(module, WEIGHTED_TYPES):
        raise AdapterError(f"module {path} ({type(module).__name__}) has no weight that a stack can hold")
    layer = TCURLayer(module, state)
    _set_submodule(model, path, layer)
    return layer


def _new_head(base: nn.Module, out_channels: int) -> nn.Module:
    """A copy of ``base`` with ``out_channels`` outputs; known channels start from the base's."""
    head = copy.deepcopy(base)
    if isinstance(base, nn.Linear):
        head = nn.Linear(base.in_features, out_channels, bias=base.bias is not None)
        out_dim = 0
    elif isinstance(base, nn.modules.conv._ConvTransposeNd):
        head = type(base)(base.in_channels, out_channels, base.kernel_size, base.stride, base.padding,
                          base.output_padding, base.groups, base.bias is not None, base.dilation)
        out_dim = 1
    elif isinstance(base, nn.modules.conv._ConvNd):
        head = type(base)(base.in_channels, out_channels, base.kernel_size, base.stride, base.padding,
                          base.dilation, base.groups, base.bias is not None)
        out_dim = 0
    else:
        raise AdapterError(f"new_head: {type(base).__name__} is not a Linear/Conv layer")
    head = head.to(base.weight.device, base.weight.dtype)
    with torch.no_grad():
        n = min(out_channels, base.weight.shape[out_dim])
        head.weight.narrow(out_dim, 0, n).copy_(base.weight.narrow(out_dim, 0, n))
        if head.bias is not None:
            head.bias[:n].copy_(base.bias[:n])
    return head


def inject_adapter(model: nn.Module, config: TCURLoRAConfig, adapter_name: str = "default",
                   stacks: Optional[List[dict]] = None) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place, make it active, and return ``model``.

    Only the adapter's parameters are left trainable.  ``stacks`` (from a saved manifest) rebuilds
    the exact stacks and CUR indices of a saved adapter instead of resolving them from ``config``.
    """
    if config.method in ("lora", "full") and getattr(model, "tcurlora_base_fingerprint", None) is None:
        # these train base weights in place: remember the base they started from, for the adapter file
        from .adapter_file import base_fingerprint

        model.tcurlora_base_fingerprint = base_fingerprint(model)
    if config.method == "lora":
        return _inject_lora(model, config, adapter_name)
    state = _state_of(model)
    adapters = _adapters(model)
    if adapter_name in adapters:
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name) or hasattr(adapters, adapter_name):
        raise AdapterError(f"invalid adapter name {adapter_name!r} (letters, digits, '_' and '-'; not a reserved word)")
    if state.merged is not None:
        raise AdapterError("unmerge the merged adapter before adding another")
    if config.method == "full":
        if len(adapters):
            raise AdapterError("method 'full' trains the base weights themselves; it cannot share a model")
    adapter = AdapterModule(config)
    device = next(model.parameters()).device

    if stacks is None:
        specs = resolve_stacks(model, config)
        built = [(spec, None) for spec in specs]
    else:
        built = [(StackSpec(s["name"], [Member(m["module"], tuple(m["rows"]) if m["rows"] else None)
                                        for m in s["members"]]), (s["I"], s["J"])) for s in stacks]
    for spec, indices in built:
        try:
            matrices = torch.stack([_member_matrix(model, m) for m in spec.members])
        except (AttributeError, RuntimeError) as exc:
            raise AdapterError(f"stack {spec.name}: members do not fit this model ({exc})") from None
        linear = all(isinstance(_leaf_weighted(model, m.module), nn.Linear) for m in spec.members)
        stack = TCURStack(spec.name, spec.members, matrices, config.rank, config.selection, config.seed,
                          config.scale, indices, linear=linear).to(device)
        stack._state = state
        adapter.stacks[spec.name] = stack
        for index, member in enumerate(spec.members):
            _wrap_layer(model, member.module, state).add_entry(adapter_name, stack, index, member.rows)

    # modules trained fully: the adapter owns a copy; a switch runs the active adapter's copy
    trained = [n for n, _ in _base_named_modules(model) if n and _matches(n, config.train_modules)]
    trained = [n for n in trained if not _under(n, [t for t in trained if t != n])]  # top-most only
    if config.method == "full":
        trained = []  # every base weight trains in place: no copies
    if config.method == "decoder" and not trained and not config.new_head:
        raise AdapterError("method 'decoder' needs train_modules (regular expressions of the decoder/head modules)")
    head_path = str(config.new_head["module"]) if config.new_head else None
    for path in trained + ([head_path] if head_path and head_path not in trained else []):
        current = _submodule(model, path)
        switch = current if isinstance(current, ModuleSwitch) else ModuleSwitch(current, state)
        if switch is not current:
            _set_submodule(model, path, switch)
        base = switch.base_module
        if isinstance(base, TCURLayer):
            raise AdapterError(f"module {path} is in a stack of another adapter; it cannot also be trained fully")
        copy_ = _new_head(base, int(config.new_head["out_channels"])) if path == head_path else copy.deepcopy(base)
        key = path.replace(".", "__")
        adapter.trained[key] = copy_
        adapter.trained_paths[key] = path
        switch._copies[adapter_name] = copy_

    adapters[adapter_name] = adapter
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    for p in adapter.parameters():
        p.requires_grad_(True)
    state.active = adapter_name
    return model


def _inject_lora(model: nn.Module, config: TCURLoRAConfig, adapter_name: str) -> nn.Module:
    """HF PEFT LoRA on the same layers a tCURLoRA config would adapt (the comparison baseline)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise AdapterError("method 'lora' needs HF PEFT: pip install peft") from None
    specs = resolve_stacks(model, TCURLoRAConfig(**{**config.to_dict(), "method": "tcurlora"}))
    targets = sorted({m.module for s in specs for m in s.members
                      if not isinstance(_leaf_weighted(model, m.module), nn.modules.conv._ConvTransposeNd)})
    if not targets:
        raise AdapterError("LoRA: no target layer that PEFT supports (PEFT has no ConvTranspose LoRA)")
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [n for n, _ in _base_named_modules(model) if n and _matches(n, config.train_modules)]
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha or config.rank, target_modules=targets,
                      lora_dropout=0.0, bias="none")
    inject_adapter_in_model(lora, model, adapter_name=adapter_name)
    for name, module in model.named_modules():
        if _under(name, trained):
            for p in module.parameters():
                p.requires_grad_(True)
    model._tcurlora_lora = {"config": config, "targets": targets, "trained": trained}
    return model


def set_active_adapter(model: nn.Module, adapter_name: Optional[str]) -> None:
    """Switch the adapter in use without reloading the base (None = the plain base model)."""
    state = _state_of(model)
    if adapter_name is not None and adapter_name not in _adapters(model):
        raise AdapterError(f"no adapter named {adapter_name!r}; loaded: {', '.join(list_adapters(model)) or 'none'}")
    if state.merged is not None and state.merged != adapter_name:
        unmerge_adapter(model)
    if state.active != adapter_name:
        _release_buffers(model)  # only the active adapter's Δ𝒲 is kept
    state.active = adapter_name


def list_adapters(model: nn.Module) -> List[str]:
    return list(getattr(model, ADAPTERS_ATTR, {}).keys())


def active_adapter(model: nn.Module) -> Optional[str]:
    state = getattr(model, "_tcurlora_state", None)
    return state.active if state else None


def get_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> AdapterModule:
    name = adapter_name or active_adapter(model)
    adapters = getattr(model, ADAPTERS_ATTR, {})
    if name is None or name not in adapters:
        raise AdapterError(f"no adapter named {name!r} on this model")
    return adapters[name]


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    state = _state_of(model)
    if state.merged == adapter_name:
        unmerge_adapter(model)
    adapter = get_adapter(model, adapter_name)
    for module in model.modules():
        if isinstance(module, TCURLayer):
            module._entries.pop(adapter_name, None)
        elif isinstance(module, ModuleSwitch):
            module._copies.pop(adapter_name, None)
    del _adapters(model)[adapter_name]
    del adapter
    if state.active == adapter_name:
        state.active = None


def merge_adapter(model: nn.Module) -> nn.Module:
    """Write the active adapter's Δ𝒲 into the base weights: inference then costs what the base does."""
    lora = _lora_layers(model)
    if lora:
        for layer in lora:
            layer.merge()
        return model
    state = _state_of(model)
    if state.active is None:
        raise AdapterError("no active adapter to merge")
    if state.merged == state.active:
        return model
    if state.merged is not None:
        unmerge_adapter(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TCURLayer):
                delta = module.delta_weight(state.active, detached=True)
                if delta is not None:
                    weight = module.base_layer.weight
                    module._merge_backup = weight.detach().clone()
                    weight.add_(delta.to(weight.dtype))
    state.merged = state.active
    _release_buffers(model)  # a merged model reads no Δ𝒲: give its memory back
    return model


def _release_buffers(model: nn.Module) -> None:
    for adapter in _adapters(model).values():
        for stack in adapter.stacks.values():
            stack.clear_cache()
    _state_of(model).scratch = None


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Restore the exact base weights (kept aside at merge, not recomputed by subtraction)."""
    lora = _lora_layers(model)
    if lora:
        for layer in lora:
            layer.unmerge()
        return model
    state = _state_of(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TCURLayer) and module._merge_backup is not None:
                module.base_layer.weight.copy_(module._merge_backup)
                module._merge_backup = None
    state.merged = None
    return model


def _lora_layers(model: nn.Module) -> list:
    if not hasattr(model, "_tcurlora_lora"):
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> "OrderedDict[str, torch.Tensor]":
    """The trainable state of one adapter: what an adapter file stores (never the frozen base)."""
    if hasattr(model, "_tcurlora_lora"):
        return OrderedDict((k, v.detach()) for k, v in model.state_dict().items()
                           if "lora_" in k or _under(k.rsplit(".", 1)[0], model._tcurlora_lora["trained"]))
    adapter = get_adapter(model, adapter_name)
    if adapter.config.method == "full":
        return base_state_dict(model)
    return OrderedDict((k, v.detach()) for k, v in adapter.state_dict().items())


def load_adapter_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor], adapter_name: Optional[str] = None) -> None:
    """Load tensors saved by :func:`adapter_state_dict`; every key, shape and dtype must match."""
    lora = hasattr(model, "_tcurlora_lora")
    adapter = None if lora else get_adapter(model, adapter_name)
    if lora or adapter.config.method == "full":
        live = dict(model.state_dict(keep_vars=True)) if lora else dict(_base_named_tensors(model))
        target = {k: live[k] for k in adapter_state_dict(model, adapter_name)}
    else:
        target = adapter.state_dict(keep_vars=True)
    missing = sorted(set(target) - set(tensors))
    unexpected = sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise AdapterError("tensors do not match the adapter: "
                           + "; ".join(filter(None, [missing and f"missing {', '.join(missing[:5])}",
                                                     unexpected and f"unexpected {', '.join(unexpected[:5])}"])))
    for key, value in tensors.items():
        ref = target[key]
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            raise AdapterError(f"tensor {key}: expected {ref.dtype} {tuple(ref.shape)}, got {value.dtype} {tuple(value.shape)}")
    with torch.no_grad():
        for key, value in tensors.items():
            target[key].copy_(value)
    if adapter is not None:
        for stack in adapter.stacks.values():
            stack.clear_cache()


def _base_named_tensors(model: nn.Module) -> Iterable[Tuple[str, torch.Tensor]]:
    for key, value in model.state_dict(keep_vars=True).items():
        if key.startswith(ADAPTERS_ATTR + ".") or "lora_" in key:
            continue
        parts = [p for p in key.split(".") if p not in ("base_layer", "base_module")]
        yield ".".join(parts), value


def base_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The frozen base weights under their original names (merged deltas excluded)."""
    backups = {}
    for name, module in model.named_modules():
        if isinstance(module, TCURLayer) and module._merge_backup is not None:
            clean = ".".join(p for p in name.split(".") if p not in ("base_layer", "base_module"))
            backups[f"{clean}.weight" if clean else "weight"] = module._merge_backup
    return OrderedDict((k, backups.get(k, v).detach()) for k, v in _base_named_tensors(model))


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of trainable values (what the optimiser updates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe_adapter(model: nn.Module, adapter_name: Optional[str] = None) -> dict:
    """What a manifest stores about the adapter's structure: config, stacks, indices, trained modules."""
    if hasattr(model, "_tcurlora_lora"):
        info = model._tcurlora_lora
        return {"config": info["config"].to_dict(), "stacks": [], "trained_modules": info["trained"],
                "lora_targets": info["targets"]}
    adapter = get_adapter(model, adapter_name)
    return {"config": adapter.config.to_dict(), "stacks": [s.describe() for s in adapter.stacks.values()],
            "trained_modules": list(adapter.trained_paths.values())}
