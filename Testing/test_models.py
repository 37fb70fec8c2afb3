"""One loader for three kinds of base model (catalog, MONAI bundle, network spec + weights), and the
`tcurlora models` / `tcurlora fetch-model` commands.

Tests marked ``network`` need the pinned deepbet wheel in the user's cache (fetched through pip on first
use, like Testing/test_deepbet.py); everything else is built in tmp_path.
"""

import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from tcurlora import TCURLoRAConfig, base_fingerprint, inject_adapter, load_adapter, load_base, save_adapter
from tcurlora.catalog import get_entry
from tcurlora.errors import InputError, TCURLoRAError
from tcurlora.models import BaseModel
from tcurlora.adapter import get_adapter
from tcurlora.tuners import get_tuner
from conftest import Evil, assert_one_line_error

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 8], "strides": [2, 2],
             "num_res_units": 1}
X = (1, 1, 16, 16, 16)


# tiny networks: intra-op threads only contend (10-50x slower on a busy 2-core machine)
pytestmark = pytest.mark.usefixtures("single_thread")


def reference_unet(seed=0):
    torch.manual_seed(seed)
    net = UNet(**UNET_ARGS).eval()
    with torch.no_grad():  # weights that differ from any fresh init
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return net


def x_input():
    return torch.randn(*X, generator=torch.Generator().manual_seed(3))


def assert_same_weights(network, reference):
    a, b = network.state_dict(), reference.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in b)


def cli(*args, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "tcurlora.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=300)




def evil_checkpoint(path, marker):
    torch.save({"state_dict": {"model.0.conv.unit0.conv.weight": torch.zeros(2), "payload": Evil(marker)}}, str(path))
    return path


def check_payload_is_live(tmp_path):
    """The same payload, loaded the unsafe way, does run (so 'not marker.exists()' above proves something)."""
    proof = tmp_path / "proof.txt"
    live = evil_checkpoint(tmp_path / "live_copy.pt", proof)
    torch.load(str(live), weights_only=False)
    assert proof.exists()


# ----------------------------------------------------------------------------------------------
# (a) catalog


@pytest.fixture(scope="module")
def deepbet_wheel():
    from tcurlora.fetch import fetch_archive
    from tcurlora.models.deepbet import DEEPBET_PIN

    return fetch_archive(DEEPBET_PIN)  # the user's cache (already there here)


def _torchscript_names(variant):
    from tcurlora.fetch import extract_member
    from tcurlora.models.deepbet import DEEPBET_MEMBERS, DEEPBET_PIN

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(extract_member(DEEPBET_PIN, DEEPBET_MEMBERS[variant][0])), map_location="cpu")
    return scripted.state_dict()


@pytest.mark.network
def test_catalog_deepbet_has_the_torchscript_names_weights_and_labels(deepbet_wheel):
    base = load_base("deepbet")
    entry = get_entry("deepbet")
    assert isinstance(base, BaseModel) and base.name == "deepbet"
    for module, variant in ((base.network, "model"), (base.localizer, "bbox")):
        scripted = _torchscript_names(variant)
        ours = module.state_dict()
        assert list(ours) == list(scripted)
        assert all(torch.equal(ours[k], scripted[k]) for k in scripted)
    assert base.labels == entry["labels"] and get_tuner(base.network).base_info["labels"] == entry["labels"]
    assert get_tuner(base.network).base_info["name"] == "deepbet"
    assert base_fingerprint(base.network) == entry["fingerprint"]  # the catalog pins the weights
    assert not any(p.requires_grad for p in base.network.parameters())


@pytest.mark.network
def test_catalog_deepbet_from_a_local_wheel_offline(deepbet_wheel, tmp_path, monkeypatch):
    reference = load_base("deepbet").network
    cache = tmp_path / "cache"
    monkeypatch.setenv("TCURLORA_CACHE", str(cache))
    monkeypatch.setenv("TCURLORA_OFFLINE", "1")
    with pytest.raises(TCURLoRAError, match="TCURLORA_OFFLINE") as err:  # nothing cached, no file: no download
        load_base("deepbet")
    assert "\n" not in str(err.value)
    base = load_base("deepbet", local_file=deepbet_wheel)
    assert_same_weights(base.network, reference)
    assert (cache / "archives" / deepbet_wheel.name).is_file()
    assert sorted(p.name.split("-")[2] for p in (cache / "converted").glob("*.safetensors")) == ["bbox", "model"]
    assert_same_weights(load_base("deepbet").network, reference)  # now from the new cache, no file needed


