"""A label the base never had: where its output channel starts, and what segment does to it afterwards.

The two-part structure here is real: vertebrae L2 and L4 of the vendored tptbox CT annotation as one label
(L3 lies between them, so it has two 26-connected components).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import CT, CT_VERT

pytestmark = pytest.mark.usefixtures("single_thread")

TWO_PART = [{"value": 1, "name": "L2 and L4"}]  # a label the tiny base (L2, L3, L4) does not have


@pytest.fixture(scope="module")
def two_part_label(tmp_path_factory):
    from scipy import ndimage

    vert = sitk.ReadImage(str(CT_VERT))
    array = np.isin(sitk.GetArrayFromImage(vert), (21, 23)).astype(np.uint8)
    assert ndimage.label(array, structure=np.ones((3, 3, 3)))[1] == 2  # the structure has two parts
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(vert)
    path = tmp_path_factory.mktemp("two_part") / "l2_and_l4.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


def test_the_base_post_processing_applies_to_its_own_labels_only(tiny_base, two_part_label):
    """By default a base that keeps one component per label (deepbet) does so for the labels it has (by name,
    any case), never for a label an adapter added: the real two-part label passes through whole, while the
    same voxels under a base's name lose a part. Asked for (True / False), every label / none."""
    from tcurlora.infer import keep_largest_component, post_processed_values

    tiny_base.largest_component = True
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(two_part_label)))
    new_label = post_processed_values(tiny_base, TWO_PART, None)
    assert new_label == []
    assert np.array_equal(keep_largest_component(truth, new_label), truth)
    own = post_processed_values(tiny_base, [{"value": 1, "name": "l2"}], None)
    assert own == [1]
    assert keep_largest_component(truth, own).sum() < truth.sum()
    assert post_processed_values(tiny_base, TWO_PART, True) == [1]
    assert post_processed_values(tiny_base, [{"value": 1, "name": "L2"}], False) == []
    tiny_base.largest_component = False
    assert post_processed_values(tiny_base, [{"value": 1, "name": "L2"}], None) == []


def test_segment_keeps_every_component_of_a_new_label_by_default(tiny_unet, two_part_label, tmp_path):
    """End to end: an adapter trained on the two-part label, applied by ``segment`` on a base whose own rule is
    one component: by default its output is the plain prediction (as with --all-components), and
    --largest-component still reduces it when asked."""
    from scipy import ndimage

    from tcurlora.events import Events
    from tcurlora.infer import keep_largest_component, segment
    from tcurlora.models import load_base
    from tcurlora.train import FinetuneOptions, finetune

    def base_keeping_one_component():
        base = load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights))
        base.largest_component = True  # the base's own rule, as deepbet's catalog entry declares it
        return base

    adapter = tmp_path / "two_part.safetensors"
    # the tiny base's declared head feeds a residual sum of 4 channels: keep 4 (its L3 and L4 beside the new label)
    table = TWO_PART + [{"value": 22, "name": "L3"}, {"value": 23, "name": "L4"}]
    finetune(base_keeping_one_component(), [(str(CT), str(two_part_label))], adapter, labels=table,
             options=FinetuneOptions(method="tcurlora", rank=2, steps=2, batch_size=1, device="cpu", val_every=100),
             events=Events())
    outputs = {}
    for name, choice in (("default", None), ("all", False), ("one", True)):
        out = tmp_path / f"{name}.nii.gz"
        segment(base_keeping_one_component(), [str(CT)], str(out), adapter=str(adapter), device="cpu",
                largest_component=choice, events=Events())
        outputs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.array_equal(outputs["default"], keep_largest_component(outputs["all"], [22, 23]))  # the base's own
    assert np.array_equal(outputs["default"] == 1, outputs["all"] == 1)  # the new label: every component
    assert np.array_equal(outputs["one"], keep_largest_component(outputs["all"], [1, 22, 23]))
    if ndimage.label(outputs["all"] == 1, structure=np.ones((3, 3, 3)))[1] > 1:
        assert not np.array_equal(outputs["default"] == 1, outputs["one"] == 1)


