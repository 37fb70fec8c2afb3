"""Adapter files: one .safetensors with the manifest in its header; save/load, fingerprint, errors, fuzz.

Every round trip compares a model carrying a trained (here: randomised, clearly non-zero) adapter with a
fresh copy of the base that loaded the file, and checks the adapter really changes the output, so an
adapter that silently loads as zeros fails.
"""

import copy
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.networks.nets import UNETR, UNet
from safetensors.torch import load_file, save_file

import tcurlora.adapter_file as adapter_file
from tcurlora import (TCURLoRAConfig, base_fingerprint, inject_adapter, load_adapter, merge_adapter, read_manifest,
                      save_adapter, set_active_adapter, unmerge_adapter)
from tcurlora.adapter import active_adapter, get_adapter, list_adapters
from tcurlora.tuners import get_tuner
from tcurlora.errors import TCURLoRAError
from tcurlora.manifest import FORMAT_VERSION, METADATA_KEY, ManifestError, parse_manifest, read_header, summary
from conftest import Evil, assert_one_line_error

LABELS_3 = [{"value": 1, "name": "Grey matter", "color": [0.5, 0.5, 0.5]},
            {"value": 2, "name": "White matter", "color": [0.9, 0.9, 0.8]}]


# ----------------------------------------------------------------------------------------------
# helpers


# tiny networks: intra-op threads only contend (10-50x slower on a busy 2-core machine)
pytestmark = pytest.mark.usefixtures("single_thread")


UNETR_X = (1, 1, 32, 32, 16)  # 2x2x1 = 4 ViT tokens: attention (q, k) matters; cheap decoder


def small_unetr(seed=0):
    torch.manual_seed(seed)
    return UNETR(1, 2, UNETR_X[2:], feature_size=4, hidden_size=48, mlp_dim=96, num_heads=4).eval()


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(3, 1, 2, (4, 8, 8), (2, 2), num_res_units=0).eval()


def named(model, name):
    get_tuner(model).base_info["name"] = name
    return model