def test_unknown_catalog_name_and_missing_path_are_one_line_errors(tmp_path):
    with pytest.raises(TCURLoRAError, match="deepbet") as err:
        load_base("no-such-model")
    assert "unknown base model" in str(err.value)
    with pytest.raises(InputError, match="no such base model"):
        load_base(tmp_path / "nothing.json")


# ----------------------------------------------------------------------------------------------
# (b) MONAI bundle folder


def make_bundle(folder, network, weights_writer=None):
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps({
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "num_classes": 3,
        "network_def": {"_target_": "UNet", **UNET_ARGS, "out_channels": "@num_classes"},
        "network": "$@network_def.to(@device)",  # never evaluated: only network_def is read
    }))
    (folder / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.1.0",
        "network_data_format": {"outputs": {"pred": {"type": "image", "num_channels": 3,
                                                     "channel_def": {"0": "background", "2": "tumour", "1": "liver"}}}},
    }))
    if weights_writer is None:
        torch.save(network.state_dict(), str(folder / "models" / "model.pt"))
    else:
        weights_writer(folder / "models" / "model.pt")
    return folder


def test_monai_bundle_folder(tmp_path):
    net = reference_unet()
    folder = make_bundle(tmp_path / "liver_bundle", net)
    base = load_base(folder)
    assert type(base.network) is UNet and base.name == "liver_bundle"
    assert_same_weights(base.network, net)
    assert [(l["value"], l["name"]) for l in base.labels] == [(1, "liver"), (2, "tumour")]
    assert all(len(l["color"]) == 3 for l in base.labels)
    x = x_input()
    with torch.no_grad():
        assert torch.equal(base.network(x), net(x))

    # an adapter trained on the bundle's base records it, and loads onto the same bundle loaded again
    inject_adapter(base.network, TCURLoRAConfig(rank=2))
    with torch.no_grad():
        for p in get_adapter(base.network).parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        adapted = base.network(x)
    path = tmp_path / "liver_site.safetensors"
    manifest = save_adapter(base.network, path)
    assert manifest["base"]["name"] == "liver_bundle" and manifest["labels"] == base.labels
    again = load_base(folder).network
    load_adapter(again, path)
    with torch.no_grad():
        assert (again(x) - adapted).abs().max().item() <= 1e-6
        assert (adapted - net(x)).abs().max().item() > 1e-4


def test_monai_bundle_with_wrapped_data_parallel_checkpoint(tmp_path):
    net = reference_unet()

    def write(path):
        torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, str(path))

    base = load_base(make_bundle(tmp_path / "b", net, write))
    assert_same_weights(base.network, net)


def test_monai_bundle_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    folder = make_bundle(tmp_path / "evil_bundle", reference_unet(), lambda p: evil_checkpoint(p, marker))
    with pytest.raises(InputError) as err:
        load_base(folder)
    assert "model.pt" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
    check_payload_is_live(tmp_path)


@pytest.mark.parametrize("network_def", [
    {"_target_": "UNet", **UNET_ARGS, "out_channels": "$__import__('pathlib').Path(r'MARKER').touch() or 3"},
    "$__import__('pathlib').Path(r'MARKER').touch() or __import__('monai').networks.nets.UNet(**ARGS)",
    {"_target_": "$__import__('pathlib').Path(r'MARKER').touch() or 'UNet'", **UNET_ARGS},
    {"_target_": "pathlib.Path.touch", "self": "MARKER"},
    {"_target_": "UNet", **UNET_ARGS, "_requires_": "$__import__('pathlib').Path(r'MARKER').touch()"},
], ids=["expression-argument", "expression-network", "expression-target", "non-monai-target", "requires"])
def test_monai_bundle_code_is_never_run(tmp_path, network_def):
    """MONAI would eval '$' expressions and import any _target_: a bundle must not run code by being loaded."""
    marker = tmp_path / "pwned.txt"
    folder = make_bundle(tmp_path / "evil_bundle", reference_unet())
    text = json.dumps(network_def).replace("MARKER", str(marker)).replace("ARGS", repr(UNET_ARGS).replace('"', "'"))
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["network_def"] = json.loads(text)
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as err:
        load_base(folder)
    assert "inference.json" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_folder_that_is_not_a_bundle(tmp_path):
    with pytest.raises(InputError, match="not a MONAI bundle"):
        load_base(tmp_path)


