"""The paper's baselines (pissa, dora, curlora, lorapt): each trains only its own values, merges exactly, and
round-trips through its adapter file; the index and t-SVD maths against plain references written here."""

import pytest
import torch
import torch.nn as nn

from tcurlora import TCURLoRAConfig, inject_adapter, merge_adapter, trainable_parameter_count, unmerge_adapter
from tcurlora import protocol
from tcurlora.adapter import base_state_dict, get_adapter
from tcurlora.adapter_file import base_fingerprint, load_adapter, save_adapter
from tcurlora.manifest import read_manifest, summary
from tcurlora.tensor import curlora_indices, t_product, t_svd_factors
from tcurlora.tuners import get_tuner
from tcurlora.tuners.baselines import TSVDStack

from test_tuner import X, ConvNet, TinyViT, seeded

BASELINES = ["pissa", "dora", "curlora", "lorapt"]
NETS = {"conv": ConvNet, "vit": TinyViT}


def own_parameters(model, method):
    """The parameters that belong to the adapter, found by name (not through the tuner under test)."""
    marks = {"pissa": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
             "curlora": ("delta_u",), "lorapt": ("principal_left", "principal_right")}[method]
    return {n: p for n, p in model.named_parameters() if any(f".{m}" in n for m in marks)}


@pytest.mark.parametrize("method", protocol.METHODS)
def test_each_method_has_its_strategy_and_its_traits_name_what_it_trains(method):
    """The method-traits table and the registry agree: every method in the table has one strategy, the PEFT ones
    are PEFT's LoRA layers, and the tensor names of its traits are those of the parameters its adapter trains."""
    from tcurlora.tuners.registry import STRATEGIES
    from tcurlora.tuners.strategies import LoraStrategy

    assert sorted(STRATEGIES) == sorted(protocol.METHODS)
    traits = protocol.METHOD_TRAITS[method]
    assert isinstance(STRATEGIES[method], LoraStrategy) == traits.peft
    every_name = {name for t in protocol.METHOD_TRAITS.values() for name in t.tensors}
    model = seeded(ConvNet)
    inject_adapter(model, TCURLoRAConfig(method=method, rank=2, train_modules=["dec"] if method == "decoder" else []))
    trained = {part for n, p in model.named_parameters() if p.requires_grad for part in n.split(".")}
    optional = {"norm_scale", "norm_shift"} if method == "tcurlora" else set()  # with norm_scale_shift only
    assert trained & every_name == set(traits.tensors) - optional
    assert any(p.requires_grad for p in model.parameters())
    if optional:  # a network with norms in the decoder its base declares
        from monai.networks.nets import UNet

        from tcurlora.tuners import get_tuner

        torch.manual_seed(0)
        model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1)
        get_tuner(model).base_info = {"name": "unet", "decoder_modules": [r"model\.2(\..*)?"]}
        inject_adapter(model, TCURLoRAConfig(method=method, rank=2, preset="conv", norm_scale_shift=True))
        trained = {part for n, p in model.named_parameters() if p.requires_grad for part in n.split(".")}
        assert trained & every_name == set(traits.tensors)


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", BASELINES)
def test_trains_only_its_own_values_merges_exactly_and_round_trips(method, net, tmp_path):
    model = seeded(NETS[net])
    with torch.no_grad():
        base_out = model(X)
    original = base_fingerprint(model)
    inject_adapter(model, TCURLoRAConfig(method=method, rank=2))
    with torch.no_grad():  # the adapter starts as the identity (PiSSA: principal + residual = W, up to rounding)
        torch.testing.assert_close(model(X), base_out, rtol=1e-5, atol=1e-6)
    own = own_parameters(model, method)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert own and set(trainable) == set(own)
    assert trainable_parameter_count(model) == sum(p.numel() for p in own.values())
    frozen = {k: v.clone() for k, v in base_state_dict(model).items()}

    opt = torch.optim.Adam(trainable.values(), lr=2e-2)
    for _ in range(3):
        opt.zero_grad()
        model(X).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items()
                   if "lora_A" not in n or method != "dora"), method  # DoRA/LoRA: A gets a gradient once B ≠ 0
        opt.step()
    after = base_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # only the adapter moved
    with torch.no_grad():
        trained = model(X)
        assert (trained - base_out).abs().max() > 1e-3
        merge_adapter(model)
        merged = model(X)
        assert (merged - trained).abs().max() <= 1e-5 * trained.abs().max()
        unmerge_adapter(model)
        torch.testing.assert_close(model(X), trained, rtol=0, atol=0)
    after = base_state_dict(model)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # unmerge restored every bit

    path = tmp_path / f"{method}.safetensors"
    manifest = save_adapter(model, path, labels=[{"value": 1, "name": "x", "color": [1, 0, 0]}])
    assert manifest["base"]["fingerprint"] == original  # PiSSA changed the base: the file names the original
    assert read_manifest(path)["method"]["name"] == method
    assert manifest["method"]["trainable_values"] == sum(p.numel() for p in own.values())
    fresh = seeded(NETS[net])
    load_adapter(fresh, path, adapter_name="loaded")
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), trained, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_pissa_residual_plus_principal_is_the_base_and_the_file_holds_no_residual(tmp_path):
    model = seeded(TinyViT)
    weight = model.blocks[0].mlp.fc1.weight.detach().clone()
    inject_adapter(model, TCURLoRAConfig(method="pissa", rank=2))
    layer = model.blocks[0].mlp.fc1
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # the factors are the top-2 singular triplets of the original weight, √σ on each side
    u, s, vh = torch.linalg.svd(weight)
    torch.testing.assert_close(b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight + b @ a, weight, rtol=1e-5, atol=1e-6)
    save_adapter(model, tmp_path / "p.safetensors")
    from safetensors.torch import load_file
    assert all("lora_" in k for k in load_file(tmp_path / "p.safetensors"))
    # on a base the file was not trained on, the residual would differ: refused by the fingerprint
    other = seeded(TinyViT, seed=1)
    with pytest.raises(Exception, match="trained on base model"):
        load_adapter(other, tmp_path / "p.safetensors")