def perturb(model, seed=1, scale=0.1):
    """Give the active adapter's trainable values random, non-zero values (stands in for training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter(model).parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def run(model, x):
    with torch.no_grad():
        return model(x)


def x_for(shape, seed=7):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same(a, b):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-6


def assert_changed(a, b):
    assert a.shape != b.shape or (a - b).abs().max().item() > 1e-4, "the adapter does not change the output"


def saved_tiny_adapter(path, model=None):
    """``model`` (default a tiny UNet) with a perturbed rank-2 tCURLoRA adapter saved to ``path``; returns the model."""
    model = tiny_unet() if model is None else model
    inject_adapter(model, TCURLoRAConfig(rank=2))
    perturb(model)
    save_adapter(model, path)
    return model


def adapt_save_reload(make_model, x, config, path, scale=0.05):
    """Inject ``config`` into ``make_model()``, perturb what it trains (the output must change and stay
    finite), save the adapter to ``path`` and load it into another ``make_model()``: that one must predict
    exactly what the saved model did.  Returns the saved manifest."""
    model = make_model()
    base_out = run(model, x)
    inject_adapter(model, config)
    perturb(model, scale=scale)
    adapted = run(model, x)
    assert torch.isfinite(adapted).all()
    assert_changed(adapted, base_out)
    manifest = save_adapter(model, path)
    fresh = make_model()
    load_adapter(fresh, path)
    assert_same(run(fresh, x), adapted)
    return manifest


def cli(*args, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "tcurlora.cli", *map(str, args)], capture_output=True, text=True, encoding="utf-8",
                          env=full_env, timeout=120)




# ----------------------------------------------------------------------------------------------
# 1. save -> load round trips


def test_tcurlora_unetr_round_trip_and_manifest_contents(tmp_path):
    model = small_unetr()
    x = x_for(UNETR_X)
    base_out = run(model, x)
    fp = base_fingerprint(model)
    inject_adapter(model, TCURLoRAConfig(rank=4))
    perturb(model)
    adapted = run(model, x)
    assert_changed(adapted, base_out)
    path = tmp_path / "site.safetensors"
    written = save_adapter(model, path, labels=[{"value": 1, "name": "Tumour", "color": [1, 0, 0]}],
                           preprocessing={"orientation": "RAS", "spacing": [1.0, 1.0, 1.0]},
                           provenance={"cases": 3, "steps": 40, "validation_dice": 0.91})

    # one file, the manifest in its header metadata; only the trained state as tensors
    assert sorted(os.listdir(tmp_path)) == ["site.safetensors"]
    metadata, index = read_header(path)
    manifest = json.loads(metadata[METADATA_KEY])
    assert manifest == written == read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION
    method = manifest["method"]
    assert method["name"] == "tcurlora" and method["config"]["rank"] == 4
    assert [s["name"] for s in method["stacks"]] == ["attn_48x48", "mlp_up_96x48", "mlp_down_48x96"]
    attn = method["stacks"][0]
    assert len(attn["members"]) == 4 * 12 and attn["members"][0] == {"module": "vit.blocks.0.attn.out_proj", "rows": None}
    assert attn["members"][1] == {"module": "vit.blocks.0.attn.qkv", "rows": [0, 48]}
    assert len(attn["I"]) == len(attn["J"]) == 4 and attn["k"] == 48 and attn["rank"] == 4
    assert sorted(index) == sorted(f"stacks.{s['name']}.delta_u" for s in method["stacks"])
    assert method["trainable_values"] == sum(s["k"] * 16 for s in method["stacks"])
    assert manifest["base"] == {"name": "UNETR", "fingerprint": fp}
    assert manifest["labels"] == [{"value": 1, "name": "Tumour", "color": [1, 0, 0]}]
    assert manifest["preprocessing"] == {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0]}
    prov = manifest["provenance"]
    assert prov["cases"] == 3 and prov["steps"] == 40 and prov["validation_dice"] == 0.91
    assert prov["software"].startswith("tcurlora ") and prov["date"] and prov["torch"] == torch.__version__

    fresh = small_unetr()
    loaded = load_adapter(fresh, path)
    assert loaded == manifest and list_adapters(fresh) == ["site"] and active_adapter(fresh) == "site"
    assert_same(run(fresh, x), adapted)
    assert all(not p.requires_grad for p in fresh.parameters())


def test_real_deepbet_linknet3d_round_trip(tmp_path):
    from tcurlora.models.deepbet import load_deepbet

    x = x_for((1, 1, 32, 32, 64))  # deepbet downsamples 32x: the bottleneck keeps 1x1x2 voxels
    manifest = adapt_save_reload(load_deepbet, x, TCURLoRAConfig(rank=4), tmp_path / "deepbet_site.safetensors")
    assert manifest["base"]["fingerprint"] == base_fingerprint(load_deepbet())


def test_decoder_adapter_round_trip(tmp_path):
    path = tmp_path / "decoder.safetensors"
    manifest = adapt_save_reload(small_unetr, x_for(UNETR_X),
                                 TCURLoRAConfig(method="decoder", train_modules=["decoder2", "out"]), path)
    assert manifest["method"]["name"] == "decoder" and manifest["method"]["stacks"] == []
    assert manifest["method"]["trained_modules"] == ["decoder2", "out"]
    assert all(k.startswith(("trained.decoder2.", "trained.out.")) for k in load_file(path))


def test_new_head_gives_a_new_label_set(tmp_path):
    model = small_unetr()
    x = x_for(UNETR_X)
    assert run(model, x).shape[1] == 2
    inject_adapter(model, TCURLoRAConfig(rank=4, new_head={"module": "out.conv.conv", "out_channels": 3}))
    perturb(model)
    adapted = run(model, x)
    assert adapted.shape == (1, 3, *UNETR_X[2:])
    path = tmp_path / "tissues.safetensors"
    save_adapter(model, path, labels=LABELS_3)
    manifest = read_manifest(path)
    assert manifest["labels"] == LABELS_3
    assert manifest["method"]["config"]["new_head"] == {"module": "out.conv.conv", "out_channels": 3}
    assert load_file(path)["trained.out__conv__conv.weight"].shape[0] == 3

    fresh = small_unetr()
    base_out = run(fresh, x)
    load_adapter(fresh, path)
    out = run(fresh, x)
    assert out.shape[1] == 3
    assert_same(out, adapted)
    assert get_adapter(fresh, "tissues").labels == LABELS_3
    set_active_adapter(fresh, None)  # the base keeps its own head
    assert_same(run(fresh, x), base_out)


@pytest.mark.parametrize("method", ["full", "lora", "pissa", "dora"])
def test_a_new_head_saves_and_reloads_with_every_method(tmp_path, method):
    """New labels with the methods that do not stack cores: the head is the adapter's own new layer (the old one
    trains no more), saved as ``trained.<head>``; the file reloads onto a fresh base and gives the same output."""
    model = small_unetr()
    x = x_for(UNETR_X)
    inject_adapter(model, TCURLoRAConfig(method=method, rank=2,
                                         new_head={"module": "out.conv.conv", "out_channels": 3}))
    tuner = get_tuner(model)
    old_head = small_unetr().out.conv.conv
    trainable = tuner.trainable_parameters()
    assert len({id(p) for p in trainable}) == len(trainable)
    head_values = 3 * old_head.weight[0].numel() + 3
    if method == "full":  # every base weight but the old head's, plus the new head
        assert sum(p.numel() for p in trainable) == (sum(p.numel() for p in small_unetr().parameters())
                                                     - old_head.weight.numel() - old_head.bias.numel() + head_values)
    assert any(p.shape[0] == 3 for p in trainable)  # the new head trains
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stands in for training: the trained values and the new head change
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    adapted = run(model, x)
    assert adapted.shape[1] == 3
    path = tmp_path / f"{method}3.safetensors"
    save_adapter(model, path, labels=LABELS_3)
    assert load_file(path)["trained.out__conv__conv.weight"].shape[0] == 3

    fresh = small_unetr()
    load_adapter(fresh, path)
    assert get_adapter(fresh, f"{method}3").labels == LABELS_3
    assert_same(run(fresh, x), adapted)
    if method == "full":
        merge_adapter(fresh)  # what segmentation does (PEFT's layers run unmerged): the head stays the adapter's
        assert_same(run(fresh, x), adapted)
    assert torch.equal(model.out.conv.conv.base_module.weight, old_head.weight)  # the base keeps its own head


def _header_length(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def test_header_lengths_that_look_like_a_pickle_opcode_are_still_read(tmp_path):
    """Any header length = 128 mod 256 starts the file with 0x80, pickle's PROTO opcode."""
    model = tiny_unet()
    inject_adapter(model, TCURLoRAConfig(rank=2))
    perturb(model)
    path = tmp_path / "site.safetensors"
    x = x_for((1, 1, 16, 16, 16))
    hits = 0
    for pad in range(0, 256, 8):
        save_adapter(model, path, provenance={"note": "x" * pad})
        if _header_length(path) % 256 != 128:
            continue
        hits += 1
        assert read_manifest(path)["provenance"]["note"] == "x" * pad
        proc = cli("inspect", path)
        assert proc.returncode == 0, proc.stderr
        fresh = tiny_unet()
        load_adapter(fresh, path)
        assert_same(run(fresh, x), run(model, x))
    assert hits >= 1
    # lengths 0x280..0x580 even begin with a complete PROTO 2..5 opcode: b"\x80\x02" ... b"\x80\x05"
    for target in (0x280, 0x380, 0x480, 0x580):
        plain = tmp_path / f"plain{target}.safetensors"
        save_file({"w": torch.zeros(2)}, str(plain), metadata={"pad": ""})
        pad = target - _header_length(plain)
        save_file({"w": torch.zeros(2)}, str(plain), metadata={"pad": "x" * pad})
        assert _header_length(plain) == target and plain.read_bytes()[:2] == bytes([0x80, target >> 8])
        metadata, index = read_header(plain)
        assert metadata["pad"] == "x" * pad and index["w"]["shape"] == [2]