# ----------------------------------------------------------------------------------------------
# (c) network spec + weights

LABELS = [{"value": 1, "name": "Liver", "color": [0.8, 0.4, 0.3]}, {"value": 2, "name": "Tumour", "color": [0.9, 0.9, 0.2]}]


def write_spec(path, cls="UNet", **extra):
    spec = {"name": "liver-unet", "network": {"class": cls, "args": UNET_ARGS}, "labels": LABELS,
            "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "patch_size": [32, 32, 32]}, **extra}
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_network_spec_with_weights(tmp_path, kind):
    net = reference_unet()
    weights = tmp_path / f"w.{kind}"
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    else:
        torch.save(net.state_dict(), str(weights))
    spec = write_spec(tmp_path / "unet.json")
    for base in (load_base(spec, weights=weights), load_base({"spec": str(spec), "weights": str(weights)})):
        assert type(base.network) is UNet and base.name == "liver-unet"
        assert_same_weights(base.network, net)
        assert base.labels == LABELS and get_tuner(base.network).base_info["labels"] == LABELS
        assert base.preprocessing.spacing == (1.5, 1.5, 2.0) and tuple(base.preprocessing.patch_size) == (32, 32, 32)
        x = x_input()
        with torch.no_grad():
            assert torch.equal(base.network(x), net(x))


def test_network_spec_naming_its_weights_and_a_full_class_path(tmp_path):
    net = reference_unet()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = write_spec(tmp_path / "unet.json", cls="monai.networks.nets.UNet", weights="w.safetensors")
    assert_same_weights(load_base(spec).network, net)


@pytest.mark.parametrize("cls", ["os.system", "builtins.eval", "torch.nn.Conv3d", "subprocess.Popen",
                                 "monai.networks.nets.__class__", "monai.bundle.ConfigParser",
                                 "monai.networks.nets.os.system"])
def test_network_spec_naming_a_non_monai_class_is_refused(tmp_path, cls, monkeypatch):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    net = reference_unet()
    torch.save(net.state_dict(), str(tmp_path / "w.pt"))
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"network": {"class": cls, "args": {"command": "touch pwned"}}, "weights": "w.pt"}))
    with pytest.raises(InputError, match="not a monai.networks.nets network") as err:
        load_base(spec)
    assert cls in str(err.value) and not called


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pt_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    spec = write_spec(tmp_path / "unet.json")
    for name, write in (("nested.pt", lambda p: evil_checkpoint(p, marker)),
                        ("bare.pt", lambda p: torch.save(Evil(marker), str(p))),
                        ("raw.pth", lambda p: p.write_bytes(pickle.dumps(Evil(marker)))),
                        ("renamed.safetensors", lambda p: evil_checkpoint(p, marker))):
        weights = tmp_path / name
        write(weights)
        with pytest.raises(InputError) as err:
            load_base(spec, weights=weights)
        assert name in str(err.value) and "\n" not in str(err.value)
        assert not marker.exists(), name
    check_payload_is_live(tmp_path)


