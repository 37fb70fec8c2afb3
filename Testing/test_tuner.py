"""The tuner's machinery: cache invalidation, several adapters, casts, checkpointing, copies, any root module,
aliased layers; and the maths pinned against plain references written here (no code of the package)."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tcurlora import (TCURLoRAConfig, adapter_state_dict, base_fingerprint, inject_adapter, merge_adapter,
                      unmerge_adapter)
from tcurlora.adapter import base_state_dict, get_adapter, list_adapters, set_active_adapter
from tcurlora.tensor import select_indices
from tcurlora.tuners import TCURLayer, fourier, get_tuner
from tcurlora.tuners.layers import matrix_to_weight, weight_to_matrix


class ConvNet(nn.Module):
    """Conv3d/ConvTranspose3d layers of repeated shapes (two conv stacks), a head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, padding=1), nn.ReLU(),
                                 nn.Conv3d(6, 6, 3, padding=1))
        self.dec = nn.Sequential(nn.Conv3d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, padding=1))
        self.head = nn.Conv3d(6, 2, 1)

    def forward(self, x):
        return self.head(self.dec(torch.relu(self.enc(x))))


class TinyViT(nn.Module):
    """Two transformer-like blocks with fused qkv + out_proj and fc1/fc2, plus a conv stem."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(d, 3 * d, bias=False)
            self.attn.out_proj = nn.Linear(d, d)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            q, k, v = self.attn.qkv(x).chunk(3, -1)
            a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
            x = x + self.attn.out_proj(a)
            return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))

    def __init__(self, d=16):
        super().__init__()
        self.stem = nn.Conv3d(1, d, 2, stride=2)
        self.stem2 = nn.Conv3d(d, d, 1)
        self.blocks = nn.ModuleList([self.Block(d), self.Block(d)])
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.stem2(self.stem(x)).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def seeded(factory, seed=0):
    torch.manual_seed(seed)
    return factory().eval()


def perturb(model, name=None, std=0.05, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stack in get_adapter(model, name).stacks.values():
            stack.delta_u.copy_(torch.randn(stack.delta_u.shape, generator=gen) * std)


X = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------
# bullets of the core-library issue


@pytest.mark.parametrize("update", ["fused", "data"])
def test_core_updates_that_keep_the_version_counter_still_rebuild_delta_w(update):
    model = seeded(ConvNet)
    inject_adapter(model, TCURLoRAConfig(rank=2))
    cores = [s.delta_u for s in get_adapter(model).stacks.values()]
    model(X).square().mean().backward()
    with torch.no_grad():  # a metric pass: builds the detached Δ𝒲
        before = model(X)
    if update == "fused":
        torch.optim.AdamW(cores, lr=1e-2, fused=True).step()
    else:
        for core in cores:
            core.data.add_(0.05)
    with torch.no_grad():
        after = model(X)
    assert (after - before).abs().max() > 1e-5  # the loss moved with the cores
    with torch.no_grad():
        merge_adapter(model)
        torch.testing.assert_close(model(X), after, rtol=1e-5, atol=1e-5)  # merge writes the current Δ𝒲
        unmerge_adapter(model)
    fresh = seeded(ConvNet)
    inject_adapter(fresh, TCURLoRAConfig(rank=2))
    get_tuner(fresh).load_adapter_state_dict(adapter_state_dict(model))
    torch.testing.assert_close(fresh(X).detach(), after, rtol=1e-5, atol=1e-5)  # what is saved is what ran


@pytest.mark.parametrize("preset", ["vit", "auto"])
def test_a_second_adapter_of_any_preset_finds_the_same_stacks(preset):
    model = seeded(TinyViT)
    inject_adapter(model, TCURLoRAConfig(preset=preset, rank=2), "first")
    inject_adapter(model, TCURLoRAConfig(preset=preset, rank=3), "second")
    first, second = get_adapter(model, "first"), get_adapter(model, "second")
    assert list(first.stacks) == list(second.stacks) == ["attn_16x16", "mlp_up_32x16", "mlp_down_16x32"]
    assert [s.describe()["members"] for s in first.stacks.values()] == \
           [s.describe()["members"] for s in second.stacks.values()]
    perturb(model, "first")
    perturb(model, "second", seed=4)
    outs = {}
    with torch.no_grad():
        for name in (None, "first", "second"):
            set_active_adapter(model, name)
            outs[name] = model(X)
    assert (outs["first"] - outs[None]).abs().max() > 1e-4 and (outs["second"] - outs["first"]).abs().max() > 1e-4


def test_a_fully_trained_copy_never_carries_another_adapters_update():
    x = X
    model = seeded(ConvNet)
    base = model(x).detach()
    inject_adapter(model, TCURLoRAConfig(rank=2), "stacks")  # wraps the dec convs
    perturb(model, "stacks", std=0.3)
    inject_adapter(model, TCURLoRAConfig(method="decoder", train_modules=[r"dec"]), "decoder")
    with torch.no_grad():
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)  # the copy is of the base decoder
        set_active_adapter(model, "stacks")
        assert (model(x) - base).abs().max() > 1e-3


def test_stacks_inside_a_module_another_adapter_trains_fully():
    model = seeded(ConvNet)
    base = model(X).detach()
    inject_adapter(model, TCURLoRAConfig(method="decoder", train_modules=[r"dec"]), "decoder")
    inject_adapter(model, TCURLoRAConfig(rank=2, stacks={"dec": [r"dec\.[02]"]}, preset="none"), "stacks")
    assert [m.module for m in get_adapter(model, "stacks").stacks["dec"].members] == ["dec.0", "dec.2"]
    perturb(model, "stacks", std=0.3)
    with torch.no_grad():
        adapted = model(X)
        set_active_adapter(model, "decoder")
        torch.testing.assert_close(model(X), base, rtol=0, atol=0)
    assert (adapted - base).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_casts_after_injection(dtype):
    model = seeded(ConvNet)
    inject_adapter(model, TCURLoRAConfig(rank=2))
    perturb(model)
    with torch.no_grad():
        reference = model(X)
        if dtype == torch.float16:
            model.half()
        else:
            model.to(dtype)
        out = model(X.to(dtype))
    assert out.dtype == dtype
    tol = {torch.float64: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out.float(), reference, rtol=tol, atol=tol)


class CheckpointedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ConvNet()

    def forward(self, x):
        net = self.net
        if torch.is_grad_enabled():
            h = checkpoint(lambda t: torch.relu(net.enc(t)), x, use_reentrant=False)
            return net.head(checkpoint(net.dec, h, use_reentrant=False))
        return net(x)


def _core_grads(model):
    return {k: s.delta_u.grad.clone() for k, s in get_adapter(model).stacks.items() if s.delta_u.grad is not None}


def test_checkpointing_with_a_no_grad_pass_before_backward_and_accumulation():
    plain = seeded(ConvNet)
    inject_adapter(plain, TCURLoRAConfig(rank=2))
    perturb(plain)
    plain(X).square().mean().backward()
    expected = _core_grads(plain)

    torch.manual_seed(0)
    model = CheckpointedNet().eval()
    inject_adapter(model, TCURLoRAConfig(rank=2))
    perturb(model)
    loss = model(X).square().mean()
    with torch.no_grad():
        model(X)  # a metric pass between forward and backward
    loss.backward()
    for key, grad in _core_grads(model).items():
        torch.testing.assert_close(grad, expected[key], rtol=1e-4, atol=1e-7)
    model.zero_grad()
    for _ in range(2):  # accumulation: two forward/backward pairs
        model(X).square().mean().backward()
    for key, grad in _core_grads(model).items():
        torch.testing.assert_close(grad, 2 * expected[key], rtol=1e-4, atol=1e-7)


def test_submodule_calls_and_deep_copies_accumulate_gradients():
    model = seeded(ConvNet)
    inject_adapter(model, TCURLoRAConfig(rank=2, stacks={}, preset="conv"))
    perturb(model)
    h = torch.randn(1, 6, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    model.dec(h).square().mean().backward()
    once = {k: g for k, g in _core_grads(model).items() if g.abs().sum() > 0}
    assert once
    model.zero_grad()
    for _ in range(2):  # the decoder alone, twice: each call builds its own graph
        model.dec(h).square().mean().backward()
    for key, grad in once.items():
        torch.testing.assert_close(get_adapter(model).stacks[key].delta_u.grad, 2 * grad, rtol=1e-5, atol=1e-8)

    clone = copy.deepcopy(model)
    clone.zero_grad()
    for _ in range(2):
        clone(X).square().mean().backward()
    model.zero_grad()
    model(X).square().mean().backward()
    assert get_tuner(clone).model is clone and get_tuner(model).model is model
    for key, grad in _core_grads(model).items():
        torch.testing.assert_close(get_adapter(clone).stacks[key].delta_u.grad, 2 * grad, rtol=1e-5, atol=1e-8)
    with torch.no_grad():  # the copy's cores are its own
        get_adapter(clone).stacks["conv_6x162"].delta_u.add_(1.0)
        assert not torch.equal(clone(X), model(X))


def test_any_root_module_type():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(4, 4, 3, padding=1)).eval()
    names = [n for n, _ in model.named_children()]
    base = model(X).detach()
    inject_adapter(model, TCURLoRAConfig(rank=2))
    assert [n for n, _ in model.named_children()] == names  # nothing added to the root
    perturb(model)
    assert (model(X) - base).abs().max() > 1e-5


class AliasedBlock(nn.Module):
    """nnU-Net's layout: the conv is held as ``.conv`` and as ``.all_modules[0]``; forward runs all_modules."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.InstanceNorm3d(cout, affine=True)
        self.all_modules = nn.Sequential(self.conv, self.norm, nn.LeakyReLU())

    def forward(self, x):
        return self.all_modules(x)


class AliasedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(AliasedBlock(1, 4), AliasedBlock(4, 4), AliasedBlock(4, 4))
        self.shared = self.stages[2]  # a second name for a whole block too
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(self.stages(x))


def test_every_alias_of_a_wrapped_layer_is_replaced():
    model = seeded(AliasedNet)
    keys = list(model.state_dict())
    fingerprint = base_fingerprint(model)
    base = model(X).detach()
    inject_adapter(model, TCURLoRAConfig(rank=2))
    stack = get_adapter(model).stacks["conv_4x108"]
    assert [m.module for m in stack.members] == ["stages.1.conv", "stages.2.conv"]
    for block in (model.stages[1], model.stages[2]):
        assert isinstance(block.conv, TCURLayer) and block.all_modules[0] is block.conv
    assert list(base_state_dict(model)) == keys and base_fingerprint(model) == fingerprint
    perturb(model, std=0.3)
    with torch.no_grad():
        adapted = model(X)
        assert (adapted - base).abs().max() > 1e-3  # the path forward runs is adapted
        merge_adapter(model)
        torch.testing.assert_close(model(X), adapted, rtol=1e-5, atol=1e-5)
        assert base_fingerprint(model) == fingerprint
        unmerge_adapter(model)
        assert list(model.state_dict()) != keys  # (the wrappers are in the live state dict …)
        assert list(base_state_dict(model)) == keys  # (… and not in the base's)