# --- where a new label's channel starts ---------------------------------------------------------------

def _planted(head_kind: str, seed: int = 0):
    """Features (1, 6, 8, 8, 8) whose channels 2 and 4 carry a planted structure (a ball) under noise, the
    target on the head's output grid, and a new two-channel head started as the old start leaves it (the
    label channel a copy of the background's at a 1 % prior)."""
    from tcurlora.tuners.heads import start_new_head

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 6, 8, 8, 8, generator=g)
    zz, yy, xx = torch.meshgrid(*(torch.arange(8.0),) * 3, indexing="ij")
    ball = ((zz - 4) ** 2 + (yy - 3) ** 2 + (xx - 4) ** 2) <= 6
    features[0, 2] += 2.5 * ball
    features[0, 4] -= 2.0 * ball
    if head_kind == "conv1":
        base = torch.nn.Conv3d(6, 2, 1)
        target = ball.long()[None, None]
    else:  # deepbet's head: a transposed convolution, kernel = stride = 2 (each input voxel -> 2×2×2 outputs)
        base = torch.nn.ConvTranspose3d(6, 2, 2, stride=2)
        target = ball.long().repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)[None, None]
    torch.nn.init.normal_(base.weight, generator=g)
    head = torch.nn.Conv3d(6, 2, 1) if head_kind == "conv1" else torch.nn.ConvTranspose3d(6, 2, 2, stride=2)
    start_new_head(head, base, [0, None])
    return features, target, head


def _dice(head, features, target) -> float:
    with torch.no_grad():
        pred = head(features).argmax(1)
    t = target[:, 0]
    return 2 * float(((pred == 1) & (t == 1)).sum()) / max(1, int((pred == 1).sum() + (t == 1).sum()))


@pytest.mark.parametrize("head_kind", ["conv1", "transposed"])
def test_a_new_label_starts_at_its_prototype_and_classifies_the_training_mask(head_kind):
    """The prototype start finds the planted structure from the start (Dice > 0.8 on the training mask) where
    the old start (a copy of the background at a low prior) predicts none of it; the background channel is
    untouched."""
    from tcurlora.tuners.head_start import prototype_channel

    features, target, head = _planted(head_kind)
    assert _dice(head, features, target) == 0.0
    background = head.weight.detach().clone()
    weight, bias = prototype_channel(head, [(features, target)], channel=1)
    with torch.no_grad():
        head.weight.select(1 if head_kind == "transposed" else 0, 1).copy_(weight)
        head.bias[1] = bias
    assert _dice(head, features, target) > 0.8
    assert torch.equal(head.weight.select(1 if head_kind == "transposed" else 0, 0),
                       background.select(1 if head_kind == "transposed" else 0, 0))


def test_the_prototype_start_is_the_gaussian_posterior_along_the_prototype_direction():
    """For a 1×1×1 head, label log-odds against the background = a·(t − (m₁ + m₀)/2) + log(π/(1 − π)) with
    t = ⟨μ₁ − μ₀, x⟩, m the classes' means of t, a = (m₁ − m₀)/s², s² their mean variance, π the label's
    share: computed here directly from the features and compared."""
    from tcurlora.tuners.head_start import prototype_channel

    features, target, head = _planted("conv1", seed=1)
    x = features[0].reshape(6, -1).double()
    inside = target[0, 0].reshape(-1).bool()
    d = x[:, inside].mean(1) - x[:, ~inside].mean(1)
    t = d @ x
    m1, m0 = t[inside].mean(), t[~inside].mean()
    s2 = 0.5 * (t[inside].var(unbiased=False) + t[~inside].var(unbiased=False))
    prior = float(inside.double().mean())
    expected = (m1 - m0) / s2 * (t - (m1 + m0) / 2) + math.log(prior / (1 - prior))
    weight, bias = prototype_channel(head, [(features, target)], channel=1)
    with torch.no_grad():
        head.weight[1] = weight
        head.bias[1] = bias
        z = head(features)[0].reshape(2, -1).double()
    torch.testing.assert_close(z[1] - z[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,head_start,expected", [
    ("tcurlora", "auto", "prototype"), ("pissa", "auto", "prototype"), ("lora", "auto", "low-prior"),
    ("tcurlora", "low-prior", "low-prior"), ("lora", "prototype", "prototype")])