def test_pissa_on_conv_layers_follows_peft_rule_on_the_matrix():
    model = seeded(ConvNet)
    weight = model.dec[0].weight.detach().clone()
    inject_adapter(model, TCURLoRAConfig(method="pissa", rank=2))
    layer = model.dec[0]
    a = layer.lora_A["default"].weight.reshape(2, -1)
    b = layer.lora_B["default"].weight.reshape(-1, 2)
    matrix = weight.reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.reshape(matrix.shape) + b @ a, matrix, rtol=1e-5, atol=1e-6)


def test_dora_covers_conv3d_and_linear_layers():
    for factory, kinds in ((ConvNet, nn.Conv3d), (TinyViT, nn.Linear)):
        model = seeded(factory)
        inject_adapter(model, TCURLoRAConfig(method="dora", rank=2))
        targets = get_adapter(model).lora_targets
        layers = [m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector]
        assert targets and len(layers) == len(targets)
        assert all(isinstance(m.get_base_layer(), kinds) for m in layers)


# ------------------------------------------------------------------------------------------------
# CURLoRA


def reference_curlora_indices(w: torch.Tensor, rank: int, seed: int):
    """arXiv 2408.14572 written out: p_j = ‖W(:, j)‖² / ‖W‖_F², p̃_j = (1/p_j) / Σ_i (1/p_i), r columns drawn
    without replacement; then the rows alike."""
    gen = torch.Generator().manual_seed(seed)
    total = (w.double() ** 2).sum()
    picks = []
    for dim in (0, 1):
        p = (w.double() ** 2).sum(dim=dim) / total
        inverted = (1 / p) / (1 / p).sum()
        picks.append(torch.multinomial(inverted, rank, replacement=False, generator=gen).sort().values)
    return picks