def _failing_save_file(real):
    def fake(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the whole temp file is on disk ...
        with open(filename, "ab") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")  # ... when the write fails
    return fake


def test_write_is_atomic(tmp_path, monkeypatch):
    model = tiny_unet()
    inject_adapter(model, TCURLoRAConfig(rank=2))
    perturb(model)
    path = tmp_path / "out.safetensors"
    monkeypatch.setattr(adapter_file, "save_file", _failing_save_file(save_file))
    monkeypatch.setattr("safetensors.torch.save_file", _failing_save_file(save_file))
    with pytest.raises(OSError):
        save_adapter(model, path)
    assert os.listdir(tmp_path) == []  # no file, no temp file

    # an existing adapter is not clobbered by a failed overwrite
    monkeypatch.undo()
    save_adapter(model, path)
    before = path.read_bytes()
    perturb(model, seed=5)
    monkeypatch.setattr(adapter_file, "save_file", _failing_save_file(save_file))
    with pytest.raises(OSError):
        save_adapter(model, path)
    assert os.listdir(tmp_path) == ["out.safetensors"] and path.read_bytes() == before


def _rewrite(src, dst, mutate_manifest=None, mutate_tensors=None):
    metadata, _ = read_header(src)
    manifest = json.loads(metadata[METADATA_KEY])
    tensors = load_file(src)
    if mutate_manifest:
        mutate_manifest(manifest)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(manifest)})
    return dst


def test_newer_major_format_is_refused_with_upgrade_hint_and_newer_minor_is_read(tmp_path):
    good = tmp_path / "good.safetensors"
    model = saved_tiny_adapter(good)
    major = _rewrite(good, tmp_path / "major.safetensors", lambda m: m.update(format_version="2.0"))
    for call in (lambda: read_manifest(major), lambda: load_adapter(tiny_unet(), major)):
        with pytest.raises(ManifestError, match="upgrade tcurlora") as err:
            call()
        assert "2.0" in str(err.value) and "\n" not in str(err.value)
    minor = _rewrite(good, tmp_path / "minor.safetensors", lambda m: m.update(format_version="1.7"))
    fresh = tiny_unet()
    assert load_adapter(fresh, minor)["format_version"] == "1.7"
    x = x_for((1, 1, 16, 16, 16))
    assert_same(run(fresh, x), run(model, x))


# ----------------------------------------------------------------------------------------------
# 2. base fingerprint