def test_a_runs_new_label_starts_where_its_head_start_says(tiny_base, two_part_label, tmp_path, method, head_start,
                                                           expected):
    """Through the run's set-up: 'auto' takes the method's own start (tCURLoRA, CURLoRA and PiSSA at the
    prototype, the others at the low prior: the start that gave each the better held-out ventricle Dice on the
    new-structure benchmark); either can be asked for. The low prior is the background less log(99) at every voxel; the prototype start is not."""
    from tcurlora.events import Events
    from tcurlora.train import FinetuneOptions
    from tcurlora.train.setup import adapt_network, set_up_run
    from tcurlora.tuners import get_tuner

    options = FinetuneOptions(method=method, rank=2, steps=1, device="cpu", head_start=head_start)
    assert options.new_head_start() == expected
    run = set_up_run(tiny_base, [(str(CT), str(two_part_label))], tmp_path / "a.safetensors", [],
                     TWO_PART + [{"value": 22, "name": "L3"}, {"value": 23, "name": "L4"}],
                     options, Events(), resume=False, start_from=None)
    adapt_network(run)
    head = get_tuner(run.base.network).record("finetune").new_head()
    outputs = []
    head.register_forward_hook(lambda module, args, out: outputs.append(out))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run.base.network.eval()(x)
    out = outputs[-1]  # the head's own output (the tiny base adds a residual after it)
    at_low_prior = torch.allclose(out[:, 1], out[:, 0] - math.log(99), atol=1e-4)
    assert at_low_prior == (expected == "low-prior")


def test_no_prototype_without_label_voxels():
    """A label absent from the patches keeps its start (None: nothing to measure)."""
    from tcurlora.tuners.head_start import prototype_channel

    features, target, head = _planted("conv1")
    assert prototype_channel(head, [(features, torch.zeros_like(target))], channel=1) is None


# --- the orthonormal basis of a tCURLoRA stack -----------------------------------------------------------

def _small_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 16), strides=(2, 2),
                num_res_units=1).eval()


def _set_cores(network, seed: int) -> None:
    from tcurlora.tuners import get_tuner

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stack in get_tuner(network).record().stacks.values():
            stack.delta_u.copy_(0.05 * torch.randn(stack.delta_u.shape, generator=g))


