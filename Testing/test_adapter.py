"""tCURLoRA injection on real MONAI networks: training really reaches the cores, merge is exact."""

import copy

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import UNETR, DynUNet, SegResNet, SwinUNETR, UNet

import tcurlora
from tcurlora import (TCURLoRAConfig, adapter_state_dict, inject_adapter, merge_adapter,
                      trainable_parameter_count, unmerge_adapter)
from tcurlora.adapter import get_adapter, list_adapters, set_active_adapter
from tcurlora.tuners import TCURStack, get_tuner


def small_unetr():
    return UNETR(1, 3, (32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=384, num_heads=4)


class TinyNet(nn.Module):
    """An arbitrary module: not MONAI, mixed Conv3d/ConvTranspose3d/Linear."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Conv3d(1, 8, 3, padding=1)
        self.enc2 = nn.Conv3d(8, 8, 3, padding=1)
        self.enc3 = nn.Conv3d(8, 8, 3, padding=1)
        self.down = nn.Conv3d(8, 8, 2, stride=2)
        self.up = nn.ConvTranspose3d(8, 8, 2, stride=2)
        self.up2 = nn.ConvTranspose3d(8, 8, 3, padding=1)
        self.head = nn.Conv3d(8, 2, 1)

    def forward(self, x):
        x = torch.relu(self.enc1(x))
        x = torch.relu(self.enc3(torch.relu(self.enc2(x))))
        x = self.up2(self.up(torch.relu(self.down(x))))
        return self.head(x)


NETWORKS = {
    "unetr": (small_unetr, (1, 1, 32, 32, 32)),
    "swinunetr": (lambda: SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), spatial_dims=3), (1, 1, 64, 64, 64)),
    "unet": (lambda: UNet(3, 1, 2, (8, 16, 16), (2, 2), num_res_units=1), (1, 1, 16, 16, 16)),
    "segresnet": (lambda: SegResNet(3, 8, 1, 2, blocks_down=(1, 2), blocks_up=(1,)), (1, 1, 16, 16, 16)),
    "dynunet": (lambda: DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[8, 16, 16]), (1, 1, 16, 16, 16)),
    "tiny": (TinyNet, (1, 1, 8, 8, 8)),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    factory, shape = NETWORKS[name]
    model = factory().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return model, x


def output(model, x):
    out = model(x)
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("name", list(NETWORKS))
def test_adapter_trains_cores_and_only_cores(name):
    model, x = build(name)
    with torch.no_grad():
        base_out = output(model, x).clone()
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inject_adapter(model, TCURLoRAConfig(rank=2))
    stacks = list(get_adapter(model).stacks.values())
    assert stacks, "the preset found no stack"

    # identical to the base model at initialisation (Δ𝒰 = 0)
    with torch.no_grad():
        torch.testing.assert_close(output(model, x), base_out, rtol=0, atol=0)

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is s.delta_u for s in stacks) for p in trainable)
    opt = torch.optim.Adam(trainable, lr=1e-2)
    loss = output(model, x).square().mean()
    loss.backward()
    for s in stacks:  # the defect of the published code: its cores never got a gradient
        assert s.delta_u.grad is not None and s.delta_u.grad.abs().sum() > 0, s.name
    opt.step()
    with torch.no_grad():
        assert (output(model, x) - base_out).abs().max() > 1e-6
    from tcurlora.adapter import base_state_dict
    after = base_state_dict(model)
    assert set(after) == set(frozen)
    for k, v in frozen.items():
        assert torch.equal(after[k], v), f"frozen tensor {k} moved"


@pytest.mark.parametrize("name", list(NETWORKS))
def test_merge_matches_unmerged_and_unmerge_restores_exactly(name):
    model, x = build(name)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inject_adapter(model, TCURLoRAConfig(rank=3))
    with torch.no_grad():
        for s in get_adapter(model).stacks.values():
            s.delta_u.normal_(0, 0.05)
        unmerged = output(model, x).clone()
        merge_adapter(model)
        merged = output(model, x)
        rel = (merged - unmerged).abs().max() / unmerged.abs().max()
        assert rel <= 1e-5
        assert (merged - output(build(name)[0], x)).abs().max() > 1e-5  # the adapter did something
        unmerge_adapter(model)
        torch.testing.assert_close(output(model, x), unmerged, rtol=0, atol=0)
    from tcurlora.adapter import base_state_dict
    for k, v in base_state_dict(model).items():
        assert torch.equal(v, base[k]), k


def test_vit_preset_on_unetr_vit_b_has_72_r2_values():
    torch.manual_seed(0)
    with torch.device("meta"):  # ViT-B shapes without allocating 92M weights
        model = UNETR(1, 2, (96, 96, 96), feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12)
    from tcurlora.adapter import resolve_stacks
    specs = resolve_stacks(model, TCURLoRAConfig(preset="vit"))
    assert [(s.name, len(s.members)) for s in specs] == [
        ("attn_768x768", 48), ("mlp_up_3072x768", 12), ("mlp_down_768x3072", 12)]
    # build for real on a ViT-B-shaped but cheap stand-in: 12 blocks, hidden 768
    real = UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=768, mlp_dim=3072, num_heads=12)
    for r in (1, 8):
        m = copy.deepcopy(real)
        inject_adapter(m, TCURLoRAConfig(preset="vit", rank=r))
        assert trainable_parameter_count(m) == 72 * r * r


def test_attention_member_order_is_out_q_k_v():
    model = small_unetr()
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=2))
    attn = get_adapter(model).stacks["attn_96x96"]
    first = [(m.module, m.rows) for m in attn.members[:4]]
    assert first == [("vit.blocks.0.attn.out_proj", None), ("vit.blocks.0.attn.qkv", (0, 96)),
                     ("vit.blocks.0.attn.qkv", (96, 192)), ("vit.blocks.0.attn.qkv", (192, 288))]
    assert attn.k == 48


@pytest.mark.parametrize("rank,expected", [(4, {"mlp_up_384x96", "mlp_down_96x384"}),
                                           (1, {"attn_96x96", "mlp_up_384x96", "mlp_down_96x384"})])
def test_projected_gradient_equals_dense_autograd(rank, expected):
    """The core gradient taken from activations (fused qkv included) equals autograd through dense ΔW."""
    model, x = build("unetr")
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=rank))
    stacks = get_adapter(model).stacks
    projected_stacks = [s for s in stacks.values() if s.projected]
    assert {s.name for s in projected_stacks} == expected
    with torch.no_grad():
        for s in stacks.values():
            s.delta_u.normal_(0, 0.01)
    output(model, x).square().mean().backward()
    projected = {s.name: s.delta_u.grad.clone() for s in projected_stacks}
    model.zero_grad()
    for s in projected_stacks:
        s.projected = False
    output(model, x).square().mean().backward()
    for s in projected_stacks:
        assert projected[s.name].abs().sum() > 0
        torch.testing.assert_close(projected[s.name], s.delta_u.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 12, 48])
def test_inverse_dft_matrix_equals_irfft(k):
    from tcurlora.tuners.fourier import inverse_dft_matrix
    x_hat = torch.fft.rfft(torch.randn(k, 7, 3, dtype=torch.float64), dim=0)
    x_hat += 1j * torch.randn_like(x_hat.real)  # irfft must ignore the imaginary DC / Nyquist parts too
    stacked = torch.stack([x_hat.real, x_hat.imag], 1).reshape(2 * (k // 2 + 1), -1)
    got = inverse_dft_matrix(k).double() @ stacked
    torch.testing.assert_close(got.reshape(k, 7, 3), torch.fft.irfft(x_hat, n=k, dim=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inverse", ["gemm", "irfft"])
def test_delta_w_is_the_t_product_of_c_core_r_on_both_paths(inverse, monkeypatch):
    from tcurlora.tuners import fourier
    from tcurlora.tuners.stacks import member_matrix
    from tcurlora.tensor import t_product
    if inverse == "irfft":  # the path of stacks longer than IDFT_GEMM_MAX_K
        monkeypatch.setattr(fourier, "IDFT_GEMM_MAX_K", 0)
    model, x = build("unetr")
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=3))
    for stack in get_adapter(model).stacks.values():
        with torch.no_grad():
            stack.delta_u.normal_(0, 0.1)
        w = torch.stack([member_matrix(model, m) for m in stack.members]).detach()
        expected = t_product(t_product(w[:, :, stack.cols], stack.delta_u.detach()), w[:, stack.rows, :])
        detached = stack.delta_w(detached=True).clone()
        with_grad = torch.stack(stack.member_slices())
        assert with_grad.requires_grad
        torch.testing.assert_close(detached, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-4, atol=1e-6)


def test_training_reuses_the_delta_w_buffer_and_merge_releases_it():
    model, x = build("unetr")
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=2))
    stacks = [s for s in get_adapter(model).stacks.values() if s.projected]
    assert stacks  # the projected path reads the detached (buffered) Δ𝒲
    opt = torch.optim.Adam([s.delta_u for s in get_adapter(model).stacks.values()], lr=1e-2)
    pointers = []
    for _ in range(2):
        output(model, x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        pointers.append([s._buffer.data_ptr() for s in stacks])
    assert pointers[0] == pointers[1]  # no large allocation per step
    merge_adapter(model)
    assert all(s._buffer is None for s in stacks) and get_tuner(model)._work is None


def test_delta_w_is_built_once_per_forward(monkeypatch):
    model, x = build("unetr")
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=2))
    calls = []
    real = TCURStack._build
    monkeypatch.setattr(TCURStack, "_build", lambda self, grad: calls.append(1) or real(self, grad))
    output(model, x).sum().backward()
    assert len(calls) == 3  # three stacks, 72 member layers
    autograd_stacks = sum(not s.projected for s in get_adapter(model).stacks.values())
    assert 0 < autograd_stacks < 3
    output(model, x)  # a new graph for the autograd stacks; the projected ones' Δ𝒲 is still current
    assert len(calls) == 3 + autograd_stacks
    with torch.no_grad():
        for s in get_adapter(model).stacks.values():
            s.delta_u.add_(0.01)
    output(model, x)  # the cores changed: every stack is rebuilt
    assert len(calls) == 6 + autograd_stacks


def test_backward_through_a_rewritten_delta_w_is_refused():
    """Two forwards with the same cores share the projected layers' Δ𝒲 and backpropagate together; a
    backward whose Δ𝒲 was rebuilt (the cores changed in between) raises instead of using the new one."""
    model, x = build("unetr")
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=2))
    stacks = list(get_adapter(model).stacks.values())
    with torch.no_grad():
        for s in stacks:
            s.delta_u.normal_(0, 0.05)
    output(model, x).square().mean().backward()
    once = [s.delta_u.grad.clone() for s in stacks]
    model.zero_grad()
    (output(model, x).square().mean() + output(model, x).square().mean()).backward()
    for g, s in zip(once, stacks):
        torch.testing.assert_close(s.delta_u.grad, 2 * g, rtol=1e-5, atol=1e-8)

    projected = [s for s in stacks if s.projected]
    assert projected and len(projected) < len(stacks)
    for rebuild in (False, True):
        model.zero_grad()
        loss = output(model, x).square().mean()
        with torch.no_grad():  # (the autograd stacks save their core: changing it is refused anyway)
            for s in projected:
                s.delta_u.add_(0.01)
        if not rebuild:
            loss.backward()  # Δ𝒲 untouched since this forward: its gradient is still well defined
            continue
        output(model, x)  # rebuilds the projected stacks' Δ𝒲 in their buffers
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_explicit_stacks_and_train_modules():
    model, x = build("tiny")
    cfg = TCURLoRAConfig(preset="none", stacks={"encoder": [r"enc[23]"]}, rank=2, train_modules=["head"])
    inject_adapter(model, cfg)
    adapter = get_adapter(model)
    assert list(adapter.stacks) == ["encoder"] and adapter.stacks["encoder"].k == 2
    head_params = sum(p.numel() for p in model.head.base_module.parameters())
    assert trainable_parameter_count(model) == 2 * 2 * 2 + head_params
    assert set(adapter_state_dict(model)) == {"stacks.encoder.delta_u", "trained.head.weight", "trained.head.bias"}


def test_named_adapters_switch_without_reloading():
    model, x = build("tiny")
    with torch.no_grad():
        base_out = output(model, x).clone()
    inject_adapter(model, TCURLoRAConfig(rank=2, exclude_modules=["head"]), "siteA")
    inject_adapter(model, TCURLoRAConfig(rank=2, train_modules=["head"]), "siteB")
    with torch.no_grad():
        for name in ("siteA", "siteB"):
            for s in get_adapter(model, name).stacks.values():
                s.delta_u.normal_(0, 0.1)
        set_active_adapter(model, "siteA")
        a = output(model, x).clone()
        set_active_adapter(model, "siteB")
        b = output(model, x).clone()
        set_active_adapter(model, None)
        torch.testing.assert_close(output(model, x), base_out, rtol=0, atol=0)
        set_active_adapter(model, "siteA")
        merge_adapter(model)
        torch.testing.assert_close(output(model, x), a, rtol=1e-5, atol=1e-6)
        set_active_adapter(model, "siteB")  # unmerges siteA first
        torch.testing.assert_close(output(model, x), b, rtol=1e-5, atol=1e-6)
    assert list_adapters(model) == ["siteA", "siteB"]
    assert not torch.allclose(a, b)


def test_new_head_changes_output_channels():
    model, x = build("tiny")
    inject_adapter(model, TCURLoRAConfig(rank=2, new_head={"module": "head", "out_channels": 4}))
    out = output(model, x)
    assert out.shape[1] == 4
    set_active_adapter(model, None)
    assert output(model, x).shape[1] == 2


@pytest.mark.parametrize("method", ["lora", "decoder", "full"])
def test_baselines_through_the_same_api(method):
    model, x = build("unetr")
    n_all = sum(p.numel() for p in model.parameters())
    cfg = TCURLoRAConfig(method=method, preset="vit", rank=8, train_modules=["decoder2", "out"])
    inject_adapter(model, cfg)
    n = trainable_parameter_count(model)
    if method == "full":
        assert n == n_all
    elif method == "decoder":
        dec = sum(p.numel() for name in ("decoder2", "out") for p in getattr(build("unetr")[0], name).parameters())
        assert n == dec
    else:
        dec = sum(p.numel() for name in ("decoder2", "out") for p in getattr(build("unetr")[0], name).parameters())
        # LoRA on out_proj (96→96), qkv (96→288), linear1 (96→384), linear2 (384→96) of 12 blocks
        per_block = 8 * (96 + 96) + 8 * (96 + 288) + 8 * (96 + 384) + 8 * (384 + 96)
        assert n == 12 * per_block + dec
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    output(model, x).square().mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    with torch.no_grad():
        unmerged = output(model, x).clone()
        if method == "lora":
            merge_adapter(model)
            torch.testing.assert_close(output(model, x), unmerged, rtol=1e-4, atol=1e-5)
            unmerge_adapter(model)
    assert adapter_state_dict(model)


def test_rank_clamped_to_small_layers_and_bad_config_rejected():
    with pytest.raises(ValueError):
        TCURLoRAConfig(method="qlora")
    with pytest.raises(ValueError):
        TCURLoRAConfig(rank=0)
    model, x = build("tiny")
    inject_adapter(model, TCURLoRAConfig(rank=64))
    for s in get_adapter(model).stacks.values():
        assert s.rank == min(s.n1, s.n2, 64)


def test_public_api_is_importable_from_the_package():
    for name in ("TCURLoRAConfig", "inject_adapter", "merge_adapter", "unmerge_adapter",
                 "adapter_state_dict", "trainable_parameter_count"):
        assert callable(getattr(tcurlora, name))


@pytest.mark.parametrize("name", ["unetr", "tiny"])
def test_bf16_autocast_and_activation_checkpointing(name):
    """Under bf16 autocast the stack product stays fp32 (torch.fft has no bf16); with activation
    checkpointing the recomputed blocks read the same Δ𝒲 and the core gradients are unchanged."""
    from tcurlora.train import enable_activation_checkpointing

    model, x = build(name)
    inject_adapter(model, TCURLoRAConfig(rank=2))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = output(model, x)
    out.float().square().mean().backward()
    assert all(s.delta_u.grad.abs().sum() > 0 for s in get_adapter(model).stacks.values())
    model.zero_grad()
    output(model, x).square().mean().backward()
    plain = [s.delta_u.grad.clone() for s in get_adapter(model).stacks.values()]
    model.zero_grad()
    enable_activation_checkpointing(model)
    output(model, x).square().mean().backward()
    for before, s in zip(plain, get_adapter(model).stacks.values()):
        torch.testing.assert_close(s.delta_u.grad, before, rtol=1e-5, atol=1e-7)


def test_conv_projected_gradient_under_bf16_autocast_with_fp32_inputs():
    """Under autocast a norm layer hands the next conv an fp32 input while its gradient comes back in bf16 (deepbet's
    and nnU-Net's conv → norm → ReLU blocks on a GPU): the projected backward computes in the forward's dtype, and
    its core and input gradients follow the fp32 ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.InstanceNorm3d(16), nn.ReLU(),
                          nn.Conv3d(16, 32, 3, stride=2, padding=1, bias=False), nn.InstanceNorm3d(32), nn.ReLU(),
                          nn.Conv3d(32, 2, 1))
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    inject_adapter(model, TCURLoRAConfig(preset="conv", rank=2))
    stacks = list(get_adapter(model).stacks.values())
    assert any(s.projected for s in stacks)
    with torch.no_grad():
        for s in stacks:
            s.delta_u.normal_(0, 1e-2)
    model.train()

    def grads(autocast: bool):
        model.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
        return [s.delta_u.grad.clone() for s in stacks] + [x.grad.clone()]

    for low, full in zip(grads(True), grads(False)):
        assert low.dtype == full.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(low.flatten(), full.flatten(), dim=0) > 0.99