@pytest.mark.parametrize("problem, spec_text, expected", [
    ("weights-wrong-shape", None, "weights do not fit the network"),
    ("bad-args", json.dumps({"network": {"class": "UNet", "args": {"spatial_dims": 3, "channels": "x"}}}), "cannot build UNet"),
    ("not-json", "{not json", "not a valid JSON network spec"),
    ("not-an-object", "[1, 2]", "network spec"),
    ("bad-preprocessing", json.dumps({"network": {"class": "UNet", "args": UNET_ARGS},
                                      "preprocessing": {"orientation": "XYZ"}}), "invalid preprocessing"),
])
def test_network_spec_errors_are_one_line(tmp_path, problem, spec_text, expected):
    other = UNet(3, 1, 3, (4, 8), (2,), num_res_units=0)
    torch.save(other.state_dict() if problem == "weights-wrong-shape" else reference_unet().state_dict(),
               str(tmp_path / "w.pt"))
    spec = tmp_path / "spec.json"
    if spec_text is None:
        write_spec(spec)
    else:
        spec.write_text(spec_text)
    with pytest.raises(InputError) as err:
        load_base(spec, weights=tmp_path / "w.pt")
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


# ----------------------------------------------------------------------------------------------
# CLI: models, fetch-model


def test_cli_models_lists_deepbet():
    proc = cli("models")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deepbet") and "Brain" in proc.stdout and "MIT" in proc.stdout
    proc = cli("models", "--json")
    models = json.loads(proc.stdout)
    deepbet = next(m for m in models if m["name"] == "deepbet")
    assert deepbet["labels"][0]["name"] == "Brain" and isinstance(deepbet["cached"], bool)
    assert deepbet["fingerprint"] == get_entry("deepbet")["fingerprint"]


def test_cli_models_with_a_broken_catalog_entry(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"title": "no name"}))
    line = assert_one_line_error(cli("models", env={"TCURLORA_CATALOG": str(tmp_path)}))
    assert "broken.json" in line


@pytest.mark.network
def test_cli_fetch_model_offline_from_a_local_wheel_and_from_the_cache(deepbet_wheel, tmp_path):
    cache = tmp_path / "cache"
    offline = {"TCURLORA_CACHE": str(cache), "TCURLORA_OFFLINE": "1"}
    line = assert_one_line_error(cli("fetch-model", "deepbet", env=offline))  # nothing cached, no --from
    assert "TCURLORA_OFFLINE" in line
    proc = cli("fetch-model", "deepbet", "--from", deepbet_wheel, env=offline)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deepbet: ready (") and "Traceback" not in proc.stderr
    assert (cache / "archives" / deepbet_wheel.name).is_file()
    assert len(list((cache / "converted").glob("deepbet-1.0.2-*.safetensors"))) == 2
    proc = cli("models", "--json", env=offline)
    assert next(m for m in json.loads(proc.stdout) if m["name"] == "deepbet")["cached"] is True
    # and again with no file at all: the cache is used, nothing is downloaded
    proc = cli("fetch-model", "deepbet", env=offline)
    assert proc.returncode == 0 and proc.stdout.startswith("deepbet: ready ("), proc.stderr



# ----------------------------------------------------------------------------------------------
# every method's adapter file loads onto the base loaded again (full and LoRA train base weights in place)


@pytest.mark.parametrize("method, extra", [("tcurlora", {}), ("full", {}), ("lora", {}),
                                           ("lora", {"train_modules": ["model.2.conv"]})],
                         ids=["tcurlora", "full", "lora", "lora+trained-module"])
def test_adapter_of_every_method_loads_onto_the_same_base(tmp_path, method, extra):
    net = reference_unet()
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    spec = write_spec(tmp_path / "unet.json", weights="w.safetensors")
    base = load_base(spec)
    fingerprint = base_fingerprint(base.network)
    inject_adapter(base.network, TCURLoRAConfig(method=method, rank=2, **extra), "trained")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stands in for training: every trainable value moves
        for p in base.network.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    x = x_input()
    with torch.no_grad():
        adapted = base.network(x)
        assert (adapted - net(x)).abs().max().item() > 1e-4
    path = tmp_path / f"{method}.safetensors"
    manifest = save_adapter(base.network, path)
    assert manifest["base"]["fingerprint"] == fingerprint  # the base as loaded, not the trained weights
    again = load_base(spec).network
    load_adapter(again, path, adapter_name="site")
    with torch.no_grad():
        assert (again(x) - adapted).abs().max().item() <= 1e-6