def test_the_orthonormal_basis_keeps_span_and_values_and_merges_exactly():
    """basis='orthonormal': per Fourier slice the core sits between orthonormal bases of the CUR's own spans:
    every Δ𝒲 it can make is one the CUR basis can make (ΔŴ = P_C ΔŴ P_R), ‖Δ𝒲‖ = ‖Δ𝒱‖, the value count is
    the CUR's, and merging gives the unmerged output and unmerging the exact base weights back."""
    from tcurlora.adapter import inject_adapter, merge_adapter, trainable_parameter_count, unmerge_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.tensor import rfft3
    from tcurlora.tuners import get_tuner

    counts, stacks = {}, {}
    for basis in ("cur", "orthonormal"):
        network = _small_unet()
        inject_adapter(network, TCURLoRAConfig(rank=3, preset="conv", basis=basis))
        counts[basis] = trainable_parameter_count(network)
        stacks[basis] = get_tuner(network).record().stacks
    assert counts["cur"] == counts["orthonormal"]
    network = _small_unet()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    inject_adapter(network, TCURLoRAConfig(rank=3, preset="conv", basis="orthonormal"))
    _set_cores(network, 1)
    for name, stack in get_tuner(network).record().stacks.items():
        cur = stacks["cur"][name]
        delta = stack.delta_w(detached=True).double()
        assert float(delta.norm()) > 0
        torch.testing.assert_close(delta.norm(), stack.delta_u.detach().double().norm() * stack.scale, rtol=1e-4, atol=1e-6)
        c_block = cur.factor("c_block").double()
        n1, r = cur.n1, cur.rank
        c_hat = torch.complex(c_block[:, :n1, :r], c_block[:, n1:, :r])
        r_hat = cur.factor("r_hat").to(torch.complex128)
        d_hat = rfft3(delta)
        projected = (c_hat @ torch.linalg.pinv(c_hat)) @ d_hat @ (torch.linalg.pinv(r_hat) @ r_hat)
        torch.testing.assert_close(projected, d_hat, rtol=1e-4, atol=1e-6)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = network(x)
        merge_adapter(network)
        merged = network(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    unmerge_adapter(network)
    from tcurlora.adapter import base_state_dict

    assert all(torch.equal(before[k], v) for k, v in base_state_dict(network).items())


def test_adapter_files_without_a_basis_load_and_give_the_same_output(tmp_path):
    """A file whose config has no ``basis`` (every file written before the option) loads in the CUR basis and
    gives the output it gave; an orthonormal-basis file reloads to its own output."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import load_adapter, save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.manifest import METADATA_KEY

    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    for basis in ("cur", "orthonormal"):
        network = _small_unet()
        inject_adapter(network, TCURLoRAConfig(rank=3, preset="conv", basis=basis))
        _set_cores(network, 4)
        with torch.no_grad():
            adapted = network(x)
        path = tmp_path / f"{basis}.safetensors"
        save_adapter(network, path, labels=[{"value": 1, "name": "structure", "color": [0.9, 0.3, 0.2]}])
        if basis == "cur":  # as written before the option: the same file without the key
            with safe_open(str(path), "pt") as f:
                metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            manifest = json.loads(metadata[METADATA_KEY])
            del manifest["method"]["config"]["basis"]
            save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(manifest)})
        fresh = _small_unet()
        load_adapter(fresh, path)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-6)


# --- the tCURLoRA options for a new structure: rank-stable scale, norm scale-shift, rank budget, gradient selection


def _affine_unet():
    """The small UNet with affine instance norms (nnU-Net's kind), beside the affine-less ones of MONAI's default."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 16), strides=(2, 2),
                num_res_units=1, norm=("instance", {"affine": True})).eval()


def _introduced(network, decoder=(r"model\.2(\..*)?", r"model\.1\.submodule\.2(\..*)?")):
    """The network with its tuner told its decoder modules (what load_base does for a base)."""
    from tcurlora.tuners import get_tuner

    get_tuner(network).base_info = {"name": "small-unet", "decoder_modules": list(decoder)}
    return network


def _set_norms(network, seed: int) -> None:
    from tcurlora.tuners import get_tuner

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in get_tuner(network).record().norms.values():
            pair.norm_scale.copy_(1 + 0.2 * torch.randn(pair.norm_scale.shape, generator=g))
            pair.norm_shift.copy_(0.2 * torch.randn(pair.norm_shift.shape, generator=g))


def test_the_rank_stable_scale_is_sqrt_8_over_each_stacks_rank_and_merges_exactly():
    """rank_stable: each stack's Δ𝒲 is the plain one times sqrt(8 / its own rank) (1 at rank 8, where the rates
    were chosen), for the same core; a stack clamped below the config's rank takes its own; the merge stays exact."""
    from tcurlora.adapter import inject_adapter, merge_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.tuners import get_tuner

    deltas = {}
    for stable in (False, True):
        network = _small_unet()
        inject_adapter(network, TCURLoRAConfig(rank=4, preset="conv", basis="orthonormal", rank_stable=stable))
        _set_cores(network, 5)
        deltas[stable] = {n: (s.rank, s.delta_w(detached=True).clone()) for n, s in get_tuner(network).record().stacks.items()}
    ranks = {rank for rank, _ in deltas[True].values()}
    assert 4 in ranks and min(ranks) < 4  # a 2-channel stack is clamped to its own rank
    for name, (rank, delta) in deltas[True].items():
        torch.testing.assert_close(delta, deltas[False][name][1] * math.sqrt(8 / rank), rtol=1e-5, atol=1e-7)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        unmerged = network(x)
        merge_adapter(network)
        torch.testing.assert_close(network(x), unmerged, rtol=1e-4, atol=1e-5)
    network = _small_unet()
    inject_adapter(network, TCURLoRAConfig(rank=8, preset="conv", basis="orthonormal", rank_stable=True))
    assert all(s.scale == 1.0 for s in get_tuner(network).record().stacks.values() if s.rank == 8)


@pytest.mark.parametrize("affine", [False, True])
def test_the_norm_scale_shift_covers_the_decoder_norms_saves_merges_and_unloads_to_a_plain_module(tmp_path, affine):
    """norm_scale_shift: one scale and shift per channel after each norm inside the declared decoder (none in the
    encoder); it changes the output, reloads from the file to the same output, merges exactly and unmerges to the
    exact base; merge_and_unload leaves no wrapper and the base's own keys (a norm without affine parameters
    becomes its affine twin, the only keys added)."""
    from tcurlora.adapter import (base_state_dict, inject_adapter, merge_adapter, merge_and_unload,
                                  trainable_parameter_count, unmerge_adapter)
    from tcurlora.adapter_file import load_adapter, save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.tuners import get_tuner
    from tcurlora.tuners.layers import NORM_TYPES, WRAPPERS

    make = _affine_unet if affine else _small_unet
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    plain_network = _introduced(make())
    inject_adapter(plain_network, TCURLoRAConfig(rank=2, preset="conv"))
    network = _introduced(make())
    base_keys = set(network.state_dict())
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with torch.no_grad():
        base_out = network(x)
    inject_adapter(network, TCURLoRAConfig(rank=2, preset="conv", norm_scale_shift=True))
    norms = get_tuner(network).record().norms
    all_norms = [n for n, m in make().named_modules() if isinstance(m, NORM_TYPES)]
    assert norms and set(norms) < set(all_norms)
    assert all(n.startswith(("model.2", "model.1.submodule.2")) for n in norms)
    channels = sum(p.norm_scale.numel() for p in norms.values())
    assert trainable_parameter_count(network) == trainable_parameter_count(plain_network) + 2 * channels
    with torch.no_grad():
        torch.testing.assert_close(network(x), base_out)  # scale 1, shift 0: the base's output
    _set_cores(network, 8)
    _set_norms(network, 9)
    with torch.no_grad():
        adapted = network(x)
    assert float((adapted - base_out).abs().max()) > 1e-3
    labels = [{"value": 1, "name": "structure", "color": [0.9, 0.3, 0.2]}]
    path = tmp_path / "norms.safetensors"
    manifest = save_adapter(network, path, labels=labels)
    assert manifest["method"]["norms"] == list(norms)
    fresh = _introduced(make())
    load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-6)
        merge_adapter(fresh)
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in base_state_dict(fresh).items())  # the merge keeps the base aside
    unmerge_adapter(fresh)
    assert all(torch.equal(before[k], v) for k, v in base_state_dict(fresh).items())
    plain = merge_and_unload(fresh)
    assert not any(isinstance(m, WRAPPERS) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, rtol=1e-4, atol=1e-5)
    added = set(plain.state_dict()) - base_keys
    assert not base_keys - set(plain.state_dict())
    assert added == (set() if affine else {f"{n}.{p}" for n in norms for p in ("weight", "bias")})