class AB(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Conv3d(2, 2, 1)


class BA(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Conv3d(2, 2, 1)
        self.a = nn.Linear(4, 3)


def test_fingerprint_is_canonical_and_sensitive_to_one_value():
    torch.manual_seed(0)
    ab = AB()
    ba = BA()
    ba.load_state_dict(ab.state_dict())
    assert list(ab.state_dict()) != list(ba.state_dict())
    assert base_fingerprint(ab) == base_fingerprint(ba)  # registration order does not matter
    fp = base_fingerprint(ab)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64

    model = tiny_unet()
    fp = base_fingerprint(model)
    assert base_fingerprint(tiny_unet()) == fp  # deterministic
    weight = model.model[0].conv.weight
    with torch.no_grad():
        old = weight[0, 0, 0, 0, 0].clone()
        weight[0, 0, 0, 0, 0] = torch.nextafter(old, old + 1)  # one ulp in one value
    assert base_fingerprint(model) != fp
    with torch.no_grad():
        weight[0, 0, 0, 0, 0] = old
    assert base_fingerprint(model) == fp


def test_fingerprint_covers_batchnorm_counters():
    torch.manual_seed(0)
    model = UNet(3, 1, 2, (4, 8), (2,), norm="batch").eval()  # has 0-dim num_batches_tracked buffers
    fp = base_fingerprint(model)
    model.model[0].adn.N.num_batches_tracked += 1
    assert base_fingerprint(model) != fp


def test_fingerprint_unchanged_by_inject_merge_unmerge_and_trained_copies():
    model = small_unetr()
    fp = base_fingerprint(model)
    inject_adapter(model, TCURLoRAConfig(rank=4), "a")
    perturb(model)
    assert base_fingerprint(model) == fp
    before = model.vit.blocks[0].attn.qkv.weight.detach().clone()
    merge_adapter(model)
    assert not torch.equal(model.vit.blocks[0].attn.qkv.weight, before)  # the merge did write the weights
    assert base_fingerprint(model) == fp
    unmerge_adapter(model)
    assert base_fingerprint(model) == fp
    inject_adapter(model, TCURLoRAConfig(method="decoder", train_modules=["decoder2"]), "b")
    perturb(model)
    inject_adapter(model, TCURLoRAConfig(rank=2, preset="none", new_head={"module": "out.conv.conv",
                                                                           "out_channels": 3}), "c")
    perturb(model)
    assert base_fingerprint(model) == fp


def test_adapter_for_another_base_is_refused_naming_both(tmp_path):
    trained_on = named(tiny_unet(seed=0), "site-A-unet")
    inject_adapter(trained_on, TCURLoRAConfig(rank=2))
    perturb(trained_on)
    path = tmp_path / "a.safetensors"
    save_adapter(trained_on, path)
    other = named(tiny_unet(seed=3), "site-B-unet")  # same architecture, other weights
    x = x_for((1, 1, 16, 16, 16))
    before = run(other, x)
    with pytest.raises(TCURLoRAError) as err:
        load_adapter(other, path)
    message = str(err.value)
    assert "site-A-unet" in message and "site-B-unet" in message and "\n" not in message
    assert list_adapters(other) == [] and torch.equal(run(other, x), before)


# ----------------------------------------------------------------------------------------------
# 5. several adapters on one base


def test_several_adapters_switch_by_name_without_reloading(tmp_path):
    x = x_for(UNETR_X)
    files, alone = {}, {}
    for name, config, seed in (("a", TCURLoRAConfig(rank=4), 1),
                               ("b", TCURLoRAConfig(rank=2, selection="sampled", seed=3), 2),
                               ("c", TCURLoRAConfig(method="decoder", train_modules=["decoder2"]), 3)):
        model = small_unetr()
        inject_adapter(model, config)
        perturb(model, seed=seed, scale=0.05)
        alone[name] = run(model, x)
        files[name] = tmp_path / f"{name}_file.safetensors"
        save_adapter(model, files[name])

    base = small_unetr()
    base_out = run(base, x)
    load_adapter(base, files["a"], adapter_name="a")
    load_adapter(base, files["b"], adapter_name="b")
    load_adapter(base, files["c"], adapter_name="c", activate=False)
    assert list_adapters(base) == ["a", "b", "c"] and active_adapter(base) == "b"
    for name in ("a", "c", "b", "a", None, "c"):
        set_active_adapter(base, name)
        expected = base_out if name is None else alone[name]
        assert_same(run(base, x), expected)
    assert_changed(alone["a"], alone["b"])
    with pytest.raises(TCURLoRAError, match="already loaded"):
        load_adapter(base, files["a"], adapter_name="a")


def test_load_with_activate_false_leaves_the_base_active(tmp_path):
    path = tmp_path / "p.safetensors"
    saved_tiny_adapter(path)
    fresh = tiny_unet()
    x = x_for((1, 1, 16, 16, 16))
    base_out = run(fresh, x)
    load_adapter(fresh, path, activate=False)
    assert active_adapter(fresh) is None
    assert_same(run(fresh, x), base_out)


@pytest.mark.parametrize("stem", ["train", "eval", "to", "site 2"])
def test_default_adapter_name_from_any_file_name(tmp_path, stem):
    path = tmp_path / f"{stem}.safetensors"
    model = saved_tiny_adapter(path)
    fresh = tiny_unet()
    load_adapter(fresh, path)
    x = x_for((1, 1, 16, 16, 16))
    assert len(list_adapters(fresh)) == 1 and active_adapter(fresh) == list_adapters(fresh)[0]
    assert_same(run(fresh, x), run(model, x))


# ----------------------------------------------------------------------------------------------
# 6. CLI inspect


def test_cli_inspect_summary_and_json(tmp_path):
    model = named(tiny_unet(), "tiny-unet")
    inject_adapter(model, TCURLoRAConfig(rank=2))
    perturb(model)
    path = tmp_path / "site.safetensors"
    manifest = save_adapter(model, path, labels=LABELS_3, provenance={"cases": 2, "steps": 30, "validation_dice": 0.875})
    proc = cli("inspect", path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = proc.stdout
    assert text.startswith("site.safetensors (") and " KB)" in text.splitlines()[0]
    for piece in ("method:      tcurlora (rank 2, 5 stacks", "tiny-unet", manifest["base"]["fingerprint"][:19],
                  "1=Grey matter, 2=White matter", "2 case(s), 30 steps, validation Dice 0.875", f"format:      {FORMAT_VERSION}"):
        assert piece in text, (piece, text)
    proc = cli("inspect", "--json", path)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == manifest


# ----------------------------------------------------------------------------------------------
# 7. error cases: one line, non-zero exit, TCURLoRAError, model untouched, nothing unpickled


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    saved_tiny_adapter(path, named(tiny_unet(), "tiny-unet"))
    return path


def _first_stack_key(tensors):
    return sorted(k for k in tensors if k.startswith("stacks."))[0]


def _wrong_shape(t):
    key = _first_stack_key(t)
    k, r, _ = t[key].shape
    t[key] = torch.zeros(k, r + 1, r + 1)


def _wrong_dtype(t):
    key = _first_stack_key(t)
    t[key] = t[key].double()


def _missing(t):
    del t[_first_stack_key(t)]


def _extra(t):
    t["stacks.bogus.delta_u"] = torch.zeros(1, 2, 2)


def _byte_case(fn):
    def make(good, dst, marker):
        dst.write_bytes(fn(good.read_bytes()))
    return make


def _corrupt_header(data):
    data = bytearray(data)
    data[8:40] = b"#" * 32
    return bytes(data)


def _manifest_case(update):
    def make(good, dst, marker):
        _rewrite(good, dst, mutate_manifest=update)
    return make


def _tensor_case(mutate):
    def make(good, dst, marker):
        _rewrite(good, dst, mutate_tensors=mutate)
    return make


def _torch_save(legacy):
    def make(good, dst, marker):
        torch.save({"stacks.x.delta_u": torch.zeros(2), "payload": Evil(marker)}, str(dst),
                   _use_new_zipfile_serialization=not legacy)
    return make


def _raw_pickle(protocol):
    def make(good, dst, marker):
        dst.write_bytes(pickle.dumps({"weights": [1.0, 2.0], "payload": Evil(marker)}, protocol=protocol))
    return make


def _no_manifest(good, dst, marker):
    save_file(load_file(good), str(dst), metadata={"other": "x"})


ERROR_CASES = {
    "empty": (_byte_case(lambda d: b""), "too short"),
    "truncated-data": (_byte_case(lambda d: d[:-7]), "truncated"),
    "truncated-header": (_byte_case(lambda d: d[:64]), "truncated"),
    "corrupted-header": (_byte_case(_corrupt_header), "corrupted header"),
    "header-length-garbage": (_byte_case(lambda d: b"\xff" * 8 + d[8:]), "header length"),
    "wrong-shape": (_tensor_case(_wrong_shape), "the manifest says F32"),
    "wrong-dtype": (_tensor_case(_wrong_dtype), "F64"),
    "missing-key": (_tensor_case(_missing), "is missing"),
    "unexpected-key": (_tensor_case(_extra), "unexpected tensor"),
    "no-manifest": (_no_manifest, "not a tcurlora adapter"),
    "format-newer-major": (_manifest_case(lambda m: m.update(format_version="3.1")), "upgrade"),
    "format-unknown-old": (_manifest_case(lambda m: m.update(format_version="0.9")), "unknown adapter format"),
    "format-garbage": (_manifest_case(lambda m: m.update(format_version="v1")), "format_version"),
    "format-missing": (_manifest_case(lambda m: m.pop("format_version")), "format_version"),
    "bad-label": (_manifest_case(lambda m: m.update(labels=[{"value": 0, "name": "x", "color": [0, 0, 0]}])), "label"),
    "torch-save-zip": (_torch_save(legacy=False), "pickle"),
    "torch-save-legacy": (_torch_save(legacy=True), "pickle"),
    "raw-pickle-protocol-4": (_raw_pickle(4), "pickle"),
    "raw-pickle-protocol-0": (_raw_pickle(0), "not a safetensors adapter"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_file_is_refused_in_one_line(case, good_adapter, tmp_path):
    make, expected = ERROR_CASES[case]
    marker = tmp_path / "unpickled.txt"
    path = tmp_path / f"{case}.safetensors"
    make(good_adapter, path, marker)

    proc = cli("inspect", path)
    line = assert_one_line_error(proc)
    assert line.startswith(f"error: {path.name}: ") and expected in line, line
    assert proc.returncode == 2

    model = tiny_unet()
    x = x_for((1, 1, 16, 16, 16))
    before = run(model, x)
    with pytest.raises(TCURLoRAError) as err:
        load_adapter(model, path)
    assert "\n" not in str(err.value) and path.name in str(err.value)
    assert list_adapters(model) == [] and torch.equal(run(model, x), before)
    assert not marker.exists(), "something was unpickled"


def test_pickle_payload_is_live(tmp_path):
    """The Evil payload does create its file when unpickled, so 'not marker.exists()' above means something."""
    marker = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


def test_wrong_base_model_is_refused_by_load_and_inspect_still_reads_it(good_adapter):
    proc = cli("inspect", good_adapter)
    assert proc.returncode == 0 and "tiny-unet" in proc.stdout  # inspect has no base to compare with
    other = named(UNet(3, 1, 2, (4, 8, 8), (2, 2), num_res_units=1).eval(), "other-unet")
    with pytest.raises(TCURLoRAError) as err:
        load_adapter(other, good_adapter)
    assert "tiny-unet" in str(err.value) and "other-unet" in str(err.value)
    assert list_adapters(other) == []


def test_trained_module_with_wrong_shape_is_refused_on_load(tmp_path):
    model = tiny_unet()
    inject_adapter(model, TCURLoRAConfig(method="decoder", train_modules=["model.2"]))
    path = tmp_path / "dec.safetensors"
    save_adapter(model, path)
    key = next(k for k in load_file(path) if k.endswith("weight"))
    bad = _rewrite(path, tmp_path / "bad.safetensors",
                   mutate_tensors=lambda t: t.update({key: torch.zeros(*t[key].shape[:-1], t[key].shape[-1] + 1)}))
    fresh = tiny_unet()
    with pytest.raises(TCURLoRAError, match="does not fit this base model"):
        load_adapter(fresh, bad)
    assert list_adapters(fresh) == []


@pytest.mark.parametrize("mutate", [
    lambda m: m["method"]["stacks"][-1].update(I=[10 ** 6] * len(m["method"]["stacks"][-1]["I"])),
    lambda m: m["method"]["config"].update(train_modules=5),
    lambda m: m["method"]["config"].update(train_modules=["("]),
    lambda m: m["method"]["config"].update(scale="x"),
    lambda m: m["method"]["config"].update(rank=0),
    lambda m: m["method"]["config"].update(colour="red"),
    lambda m: m["method"]["stacks"][0]["members"][0].update(module="model.0.adn"),
], ids=["index-out-of-range", "train-modules-int", "bad-regex", "scale-str", "rank-0", "unknown-key", "not-a-layer"])
def test_crafted_manifest_fails_cleanly_and_leaves_no_trace(mutate, good_adapter, tmp_path):
    path = _rewrite(good_adapter, tmp_path / "crafted.safetensors", mutate_manifest=mutate)
    model = tiny_unet()
    x = x_for((1, 1, 16, 16, 16))
    before = run(model, x)
    with pytest.raises(TCURLoRAError):
        load_adapter(model, path, adapter_name="x")
    assert list_adapters(model) == [] and torch.equal(run(model, x), before)
    # no half-built adapter is left behind: the same name loads cleanly afterwards
    load_adapter(model, good_adapter, adapter_name="x")
    reference = tiny_unet()
    load_adapter(reference, good_adapter)
    assert_same(run(model, x), run(reference, x))


def test_summary_survives_free_form_provenance(good_adapter):
    manifest = read_manifest(good_adapter)
    manifest["provenance"].update(validation_dice="0.9 (fold 1)", cases=None)
    assert "validation Dice 0.9 (fold 1)" in summary(parse_manifest(json.dumps(manifest)))


# ----------------------------------------------------------------------------------------------
# fuzzing: parse_manifest and read_header raise ManifestError or succeed, nothing else

json_leaves = (st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.floats() | st.text(max_size=12)
               | st.sampled_from(["1.0", "2.0", "sha256:ab", "tcurlora", "decoder", "value", "name"]))
json_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10) | st.sampled_from(
                               ["format_version", "method", "base", "labels", "name", "value", "color", "stacks",
                                "members", "I", "J", "rows", "module", "config", "fingerprint"]), inner, max_size=5),
                           max_leaves=25)


def _check_parse(value):
    try:
        parsed = parse_manifest(value, "fuzz.safetensors")
    except ManifestError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(parsed, dict)
    summary(parsed)  # whatever parses, `tcurlora inspect` can print


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(json_values.map(json.dumps), json_values, st.text(max_size=40), st.binary(max_size=40)))
def test_fuzz_parse_manifest_arbitrary_values(value):
    _check_parse(value)


@pytest.fixture(scope="module")
def valid_manifest(good_adapter):
    manifest = read_manifest(good_adapter)
    manifest["labels"] = LABELS_3
    manifest["provenance"]["validation_dice"] = 0.8
    return manifest


def _children(node):
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, list):
        return list(range(len(node)))
    return []


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_parse_manifest_mutated_valid_manifests(valid_manifest, data):
    manifest = copy.deepcopy(valid_manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        parent, key = None, None
        node = manifest
        while _children(node) and (parent is None or data.draw(st.integers(0, 3)) > 0):
            parent, key = node, data.draw(st.sampled_from(_children(node)))
            node = parent[key]
        if parent is None:
            continue
        op = data.draw(st.sampled_from(["replace", "delete", "swap-type", "duplicate"]))
        if op == "replace":
            parent[key] = data.draw(json_values)
        elif op == "delete":
            del parent[key]
        elif op == "swap-type":
            parent[key] = data.draw(st.sampled_from([None, True, 0, -1, 1.5, "", "x", [], {}, [node], {"a": node}]))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(node))
        else:
            parent[key + "_"] = copy.deepcopy(node)
    as_text = data.draw(st.booleans())
    _check_parse(json.dumps(manifest) if as_text else manifest)