def test_curlora_indices_follow_the_paper_rule():
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 9)
    for seed in range(5):
        cols, rows = curlora_indices(w, 3, torch.Generator().manual_seed(seed))
        ref_cols, ref_rows = reference_curlora_indices(w, 3, seed)
        assert torch.equal(cols, ref_cols) and torch.equal(rows, ref_rows)
    # the low-energy columns are the likely ones: single draws match p̃ in frequency
    n = 3000
    counts = torch.zeros(9)
    for seed in range(n):
        counts[curlora_indices(w, 1, torch.Generator().manual_seed(seed))[0]] += 1
    p = (w ** 2).sum(0)
    expected = (1 / p) / (1 / p).sum()
    assert (counts / n - expected).abs().max() < 0.03
    assert counts[0] > counts[-1] * 5


def test_curlora_layer_update_is_c_u_r_of_its_own_weight():
    model = seeded(TinyViT)
    inject_adapter(model, TCURLoRAConfig(method="curlora", rank=3, seed=7))
    stacks = get_adapter(model).stacks
    # one stack per layer and per q/k/v block: 2 blocks × (out, q, k, v, fc1, fc2)
    assert len(stacks) == 12 and all(s.k == 1 for s in stacks.values())
    stack = stacks["blocks__0__attn__qkv__rows16_32"]  # the k block of the fused projection
    w = model.blocks[0].attn.qkv.base_layer.weight.detach()[16:32]
    cols, rows = stack.cols, stack.rows
    u = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stack.delta_u.copy_(u[None])
    expected = w[:, cols] @ u @ w[rows, :]
    torch.testing.assert_close(stack.delta_w(detached=True)[0], expected, rtol=1e-5, atol=1e-6)
    # the seed decides the indices, reproducibly
    again = seeded(TinyViT)
    inject_adapter(again, TCURLoRAConfig(method="curlora", rank=3, seed=7))
    assert all(torch.equal(a.cols, b.cols) and torch.equal(a.rows, b.rows)
               for a, b in zip(stacks.values(), get_adapter(again).stacks.values()))


# ------------------------------------------------------------------------------------------------
# LoRA-PT


def reference_tubal_truncation(w: torch.Tensor, rank: int) -> torch.Tensor:
    """Best tubal-rank-r approximation: full DFT along the stack, truncated SVD of every slice, inverse DFT."""
    w_hat = torch.fft.fft(w.double(), dim=0)
    u, s, vh = torch.linalg.svd(w_hat, full_matrices=False)
    approx = u[:, :, :rank] @ torch.diag_embed(s[:, :rank]).to(u.dtype) @ vh[:, :rank]
    return torch.fft.ifft(approx, dim=0).real


@pytest.mark.parametrize("k", [1, 4, 5])
def test_t_svd_factors_give_the_best_tubal_approximation(k):
    w = torch.randn(k, 7, 6, generator=torch.Generator().manual_seed(k))
    a, b = t_svd_factors(w, 2)
    assert a.shape == (k, 7, 2) and b.shape == (k, 2, 6)
    torch.testing.assert_close(t_product(a, b).double(), reference_tubal_truncation(w, 2), rtol=1e-4, atol=1e-5)
    a, b = t_svd_factors(w, 6)  # full rank: the whole tensor
    torch.testing.assert_close(t_product(a, b), w, rtol=1e-4, atol=1e-5)