def test_aggregate_averages_the_norm_scale_shift_exactly(tmp_path):
    """Two sites' adapters with norm scale-shift: tcurlora aggregate writes the exact weighted mean of every
    tensor, the scales and shifts included, and keeps the layout (which norms) in the file."""
    from safetensors.torch import load_file

    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import save_adapter
    from tcurlora.aggregate import aggregate
    from tcurlora.config import TCURLoRAConfig

    labels = [{"value": 1, "name": "structure", "color": [0.9, 0.3, 0.2]}]
    paths = []
    for site in (1, 2):
        network = _introduced(_small_unet())
        inject_adapter(network, TCURLoRAConfig(rank=2, preset="conv", norm_scale_shift=True))
        _set_cores(network, site)
        _set_norms(network, 10 + site)
        paths.append(tmp_path / f"site{site}.safetensors")
        save_adapter(network, paths[-1], labels=labels)
    out = tmp_path / "mean.safetensors"
    aggregate(paths, out, weights=[1.0, 3.0])
    a, b, mean = (load_file(str(p)) for p in (*paths, out))
    norm_keys = [k for k in mean if k.startswith("norms.")]
    assert norm_keys and set(mean) == set(a)
    for key in mean:
        torch.testing.assert_close(mean[key], (a[key] * 1.0 + b[key] * 3.0) / 4.0, rtol=1e-6, atol=1e-7)


