"""``merge_and_unload(model)`` (HF PEFT's name): the base network with the adapter merged and every wrapper gone,
on the real deepbet LinkNet3d, a MONAI UNETR and a real nnU-Net network (whose blocks hold each conv under two
names and whose decoder holds the encoder again)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR

from tcurlora.adapter import inject_adapter, merge_and_unload
from tcurlora.config import TCURLoRAConfig
from tcurlora.tuners import ModuleSwitch, TCURLayer, TCURStack, get_tuner

pytestmark = pytest.mark.usefixtures("single_thread")


def _storage_groups(state: dict) -> list:
    """The state dict's keys grouped by the tensor they share (aliases)."""
    groups = {}
    for key, value in state.items():
        groups.setdefault((value.data_ptr(), tuple(value.shape)), []).append(key)
    return sorted(sorted(g) for g in groups.values())


def check_merge_and_unload(network: torch.nn.Module, config: TCURLoRAConfig, x: torch.Tensor, head: str = None,
                           out_channels: int = None) -> torch.nn.Module:
    """Inject ``config``, move every trained value away from its start, then merge and unload: the result is the
    same module object, free of wrappers, with the base's state-dict keys in their order (shapes too, but the new
    head's), its aliases still shared, changed weights, and the adapted network's output."""
    network.eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    groups = _storage_groups(network.state_dict())
    inject_adapter(network, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in get_tuner(network).trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
        adapted = network(x)
    plain = merge_and_unload(network)
    assert plain is network and get_tuner(plain, create=False) is None
    wrappers = [type(m).__name__ for m in plain.modules()
                if isinstance(m, (TCURLayer, ModuleSwitch, TCURStack)) or type(m).__module__.startswith("peft")]
    assert not wrappers
    state = plain.state_dict()
    assert list(state) == list(before)
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    assert all(state[k].shape == before[k].shape for k in before if k not in head_keys)
    for key in head_keys & set(state):
        assert out_channels in state[key].shape[:2]
    assert _storage_groups(state) == groups
    changed = [k for k in before if k not in head_keys and not torch.equal(state[k], before[k])]
    assert changed
    with torch.no_grad():
        torch.testing.assert_close(plain(x), adapted, rtol=1e-4, atol=1e-4)
    return plain


def unetr() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNETR(1, 3, (32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=384, num_heads=4)


@pytest.mark.parametrize("config", [
    TCURLoRAConfig(rank=4),
    TCURLoRAConfig(rank=4, method="lora"),
    TCURLoRAConfig(rank=4, train_modules=[r"decoder2(\..*)?"]),
    TCURLoRAConfig(rank=4, new_head={"module": "out.conv.conv", "out_channels": 5}),
], ids=["tcurlora", "peft-lora", "trained-decoder", "new-head"])
def test_unetr(config):
    head = config.new_head and config.new_head["module"]
    check_merge_and_unload(unetr(), config, torch.randn(1, 1, 32, 32, 32), head, 5)


@pytest.mark.network
def test_deepbet():
    from tcurlora.models import load_base

    base = load_base("deepbet")
    plain = check_merge_and_unload(base.network, TCURLoRAConfig(rank=4, new_head={"module": base.head,
                                                                                  "out_channels": 3}),
                                   torch.randn(1, 1, 64, 64, 64), base.head, 3)
    assert type(plain).__name__ == "LinkNet3d"


@pytest.mark.slow
def test_nnunet(nnunet_model):
    """nnU-Net's aliases (``.conv`` = ``.all_modules.0``, ``decoder.encoder`` = ``encoder``) stay one module each, so
    the merged network is a plain PlainConvUNet with the checkpoint's own keys."""
    from tcurlora.models import load_base

    base = load_base(nnunet_model.folder, fold=0)
    patch = base.preprocessing.patch_size
    plain = check_merge_and_unload(base.network, TCURLoRAConfig(rank=4), torch.randn(1, 1, *patch))
    assert type(plain).__name__ == "PlainConvUNet"
    block = plain.encoder.stages[0][0].convs[0]
    assert block.conv is block.all_modules[0] and plain.decoder.encoder is plain.encoder