def test_lorapt_delta_is_the_change_of_the_principal_product():
    model = seeded(ConvNet)
    inject_adapter(model, TCURLoRAConfig(method="lorapt", rank=2))
    stacks = get_adapter(model).stacks
    assert all(isinstance(s, TSVDStack) for s in stacks.values())
    stack = max(stacks.values(), key=lambda s: s.k)
    assert stack.k > 1
    a0, b0 = stack.principal_left.detach().clone(), stack.principal_right.detach().clone()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        stack.principal_left.add_(torch.randn(a0.shape, generator=gen) * 0.1)
        stack.principal_right.add_(torch.randn(b0.shape, generator=gen) * 0.1)
    expected = t_product(stack.principal_left.detach(), stack.principal_right.detach()) - t_product(a0, b0)
    torch.testing.assert_close(stack.delta_w(detached=True), expected, rtol=1e-4, atol=1e-5)
    model.train()
    torch.testing.assert_close(stack.member_slices()[0].detach(), expected[0], rtol=1e-4, atol=1e-5)
    # the file stores the trained 𝒜, ℬ under their own names; the manifest lists the t-SVD stacks
    state = get_tuner(model).adapter_state_dict()
    assert {k.rsplit(".", 1)[1] for k in state} == {"principal_left", "principal_right"}
    described = get_tuner(model).describe()
    assert described["stacks"] == [] and len(described["tsvd_stacks"]) == len(stacks)
    manifest = {"method": {"name": "lorapt", **described}, "base": {"name": "b", "fingerprint": "sha256:0"},
                "labels": [], "provenance": {}, "format_version": "1.0"}
    assert f"{len(stacks)} stacks" in summary(manifest)


def test_pissa_rank_above_a_conv_matrix_rank_leaves_the_extra_components_zero():
    model = nn.Sequential(nn.Conv3d(6, 3, 1), nn.ReLU(), nn.Conv3d(3, 3, 3, padding=1))
    torch.manual_seed(0)
    x = torch.randn(1, 6, 4, 4, 4)
    with torch.no_grad():
        before = model(x)
    inject_adapter(model, TCURLoRAConfig(method="pissa", rank=4, preset="conv"))
    layer = model[0]
    assert layer.lora_A["default"].weight.shape[0] == 4
    assert torch.equal(layer.lora_A["default"].weight[3], torch.zeros_like(layer.lora_A["default"].weight[3]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_removing_a_pissa_adapter_puts_the_original_weights_back():
    from tcurlora.adapter import delete_adapter

    model = seeded(ConvNet)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapter(model, TCURLoRAConfig(method="pissa", rank=2))
    assert not torch.equal(model.dec[0].base_layer.weight, original["dec.0.weight"])  # the residual
    delete_adapter(model, "default")
    after = model.state_dict()
    assert set(after) == set(original) and all(torch.equal(after[k], v) for k, v in original.items())


def test_a_lorapt_manifest_with_malformed_tsvd_stacks_is_refused(tmp_path):
    import json

    from tcurlora.manifest import ManifestError, parse_manifest

    model = seeded(TinyViT)
    inject_adapter(model, TCURLoRAConfig(method="lorapt", rank=2))
    manifest = save_adapter(model, tmp_path / "t.safetensors")
    parse_manifest(json.dumps(manifest))
    for bad in ({"rank": 0}, {"members": []}, {"k": 99}, {"name": "a.b"}):
        broken = json.loads(json.dumps(manifest))
        broken["method"]["tsvd_stacks"][0].update(bad)
        with pytest.raises(ManifestError, match="malformed stack"):
            parse_manifest(json.dumps(broken))
    broken = json.loads(json.dumps(manifest))
    broken["method"]["name"] = broken["method"]["config"]["method"] = "tcurlora"
    with pytest.raises(ManifestError, match="malformed stack"):  # only lorapt lists t-SVD stacks
        parse_manifest(json.dumps(broken))


def test_inspect_refuses_a_lorapt_file_whose_factors_do_not_fit_its_manifest(tmp_path):
    from safetensors.torch import load_file, save_file

    from tcurlora.manifest import METADATA_KEY, ManifestError, read_header

    model = seeded(TinyViT)
    inject_adapter(model, TCURLoRAConfig(method="lorapt", rank=2))
    path = tmp_path / "t.safetensors"
    save_adapter(model, path)
    metadata, _ = read_header(path)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("principal_left"))
    for change in ("drop", "rank"):
        bad = dict(tensors)
        if change == "drop":
            del bad[key]
        else:
            bad[key] = torch.zeros(*bad[key].shape[:2], 3)
        save_file(bad, tmp_path / "bad.safetensors", metadata={METADATA_KEY: metadata[METADATA_KEY]})
        with pytest.raises(ManifestError, match="principal_left"):
            read_manifest(tmp_path / "bad.safetensors")