def test_a_rank_budget_raises_the_decoder_stacks_first_and_the_file_keeps_each_rank(tmp_path):
    """rank_budget: stacks start at the config's rank; decoder stacks rise first (to full rank here) while the
    budget allows, the encoder's only with what is left; the cores never exceed the budget; the file keeps each
    stack's rank and reloads to the same output; a budget below the starting ranks is one clear error."""
    from tcurlora.adapter import AdapterError, inject_adapter
    from tcurlora.adapter_file import load_adapter, save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.tuners import get_tuner
    from tcurlora.tuners.stacks import under

    def stacks(budget):
        network = _introduced(_small_unet())
        inject_adapter(network, TCURLoRAConfig(rank=2, preset="conv", rank_budget=budget))
        return network, get_tuner(network).record().stacks

    _, start = stacks(None)
    in_decoder = {n: all(under(m.module, ["model.2", "model.1.submodule.2"]) for m in s.members) for n, s in start.items()}
    assert any(in_decoder.values()) and not all(in_decoder.values())
    base_values = sum(s.delta_u.numel() for s in start.values())
    decoder_full = sum(s.k * min(s.n1, s.n2) ** 2 - s.delta_u.numel() for n, s in start.items() if in_decoder[n])
    network, small = stacks(base_values + decoder_full)  # exactly what the decoder can take
    for name, s in small.items():
        assert s.rank == (min(s.n1, s.n2) if in_decoder[name] else start[name].rank), name
    network, large = stacks(base_values + decoder_full + 500)
    assert sum(s.delta_u.numel() for s in large.values()) <= base_values + decoder_full + 500
    assert any(s.rank > start[n].rank for n, s in large.items() if not in_decoder[n])
    _set_cores(network, 3)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        adapted = network(x)
    path = tmp_path / "budget.safetensors"
    save_adapter(network, path, labels=[{"value": 1, "name": "structure", "color": [0.9, 0.3, 0.2]}])
    fresh = _introduced(_small_unet())
    load_adapter(fresh, path)
    assert {n: s.rank for n, s in get_tuner(fresh).record().stacks.items()} == {n: s.rank for n, s in large.items()}
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="rank_budget 10 is below"):
        stacks(10)