def test_one_strategy_for_each_method_of_the_protocol():
    from tcurlora.protocol import METHODS
    from tcurlora.tuners import STRATEGIES

    assert set(STRATEGIES) == set(METHODS)


def test_exclusive_methods_refuse_to_share_and_names_are_checked():
    from tcurlora.adapter import AdapterError

    model = seeded(ConvNet)
    inject_adapter(model, TCURLoRAConfig(rank=2), "a")
    with pytest.raises(AdapterError, match="cannot share"):
        inject_adapter(model, TCURLoRAConfig(method="full"), "b")
    with pytest.raises(AdapterError, match="invalid adapter name"):
        inject_adapter(model, TCURLoRAConfig(rank=2), "a.b")
    inject_adapter(model, TCURLoRAConfig(rank=2), "train")  # a Module attribute name is a fine adapter name
    assert list_adapters(model) == ["a", "train"]


# ------------------------------------------------------------------------------------------------
# the maths, against plain references


def reference_indices(w: torch.Tensor, rank: int, *, rows_over_all=False, squared=False):
    """Top-r columns by Σ_k ‖Ŵ_k(:, j)‖, then top-r rows by Σ_k ‖Ŵ_k(i, I)‖, Ŵ the full complex FFT over k."""
    k, n1, n2 = w.shape
    w_hat = torch.fft.fft(w.double(), dim=0)
    norm = (lambda v: float((v.abs() ** 2).sum())) if squared else (lambda v: float((v.abs() ** 2).sum().sqrt()))
    col = [sum(norm(w_hat[f, :, j]) for f in range(k)) for j in range(n2)]
    cols = sorted(sorted(range(n2), key=lambda j: (-col[j], j))[:rank])
    use = list(range(n2)) if rows_over_all else cols
    row = [sum(norm(w_hat[f, i, use]) for f in range(k)) for i in range(n1)]
    rows = sorted(sorted(range(n1), key=lambda i: (-row[i], i))[:rank])
    return cols, rows