FUZZ_DIR = Path(tempfile.mkdtemp(prefix="tcurlora-fuzz-"))


def _check_header(blob):
    path = FUZZ_DIR / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        metadata, index = read_header(path)
    except ManifestError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(metadata, dict) and isinstance(index, dict)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=120))
def test_fuzz_read_header_random_bytes(blob):
    _check_header(blob)


small_json = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "X9", 3]),
    "shape": st.lists(st.integers(-1, 4), max_size=3) | small_json,
    "data_offsets": st.lists(st.integers(-2, 70), max_size=3) | small_json,
})


@st.composite
def plausible_entries(draw):
    """Entries that are valid or off by a little: reach the size and truncation checks."""
    dtype = draw(st.sampled_from(["F32", "F16", "I64", "U8", "BOOL", "BF16"]))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    start = draw(st.integers(0, 24))
    size = {"F32": 4, "F16": 2, "I64": 8, "U8": 1, "BOOL": 1, "BF16": 2}[dtype]
    n = 1
    for d in shape:
        n *= d
    end = start + n * size + draw(st.sampled_from([0, 0, 0, 1, -1]))
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


headers = st.one_of(small_json, st.dictionaries(st.text(max_size=6) | st.just("__metadata__"),
                                                plausible_entries() | tensor_entries
                                                | st.dictionaries(st.text(max_size=4), st.text(max_size=4))
                                                | small_json, max_size=4))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(headers, st.sampled_from([0, 0, 0, 0, -1, 1, -4, 9]), st.binary(max_size=80))