def test_gradient_aligned_indices_pick_the_columns_and_rows_the_gradient_reaches():
    """Columns and rows by alignment: for a gradient u·vᵀ (u on output rows 1 and 4, v on input columns 2 and 5)
    the columns of W along u and the rows of W along v are chosen (the first-order gradient a core between them
    gets), while the energy rule takes the column where W is largest, which the gradient does not reach."""
    from tcurlora.tensor import gradient_aligned_indices, select_indices

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 6, 10, generator=g) * 0.1
    w[:, :, 7] *= 30  # the largest column by energy, orthogonal to u
    w[:, [1, 4], 7] = 0.0
    for column, size in ((2, 1.0), (5, 0.8)):  # columns along u
        w[:, :, column] = 0.0
        w[:, [1, 4], column] = size
    grad = torch.zeros(3, 6, 10)
    grad[:, 1, 2] = grad[:, 1, 5] = grad[:, 4, 2] = grad[:, 4, 5] = 1.0
    cols, rows = gradient_aligned_indices(w, grad, 2)
    assert cols.tolist() == [2, 5] and rows.tolist() == [1, 4]
    assert 7 in select_indices(w, 2)[0].tolist()


def test_finetune_picks_columns_by_gradient_and_the_file_needs_no_gradient_to_load(tiny_unet, tmp_path):
    """selection='gradient' through finetune (a label new to the base, with the prototype start): the stacks'
    columns and rows differ from the energy rule's, the file keeps them, and loading it (no training patches)
    gives the trained adapter's output; injecting the config without stored stacks is refused."""
    import SimpleITK as sitk

    from tcurlora.adapter import AdapterError, inject_adapter
    from tcurlora.adapter_file import load_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.events import Events
    from tcurlora.manifest import read_manifest
    from tcurlora.models import load_base
    from tcurlora.train import FinetuneOptions, finetune

    vert = sitk.ReadImage(str(CT_VERT))
    values = sitk.GetArrayFromImage(vert)
    array = np.where(values == 21, 1, np.where(np.isin(values, (22, 23)), values, 0)).astype(np.uint8)
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(vert)
    sitk.WriteImage(label, str(tmp_path / "l3.nii.gz"))
    # the tiny base's head feeds a residual sum of 4 channels: its L3 and L4 beside the new label
    table = [{"value": 1, "name": "a new structure"}, {"value": 22, "name": "L3"}, {"value": 23, "name": "L4"}]
    indices = {}
    for selection in ("deterministic", "gradient"):
        out = tmp_path / f"{selection}.safetensors"
        finetune(load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights)), [(str(CT), str(tmp_path / "l3.nii.gz"))],
                 out, labels=table, events=Events(),
                 options=FinetuneOptions(rank=2, steps=1, device="cpu", val_every=100, selection=selection))
        indices[selection] = {s["name"]: (s["I"], s["J"]) for s in read_manifest(out)["method"]["stacks"]}
    assert indices["gradient"].keys() == indices["deterministic"].keys()
    assert indices["gradient"] != indices["deterministic"]
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs = []
    for _ in range(2):
        base = load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights))
        load_adapter(base.network, tmp_path / "gradient.safetensors")
        with torch.no_grad():
            outputs.append(base.network(x))
    torch.testing.assert_close(outputs[0], outputs[1])
    with pytest.raises(AdapterError, match="selection 'gradient'"):
        inject_adapter(load_base(str(tiny_unet.spec), weights=str(tiny_unet.weights)).network,
                       TCURLoRAConfig(rank=2, selection="gradient"))