def half_spectrum_indices(w: torch.Tensor, rank: int):
    """The selection with the conjugate pairs' weight 2 dropped (a wrong rule the tests must tell apart)."""
    w_hat = torch.fft.rfft(w.double(), dim=0)
    col = w_hat.abs().pow(2).sum(1).sqrt().sum(0)
    cols = sorted(torch.argsort(-col, stable=True)[:rank].tolist())
    row = w_hat[:, :, cols].abs().pow(2).sum(2).sqrt().sum(0)
    return cols, sorted(torch.argsort(-row, stable=True)[:rank].tolist())


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_index_selection_against_a_plain_reference(k):
    gen = torch.Generator().manual_seed(k)
    wrong = {"rows_over_all": 0, "squared": 0, "half": 0}
    for trial in range(12):
        n1, n2 = 7 + trial % 3, 9 - trial % 2
        # uneven column/row scales so that the rules disagree often
        w = torch.randn(k, n1, n2, generator=gen) * torch.rand(1, n1, 1, generator=gen) * torch.rand(1, 1, n2, generator=gen) * 3
        for rank in (1, 3, min(n1, n2)):
            cols, rows = select_indices(w, rank)
            expected = reference_indices(w, rank)
            assert (cols.tolist(), rows.tolist()) == expected, (k, trial, rank)
            wrong["rows_over_all"] += reference_indices(w, rank, rows_over_all=True) != expected
            wrong["squared"] += reference_indices(w, rank, squared=True) != expected
            wrong["half"] += half_spectrum_indices(w, rank) != expected
    # the data tell these wrong rules apart (with one slice, squaring keeps the order; the half-spectrum
    # rule only has conjugate pairs to drop when K > 2)
    assert wrong["rows_over_all"] > 0 and (wrong["squared"] > 0) == (k > 1)
    assert (wrong["half"] > 0) == (k > 2)


def test_rank_at_or_above_the_matrix_size_is_clamped_to_all_columns():
    model = nn.Sequential(nn.Conv3d(2, 2, 1), nn.Conv3d(2, 2, 1), nn.Conv3d(2, 2, 1))
    inject_adapter(model, TCURLoRAConfig(rank=8))
    stack = next(iter(get_adapter(model).stacks.values()))
    assert stack.rank == 2 and stack.cols.tolist() == [0, 1] and stack.rows.tolist() == [0, 1]