def test_fuzz_read_header_structured(header, length_error, data):
    raw = json.dumps(header).encode()
    _check_header(struct.pack("<Q", max(0, len(raw) + length_error)) + raw + data)


def test_deeply_nested_json_is_refused_not_crashed(tmp_path):
    deep = "[" * 100_000
    with pytest.raises(ManifestError):
        parse_manifest(deep)
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(deep)) + deep.encode())
    with pytest.raises(ManifestError, match="corrupted header"):
        read_header(path)
    proc = cli("inspect", path)
    assert_one_line_error(proc)


# ----------------------------------------------------------------------------------------------
# size


def test_vit_b_adapter_file_is_at_most_64_kb(tmp_path):
    torch.manual_seed(0)
    model = UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=768, mlp_dim=3072, num_heads=12).eval()
    inject_adapter(model, TCURLoRAConfig(preset="vit", rank=8))
    assert not get_adapter(model).trained  # no fully trained modules
    path = tmp_path / "vit_b_r8.safetensors"
    manifest = save_adapter(model, path)
    size = path.stat().st_size
    print(f"\nUNETR ViT-B vit r=8 adapter file: {size} bytes ({size / 1024:.1f} KB), "
          f"{manifest['method']['trainable_values']} trained values")
    assert manifest["method"]["trainable_values"] == 8 * 8 * (48 + 12 + 12)
    assert size <= 64 * 1024


# ----------------------------------------------------------------------------------------------
# crafted adapters: every field a loader acts on is checked, cheaply, before anything is built


HEAD = "model.2.conv"  # the tiny UNet's output layer: ConvTranspose3d(8, 2, 3), outputs on dim 1


