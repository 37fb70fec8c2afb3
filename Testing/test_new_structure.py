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