def test_files_without_the_new_options_load_and_give_the_same_output(tmp_path):
    """A file whose config lacks rank_stable, norm_scale_shift and rank_budget (every file written before the
    options) loads with them off and gives the output it gave."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tcurlora.adapter import inject_adapter
    from tcurlora.adapter_file import load_adapter, save_adapter
    from tcurlora.config import TCURLoRAConfig
    from tcurlora.manifest import METADATA_KEY

    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    network = _small_unet()
    inject_adapter(network, TCURLoRAConfig(rank=3, preset="conv", basis="orthonormal"))
    _set_cores(network, 4)
    with torch.no_grad():
        adapted = network(x)
    path = tmp_path / "old.safetensors"
    save_adapter(network, path, labels=[{"value": 1, "name": "structure", "color": [0.9, 0.3, 0.2]}])
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(metadata[METADATA_KEY])
    for key in ("rank_stable", "norm_scale_shift", "rank_budget"):
        del manifest["method"]["config"][key]
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(manifest)})
    fresh = _small_unet()
    load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-6)


def test_finetune_gives_a_label_the_base_lacks_the_recipe_and_the_base_labels_their_old_config(tiny_base):
    """What finetune builds: for the base's own labels (the brain-mask convention, the demo) exactly the config it
    built before the recipe; for a label the base lacks, tcurlora gets the new-structure recipe in each option left
    at its default (an option given keeps its value; --no-new-label-recipe keeps them all); other methods never."""
    import dataclasses

    from tcurlora.config import TCURLoRAConfig
    from tcurlora.protocol import NEW_LABEL_RECIPE
    from tcurlora.train import FinetuneOptions, build_adapter_config

    before = TCURLoRAConfig(method="tcurlora", preset="auto", rank=8, seed=0, train_modules=[])
    assert build_adapter_config(tiny_base, FinetuneOptions(), tiny_base.labels) == before
    subset = [dict(tiny_base.labels[0], name=tiny_base.labels[0]["name"].upper())]  # a base label, another case
    assert dataclasses.replace(build_adapter_config(tiny_base, FinetuneOptions(), subset), new_head=None) == before
    table = [{"value": 1, "name": "a structure the base lacks"}]
    plain = build_adapter_config(tiny_base, FinetuneOptions(new_label_recipe=False), table)
    assert plain.basis == "cur" and not plain.rank_stable and not plain.norm_scale_shift and plain.new_head
    recipe = build_adapter_config(tiny_base, FinetuneOptions(), table)
    budget = recipe.rank_budget  # the next test checks its size
    assert recipe == dataclasses.replace(plain, **NEW_LABEL_RECIPE, rank_budget=budget)
    chosen = build_adapter_config(tiny_base, FinetuneOptions(selection="gradient", basis="orthonormal"), table)
    assert chosen == dataclasses.replace(plain, **NEW_LABEL_RECIPE, rank_budget=budget, selection="gradient")
    given = build_adapter_config(tiny_base, FinetuneOptions(rank_budget=123456), table)
    assert given.rank_budget == 123456
    lora = build_adapter_config(tiny_base, FinetuneOptions(method="lora"), table)
    assert lora.basis == "cur" and not lora.norm_scale_shift


def test_the_recipe_budget_keeps_the_adapter_within_a_tenth_of_lora_on_the_same_layers():
    """The recipe's rank budget: the whole adapter (cores, norms' scales and shifts, new head) holds at most a tenth
    of what PEFT's LoRA of the same rank trains with the same labels, and raises ranks to get near it."""
    from monai.networks.nets import UNet

    from tcurlora.adapter import inject_adapter, trainable_parameter_count
    from tcurlora.models import BaseModel
    from tcurlora.preprocess import Preprocessing
    from tcurlora.train import FinetuneOptions, build_adapter_config
    from tcurlora.tuners import get_tuner

    def base():
        torch.manual_seed(0)
        net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2), num_res_units=1)
        return BaseModel("plain", net, [{"value": 1, "name": "brain", "color": [1, 0, 0]}],
                         Preprocessing(patch_size=(16, 16, 16)), head="model.2.1.conv.unit0.conv",
                         decoder_modules=[r"model\.2(\..*)?", r"model\.1\.submodule\.2(\..*)?"])

    table = [{"value": 1, "name": "a structure the base lacks"}]
    counts = {}
    for method in ("tcurlora", "lora"):
        b = base()
        config = build_adapter_config(b, FinetuneOptions(method=method, rank=2), table)
        inject_adapter(b.network, config)
        counts[method] = trainable_parameter_count(b.network)
        if method == "tcurlora":
            assert config.rank_budget is not None
            assert max(s.rank for s in get_tuner(b.network).record().stacks.values()) > 2
    assert counts["lora"] / 10 - 100 - 64 <= counts["tcurlora"] <= counts["lora"] / 10