@pytest.fixture(scope="module")
def crafted_sources(tmp_path_factory):
    """Real adapters of the tiny UNet to mutate: tCURLoRA rank 2, tCURLoRA + a 3-label new head, PEFT LoRA rank 2."""
    folder = tmp_path_factory.mktemp("crafted_sources")
    sources = {"tcurlora": folder / "tcurlora.safetensors", "head": folder / "head.safetensors",
               "lora": folder / "lora.safetensors"}
    saved_tiny_adapter(sources["tcurlora"], named(tiny_unet(), "tiny-unet"))
    model = named(tiny_unet(), "tiny-unet")
    inject_adapter(model, TCURLoRAConfig(rank=2, new_head={"module": HEAD, "out_channels": 3}))
    perturb(model)
    save_adapter(model, sources["head"], labels=LABELS_3 + [{"value": 3, "name": "CSF", "color": [0, 0, 1]}])
    model = named(tiny_unet(), "tiny-unet")
    inject_adapter(model, TCURLoRAConfig(method="lora", rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    save_adapter(model, sources["lora"])
    return sources


def _rewrite_raw_header(src, dst, mutate_header):
    """Rewrite the safetensors header JSON itself (what save_file would never write), keeping the data bytes."""
    data = Path(src).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    mutate_header(header)
    raw = json.dumps(header).encode()
    Path(dst).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return dst


def _first_key(header):
    return sorted(k for k in header if k != "__metadata__")[0]


def _set(path_in_manifest, value):
    """A manifest mutation: set manifest[a][b]... = value (``path_in_manifest`` is 'a.b.0.c')."""
    def mutate(m):
        node = m
        keys = [int(k) if k.isdigit() else k for k in path_in_manifest.split(".")]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return mutate


def _nan_core(t):
    key = _first_stack_key(t)
    t[key][0, 0, 0] = float("nan")


def _inf_core(t):
    key = _first_stack_key(t)
    t[key][0, 1, 1] = float("-inf")


def _repeat_members(m):
    stack = m["method"]["stacks"][0]
    stack["members"] = stack["members"] * 1000
    stack["k"] = len(stack["members"])


# name -> (source adapter, how to craft it, fragment of the one-line refusal, whether `inspect` refuses too)
CRAFTED = {
    "dtype-list": ("tcurlora", ("header", lambda h: h[_first_key(h)].update(dtype=["F32"])), "unsupported dtype", True),
    "shape-float": ("tcurlora", ("header", lambda h: h[_first_key(h)].update(shape=[1, 2.0, 2])), "invalid shape", True),
    "offsets-bool": ("tcurlora", ("header", lambda h: h[_first_key(h)].update(data_offsets=[False, 16])),
                     "invalid data offsets", True),
    "rank-infinity": ("tcurlora", _set("method.config.rank", float("inf")), "non-finite number", True),
    "rank-huge": ("tcurlora", _set("method.config.rank", 10 ** 30), "'rank' must be an integer", True),
    "rank-list": ("tcurlora", _set("method.config.rank", [2]), "'rank' must be an integer", True),
    "scale-nan": ("tcurlora", _set("method.config.scale", float("nan")), "non-finite number", True),
    "scale-string": ("tcurlora", _set("method.config.scale", "1"), "'scale' must be a finite number", True),
    "seed-negative": ("tcurlora", _set("method.config.seed", -1), "'seed'", True),
    "nan-core": ("tcurlora", ("tensors", _nan_core), "NaN or infinite", False),
    "inf-core": ("tcurlora", ("tensors", _inf_core), "NaN or infinite", False),
    "label-newline": ("tcurlora", _set("labels", [{"value": 1, "name": "Brain\nSegment0_LabelValue:=7",
                                                   "color": [1, 0, 0]}]), "control character U+000A", True),
    "label-escape": ("tcurlora", _set("labels", [{"value": 1, "name": "Brain\x1b]0;owned\x07", "color": [1, 0, 0]}]),
                     "control character U+001B", True),
    "label-2**40": ("tcurlora", _set("labels", [{"value": 2 ** 40, "name": "Brain", "color": [1, 0, 0]}]),
                    "above 65535", True),
    "label-duplicate-name": ("tcurlora", _set("labels", [{"value": 1, "name": "Brain", "color": [1, 0, 0]},
                                                         {"value": 2, "name": "brain", "color": [0, 1, 0]}]),
                             "appears twice", True),
    "label-non-ascii": ("tcurlora", _set("labels", [{"value": 1, "name": "Läsion", "color": [1, 0, 0]}]),
                        "must be ASCII", False),
    "base-name-bidi": ("tcurlora", _set("base.name", "tiny\u202eten-u"), "control character U+202E", True),
    "provenance-escape": ("tcurlora", _set("provenance.software", "\x1b[2Jtcurlora"), "control character U+001B", True),
    "fingerprint-garbage": ("tcurlora", _set("base.fingerprint", "sha256:zz"), "sha256 fingerprint", True),
    "member-path": ("tcurlora", _set("method.stacks.0.members.0.module", "model.0.conv; rm -rf"), "malformed stack", True),
    "members-repeated": ("tcurlora", _repeat_members, "listed twice", True),
    "regex-nested": ("tcurlora", _set("method.config.train_modules", ["(.*.*)*X"]), "nests repetitions", True),
    "regex-alternation": ("tcurlora", _set("method.config.exclude_modules", ["(a|aa)+b"]), "repeats an alternation", True),
    "regex-backref": ("tcurlora", _set("method.config.stacks", {"s": [r"(model)\.\1"]}), "back-reference", True),
    "regex-long": ("tcurlora", _set("method.config.train_modules", ["a" * 600]), "longer than", True),
    "regex-many-repeats": ("tcurlora", _set("method.config.train_modules", [".*a.*b.*c.*d"]), "more than 3", True),
    "new-head-10**7": ("head", _set("method.config.new_head.out_channels", 10 ** 7), "'new_head' must be", True),
    "new-head-mismatch": ("head", _set("method.config.new_head.out_channels", 4000), "has no matching tensor", True),
    "new-head-wrong-layer": ("head", lambda m: (m["method"]["config"]["new_head"].update(module="model.0.conv")),
                             "has no matching tensor", True),
    "lora-rank-10**6": ("lora", _set("method.config.rank", 10 ** 6), "'rank' must be an integer", True),
    "lora-rank-mismatch": ("lora", _set("method.config.rank", 4000), "not rank 4000", True),
    "lora-no-targets": ("lora", _set("method.lora_targets", []), "lora_targets", True),
    "lora-target-missing": ("lora", lambda m: m["method"]["lora_targets"].append("model.2.conv"), "is missing", True),
    "lora-trained-module-missing": ("lora", _set("method.trained_modules", ["model.2.conv"]),
                                    "tensor model.2.conv.bias is missing, the layer needs", False),
}


def _craft(case, sources, dst):
    source, how, _, _ = CRAFTED[case]
    if isinstance(how, tuple) and how[0] == "header":
        return _rewrite_raw_header(sources[source], dst, how[1])
    if isinstance(how, tuple):
        return _rewrite(sources[source], dst, mutate_tensors=how[1])
    return _rewrite(sources[source], dst, mutate_manifest=how)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_adapter_is_refused_in_one_line(case, crafted_sources, tmp_path, capsys):
    from tcurlora import cli as tcurlora_cli

    _, _, fragment, inspect_refuses = CRAFTED[case]
    path = _craft(case, crafted_sources, tmp_path / f"{case}.safetensors")
    capsys.readouterr()
    code = tcurlora_cli.main(["inspect", str(path)])
    out, err = capsys.readouterr()
    if inspect_refuses:
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (code, out, err)
        assert err.startswith(f"error: {path.name}: ") and fragment in err, err
    else:
        assert code == 0 and all(ch == "\n" or ch.isprintable() for ch in out), out
    model = tiny_unet()
    x = x_for((1, 1, 16, 16, 16))
    before = run(model, x)
    with pytest.raises(TCURLoRAError) as exc:
        load_adapter(named(model, "tiny-unet"), path)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path.name}: ") and fragment in message, message
    assert list_adapters(model) == [] and torch.equal(run(model, x), before)


def test_crafted_sources_load(crafted_sources):
    """The unmutated sources load and change the output: the refusals above are about the mutation."""
    x = x_for((1, 1, 16, 16, 16))
    base = run(tiny_unet(), x)
    for name, path in crafted_sources.items():
        model = tiny_unet()
        load_adapter(model, path)
        out = run(model, x)
        assert torch.isfinite(out).all() and (out.shape != base.shape or not torch.equal(out, base)), name


def test_save_adapter_refuses_non_finite_tensors(tmp_path):
    model = tiny_unet()
    inject_adapter(model, TCURLoRAConfig(rank=2))
    perturb(model)
    with torch.no_grad():
        next(iter(get_adapter(model).parameters()))[0, 0, 0] = float("nan")
    path = tmp_path / "diverged.safetensors"
    with pytest.raises(TCURLoRAError, match="NaN or infinite values") as exc:
        save_adapter(model, path)
    assert "\n" not in str(exc.value)
    assert not list(tmp_path.iterdir())
    # a metric that could not be computed is written as null, not as NaN (which JSON does not have)
    model = tiny_unet()
    inject_adapter(model, TCURLoRAConfig(rank=2))
    manifest = save_adapter(model, path, provenance={"validation_dice": float("nan")})
    assert manifest["provenance"]["validation_dice"] is None and read_manifest(path)["provenance"]["validation_dice"] is None


SIZE_PROBE = """
import json, resource, sys, torch
from monai.networks.nets import UNet
from tcurlora import load_adapter
from tcurlora.errors import TCURLoRAError
def fresh():
    torch.manual_seed(0)
    m = UNet(3, 1, 2, (4, 8, 8), (2, 2), num_res_units=0).eval()
    m.tcurlora_base_name = "tiny-unet"
    return m
paths = json.loads(sys.argv[1])
for p in paths["warm"]:  # first loads import PEFT and warm the allocator
    load_adapter(fresh(), p)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start, result = rss(), {}
for name, p in paths["crafted"].items():
    try:
        load_adapter(fresh(), p)
        result[name] = "loaded"
    except TCURLoRAError as exc:
        result[name] = str(exc)
    result[name + ":growth"] = rss() - start
print(json.dumps(result))
"""


def test_sizes_are_checked_from_the_header_before_allocating(crafted_sources, tmp_path):
    """A new head of 10^5 or 10^7 outputs, a LoRA rank of 20,000 or 10^6, a stack listing one layer 1,000 times:
    refused before the layers are built (the old loader allocated them first: 86 MB to 86 GB here)."""
    crafted = {
        "new-head-10**5": _rewrite(crafted_sources["head"], tmp_path / "h5.safetensors",
                                   mutate_manifest=_set("method.config.new_head.out_channels", 10 ** 5)),
        "lora-rank-20000": _rewrite(crafted_sources["lora"], tmp_path / "l2.safetensors",
                                    mutate_manifest=_set("method.config.rank", 20000)),
        "members-repeated": _rewrite(crafted_sources["tcurlora"], tmp_path / "m.safetensors",
                                     mutate_manifest=_repeat_members),
    }
    for case in ("new-head-10**7", "lora-rank-10**6"):
        crafted[case] = _craft(case, crafted_sources, tmp_path / f"{case}.safetensors")
    paths = {"warm": [str(crafted_sources["lora"]), str(crafted_sources["tcurlora"])],
             "crafted": {k: str(v) for k, v in crafted.items()}}
    proc = subprocess.run([sys.executable, "-c", SIZE_PROBE, json.dumps(paths)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in crafted:
        assert result[name] != "loaded" and result[name].startswith(Path(crafted[name]).name), (name, result[name])
        assert result[name + ":growth"] < 16 * 2 ** 20, (name, result[name + ":growth"])
    print("\npeak RSS growth over the crafted loads:", result[name + ":growth"] / 2 ** 20, "MB")