def block_circulant_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b)_k = Σ_j a_{(k−j) mod K} b_j: the t-product as the block-circulant matrix times b, in loops."""
    k = a.shape[0]
    return torch.stack([sum(a[(i - j) % k] @ b[j] for j in range(k)) for i in range(k)])


@pytest.mark.parametrize("k", [3, 8, fourier.IDFT_GEMM_MAX_K + 1])
def test_delta_w_against_the_block_circulant_product(k):
    gen = torch.Generator().manual_seed(k)
    w = torch.randn(k, 6, 5, generator=gen, dtype=torch.float64)
    layers = nn.ModuleList([nn.Linear(5, 6) for _ in range(k)])
    with torch.no_grad():
        for layer, matrix in zip(layers, w):
            layer.weight.copy_(matrix.float())
    inject_adapter(layers, TCURLoRAConfig(preset="none", stacks={"s": [r"\d+"]}, rank=2, scale=0.7))
    stack = get_adapter(layers).stacks["s"]
    du = torch.randn(k, 2, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        stack.delta_u.copy_(du.float())
    wf = w.float().double()
    c, r = wf[:, :, stack.cols], wf[:, stack.rows, :]
    expected = 0.7 * block_circulant_product(block_circulant_product(c, du), r)
    atol = 1e-6 * float(expected.abs().max())  # fp32 FFTs over K terms
    torch.testing.assert_close(stack.delta_w(detached=True).double(), expected, rtol=1e-4, atol=atol)
    with torch.enable_grad():
        torch.testing.assert_close(stack.delta_w().detach().double(), expected, rtol=1e-4, atol=atol)


def test_conv_transpose_matrix_layout_element_wise():
    layer = nn.ConvTranspose3d(3, 4, 2)  # weight (in=3, out=4, 2, 2, 2)
    matrix = weight_to_matrix(layer, layer.weight)
    assert matrix.shape == (4, 3 * 8)
    for o, i, a, b, c in itertools.product(range(4), range(3), range(2), range(2), range(2)):
        assert matrix[o, i * 8 + a * 4 + b * 2 + c] == layer.weight[i, o, a, b, c]


class ParallelLinear(nn.Module):
    """y = Σ_k lin_k(x): K same-shape Linear layers on one input, the stack a plain reference can write out."""

    def __init__(self, k, n_in, n_out):
        super().__init__()
        self.lins = nn.ModuleList([nn.Linear(n_in, n_out) for _ in range(k)])

    def forward(self, x):
        return sum(lin(x) for lin in self.lins)


@pytest.mark.parametrize("projected", [True, False])
def test_core_gradient_against_an_explicit_reference_with_scale_batch_and_odd_k(projected):
    k, n_in, n_out, rank, scale = 5, 24, 20, 2, 0.6
    torch.manual_seed(0)
    model = ParallelLinear(k, n_in, n_out)
    x = torch.randn(3, 4, n_in)  # batch > 1, tokens
    g = torch.randn(3, 4, n_out)
    inject_adapter(model, TCURLoRAConfig(preset="none", stacks={"lin": [r"lins\.\d+"]}, rank=rank, scale=scale))
    stack = get_adapter(model).stacks["lin"]
    assert stack.projected  # the shape takes the projected path …
    stack.projected = projected  # … and the dense one is forced for the comparison
    du = torch.randn(k, rank, rank, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        stack.delta_u.copy_(du)
    (model(x) * g).sum().backward()

    w = torch.stack([lin.weight.detach().double() for lin in model.lins])
    c, r = w[:, :, stack.cols], w[:, stack.rows, :]
    ref_u = du.double().requires_grad_(True)
    delta = scale * block_circulant_product(block_circulant_product(c, ref_u), r)
    y = sum(x.double() @ (w[i] + delta[i]).t() + model.lins[i].bias.double() for i in range(k))
    (y * g.double()).sum().backward()
    torch.testing.assert_close(stack.delta_u.grad.double(), ref_u.grad, rtol=1e-4, atol=1e-6)


class ParallelConv(nn.Module):
    """y = Σ_k conv_k(x): K same-shape Conv3d (or ConvTranspose3d) layers with stride, padding, dilation and bias."""

    def __init__(self, k, n_in, n_out, transposed=False):
        super().__init__()
        if transposed:
            make = lambda: nn.ConvTranspose3d(n_in, n_out, (2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 0),  # noqa: E731
                                              output_padding=(1, 0, 0), dilation=(1, 2, 1))
        else:
            make = lambda: nn.Conv3d(n_in, n_out, 3, stride=(1, 2, 1), padding=(1, 0, 2), dilation=(1, 1, 2))  # noqa: E731
        self.convs = nn.ModuleList([make() for _ in range(k)])

    def forward(self, x):
        return sum(conv(x) for conv in self.convs)


@pytest.mark.parametrize("projected, transposed", [(True, False), (False, False), (False, True)])
def test_conv_core_gradient_against_an_explicit_reference(projected, transposed):
    """The conv projected gradient (((G·C)ᵀX)·Rᵀ through a K·r-channel weight gradient) and the dense path (the
    one transposed convolutions take) both equal a float64 reference that writes Δ𝒲 out and lets autograd
    differentiate plain convolutions; so does the input gradient."""
    k, n_in, n_out, rank, scale = 3, 4, 40, 2, 0.6
    torch.manual_seed(0)
    model = ParallelConv(k, n_in, n_out, transposed)
    x = torch.randn(2, n_in, 7, 9, 8)
    g = torch.randn_like(model(x))
    convs = list(model.convs)  # the plain layers (wrapped by the adapter below)
    inject_adapter(model, TCURLoRAConfig(preset="none", stacks={"conv": [r"convs\.\d+"]}, rank=rank, scale=scale))
    stack = get_adapter(model).stacks["conv"]
    assert stack.projected == (not transposed)  # K·r = 6, 40 output channels: a conv projects …
    stack.projected = projected  # … and the dense path is forced for the comparison
    du = torch.randn(k, rank, rank, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        stack.delta_u.copy_(du)
    xg = x.clone().requires_grad_(True)
    (model(xg) * g).sum().backward()

    w = torch.stack([weight_to_matrix(conv, conv.weight.detach()).double() for conv in convs])
    c, r = w[:, :, stack.cols], w[:, stack.rows, :]
    ref_u = du.double().requires_grad_(True)
    ref_x = x.double().requires_grad_(True)
    delta = scale * block_circulant_product(block_circulant_product(c, ref_u), r)
    y = 0
    for i, conv in enumerate(convs):
        weight = matrix_to_weight(conv, w[i] + delta[i])
        if transposed:
            y = y + torch.nn.functional.conv_transpose3d(ref_x, weight, conv.bias.double(), conv.stride, conv.padding,
                                                         conv.output_padding, 1, conv.dilation)
        else:
            y = y + torch.nn.functional.conv3d(ref_x, weight, conv.bias.double(), conv.stride, conv.padding,
                                               conv.dilation)
    (y * g.double()).sum().backward()
    torch.testing.assert_close(stack.delta_u.grad.double(), ref_u.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(xg.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-5)


def test_a_container_selected_for_full_training_trains_its_children():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Conv3d(1, 2, 1), nn.Conv3d(2, 2, 1)])

        def forward(self, x):
            for i in range(len(self.stages)):  # nnU-Net's decoder counts and indexes its ModuleLists
                x = self.stages[i](x)
            return x

    model = seeded(Net)
    inject_adapter(model, TCURLoRAConfig(method="decoder", train_modules=["stages"]))
    assert list(get_adapter(model).trained) == ["stages.0", "stages.1"]
    model(X).sum().backward()
    assert all(p.grad is not None for p in get_adapter(model).parameters())


def test_a_lora_adapter_can_be_removed_exactly():
    from peft.tuners.lora import LoraLayer

    model = seeded(ConvNet)
    base = model(X).detach()
    keys = list(model.state_dict())
    inject_adapter(model, TCURLoRAConfig(method="lora", preset="conv", rank=2), "lora")
    assert any(isinstance(m, LoraLayer) for m in model.modules())
    get_tuner(model).delete_adapter("lora")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(X).detach(), base, rtol=0, atol=0)
    inject_adapter(model, TCURLoRAConfig(rank=2), "after")  # the model is free for any adapter again


@pytest.mark.parametrize("config", [TCURLoRAConfig(method="decoder", train_modules=["stages"]),
                                    TCURLoRAConfig(method="full"),
                                    TCURLoRAConfig(method="lora", preset="conv", rank=2)],
                         ids=["decoder", "full", "lora"])
def test_aliased_tensors_are_saved_once_and_load_into_every_name(config, tmp_path):
    from tcurlora import load_adapter, save_adapter

    model = seeded(AliasedNet)
    inject_adapter(model, config)
    with torch.no_grad():
        for p in get_tuner(model).trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
        adapted = model(X)
    state = adapter_state_dict(model)
    assert len({id(v) for v in get_tuner(model).adapter_state_dict(keep_vars=True).values()}) == len(state)
    save_adapter(model, tmp_path / "a.safetensors")  # safetensors refuses tensors that share memory
    fresh = seeded(AliasedNet)
    load_adapter(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), adapted, rtol=1e-6, atol=1e-6)


def test_lora_reaches_every_alias_of_a_layer():
    from peft.tuners.lora import LoraLayer

    model = seeded(AliasedNet)
    inject_adapter(model, TCURLoRAConfig(method="lora", preset="conv", rank=2))
    for block in model.stages:
        assert isinstance(block.conv, LoraLayer) and block.all_modules[0] is block.conv


# ------------------------------------------------------------------------------------------ decoder-side


def _plain_conv_unet():
    """nnU-Net's PlainConvUNet (its own architecture package), small; decoder patterns as the nnU-Net loader
    declares them."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 2, (2, 2), True,
                        nn.InstanceNorm3d, {"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=False)
    return net.eval(), [r"decoder\.(stages|transpconvs)\.\d+(\..*)?", r"decoder\.seg_layers\.1(\..*)?"]


def test_decoder_preset_adapts_only_the_decoder_and_backward_never_enters_the_encoder(tmp_path):
    """``preset="decoder"`` is the CLI's ``--preset decoder`` in the Python API too: the conv stacks of the decoder
    modules the base model declares (or of ``target_modules``), and nothing of the encoder."""
    from tcurlora.adapter import describe_adapter
    from tcurlora.adapter_file import load_adapter, save_adapter
    from tcurlora.errors import TCURLoRAError
    from tcurlora.models import BaseModel
    from tcurlora.preprocess import Preprocessing
    from tcurlora.train import FinetuneOptions, build_adapter_config

    net, decoder = _plain_conv_unet()
    reference = copy.deepcopy(net)
    labels = [{"value": 1, "name": "a", "color": [1, 0, 0]}, {"value": 2, "name": "b", "color": [0, 1, 0]}]
    base = BaseModel("plain", net, labels, Preprocessing(patch_size=(16, 16, 16)), decoder_modules=decoder)
    plain = BaseModel("plain", copy.deepcopy(reference), labels, Preprocessing(patch_size=(16, 16, 16)))
    assert build_adapter_config(base, FinetuneOptions(preset="decoder"), labels).preset == "decoder"
    with pytest.raises(TCURLoRAError, match="declares no decoder modules"):
        build_adapter_config(plain, FinetuneOptions(preset="decoder"), labels)
    with pytest.raises(TCURLoRAError, match="preset 'decoder' needs the decoder's modules"):
        inject_adapter(plain.network, TCURLoRAConfig(rank=2, preset="decoder"))

    inject_adapter(base.network, TCURLoRAConfig(rank=2, preset="decoder"))
    assert describe_adapter(net)["config"]["target_modules"] == decoder
    members = [m["module"] for stack in describe_adapter(net)["stacks"] for m in stack["members"]]
    assert members and all(name.startswith("decoder.") for name in members), members
    encoder_outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: encoder_outputs.append(out))
             for m in net.encoder.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        perturb(net)
    x = torch.randn(1, 1, 16, 16, 16)
    net(x).square().mean().backward()
    for h in hooks:
        h.remove()
    assert encoder_outputs and not any(out.requires_grad for out in encoder_outputs)  # no graph in the encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in get_tuner(net).trainable_parameters())

    # the choice travels in the adapter file: the same layers come back on a fresh copy of the base
    path = tmp_path / "decoder_side.safetensors"
    save_adapter(net, path)
    for p in reference.parameters():
        p.requires_grad_(False)
    load_adapter(reference, path)
    with torch.no_grad():
        assert torch.equal(reference(x), net(x))
    assert describe_adapter(reference)["config"]["target_modules"] == decoder
    assert describe_adapter(reference)["config"]["preset"] == "decoder"
