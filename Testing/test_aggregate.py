"""`tcurlora aggregate`: the weighted mean of tCURLoRA cores is the weighted mean of the weight updates; LoRA's
factors do not average; adapters that do not fit are refused with one line naming the first difference.

The figures printed here (run with ``-s``) are the ones quoted in docs/federated.md.
"""

import json
import subprocess

import pytest
import torch
from monai.networks.nets import UNet

from tcurlora import cli
from tcurlora.adapter import get_adapter, inject_adapter
from tcurlora.adapter_file import load_adapter, save_adapter
from tcurlora.aggregate import read_adapter, weighted_mean
from tcurlora.config import TCURLoRAConfig
from conftest import assert_one_line_error, cli_subprocess, SUBPROCESS_ENV

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = [3, 1, 2]  # the sites' case counts: the default weights


def base(seed=0):
    torch.manual_seed(seed)
    return UNet(3, 1, 3, (8, 16, 16), (2, 2), num_res_units=1).eval()


def randomise(model, seed, scale=0.1):
    """Stand-in for a site's training: random, clearly non-zero trainable values (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def site_adapter(path, seed, cases, config=None, base_seed=0, labels=None):
    model = base(base_seed)
    inject_adapter(model, config or TCURLoRAConfig(rank=2, seed=seed))
    randomise(model, seed)
    save_adapter(model, path, provenance={"cases": cases}, labels=labels)
    return model


def stack_deltas(model):
    with torch.no_grad():
        return {name: s.delta_w(detached=True).clone() for name, s in get_adapter(model).stacks.items()}


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_mean_of_cores_is_mean_of_weight_updates(tmp_path):
    paths = [tmp_path / f"site{i}.safetensors" for i in range(3)]
    deltas = [stack_deltas(site_adapter(p, seed=i + 1, cases=n)) for i, (p, n) in enumerate(zip(paths, CASES))]
    merged = tmp_path / "merged.safetensors"
    assert cli.main(["aggregate", *map(str, paths), "-o", str(merged)]) == 0

    fresh = base()
    manifest = load_adapter(fresh, merged)
    got = stack_deltas(fresh)
    assert manifest["provenance"]["cases"] == sum(CASES)
    assert [a["weight"] for a in manifest["provenance"]["aggregated_from"]] == CASES
    worst = 0.0
    for name in got:
        expected = sum(n * d[name].double() for n, d in zip(CASES, deltas)) / sum(CASES)
        worst = max(worst, relative_error(got[name].double(), expected))
        # the update is not the same at every site: the mean is not one site's update in disguise
        assert relative_error(deltas[0][name].double(), expected) > 0.1
    print(f"\ntCURLoRA: max |ΔW(mean of cores) - mean of ΔW| / max |mean ΔW| = {worst:.2e} "
          f"({len(got)} stacks, weights {CASES})")
    assert worst < 1e-5

    # explicit weights override the case counts, and the core is their exact weighted mean
    equal = tmp_path / "equal.safetensors"
    assert cli.main(["aggregate", *map(str, paths), "--weights", "1", "1", "1", "-o", str(equal)]) == 0
    cores = [read_adapter(p)[1] for p in paths]
    _, mean = read_adapter(equal)
    for key in mean:
        torch.testing.assert_close(mean[key], sum(c[key] for c in cores) / 3, rtol=1e-6, atol=1e-7)


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_mean_of_lora_factors_is_not_mean_of_updates(tmp_path):
    config = TCURLoRAConfig(method="lora", rank=2)
    sites = []
    for i in range(3):
        model = base()
        inject_adapter(model, config)
        sites.append(randomise(model, seed=i + 1, scale=0.3))
    averaged = base()
    inject_adapter(averaged, config)
    with torch.no_grad():
        for key, value in averaged.state_dict(keep_vars=True).items():
            if "lora_" in key:
                value.copy_(weighted_mean([s.state_dict() for s in sites], CASES)[key])
    worst = 0.0
    for name, layer in lora_layers(averaged).items():
        with torch.no_grad():
            mean_update = sum(n * lora_layers(s)[name].get_delta_weight("default") for n, s in zip(CASES, sites)) / sum(CASES)
            from_mean_factors = layer.get_delta_weight("default")
        worst = max(worst, relative_error(from_mean_factors, mean_update))
    print(f"LoRA: max |(mean B)(mean A) - mean(B A)| / max |mean(B A)| = {worst:.2f} "
          f"({len(lora_layers(averaged))} layers, same weights)")
    assert worst > 0.1

    # the CLI refuses LoRA files rather than average their factors
    paths = []
    for i, model in enumerate(sites):
        paths.append(tmp_path / f"lora{i}.safetensors")
        save_adapter(model, paths[-1], provenance={"cases": CASES[i]})
    proc = subprocess.run(cli_subprocess("aggregate", *paths, "-o", tmp_path / "m.safetensors"),
                                        capture_output=True, text=True, env=SUBPROCESS_ENV)
    line = assert_one_line_error(proc)
    assert "lora0.safetensors" in line and "B·A" in line
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("kind, expected", [
    ("base", "base model"),
    ("rank", "config rank 3 instead of 2"),
    ("labels", "label table"),
    ("indices", "indices"),
    ("weights", "2 weight(s) for 3 adapter(s)"),
])
def test_refuses_adapters_that_do_not_fit(tmp_path, kind, expected):
    first = tmp_path / "a.safetensors"
    second = tmp_path / "b.safetensors"
    third = tmp_path / "c.safetensors"
    sampled = TCURLoRAConfig(rank=2, selection="sampled", seed=1)
    site_adapter(first, 1, 2, config=sampled if kind == "indices" else None)
    site_adapter(third, 3, 2, config=sampled if kind == "indices" else None)
    other = {"base": dict(base_seed=1), "rank": dict(config=TCURLoRAConfig(rank=3)),
             "labels": dict(labels=[{"value": 1, "name": "Liver", "color": [1, 0, 0]},
                                    {"value": 2, "name": "Spleen", "color": [0, 1, 0]}]),
             "indices": dict(config=TCURLoRAConfig(rank=2, selection="sampled", seed=2)), "weights": {}}[kind]
    site_adapter(second, 2, 2, **other)
    out = tmp_path / "merged.safetensors"
    extra = ["--weights", "1", "2"] if kind == "weights" else []
    proc = subprocess.run(cli_subprocess("aggregate", first, second, third, *extra, "-o", out),
                                        capture_output=True, text=True, env=SUBPROCESS_ENV)
    line = assert_one_line_error(proc)
    assert expected in line, line
    if kind != "weights":
        assert line.startswith("error: b.safetensors: does not fit a.safetensors"), line
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_missing_case_count_asks_for_weights(tmp_path):
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, p in enumerate(paths):
        model = base()
        inject_adapter(model, TCURLoRAConfig(rank=2))
        randomise(model, i + 1)
        save_adapter(model, p)  # no provenance case count
    proc = subprocess.run(cli_subprocess("aggregate", *paths, "-o", tmp_path / "m.safetensors"),
                                        capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert "a.safetensors: its provenance records no case count; give --weights" in assert_one_line_error(proc)
    assert cli.main(["aggregate", *map(str, paths), "--weights", "1", "1", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert json.loads(json.dumps(read_adapter(tmp_path / "m.safetensors")[0]["provenance"]["aggregated_from"]))[1]["weight"] == 1


def test_huge_weights_average_like_their_ratio(tmp_path):
    """Weights of 1e308 each must not overflow their sum to inf (every share 0, an all-zero adapter)."""
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, p in enumerate(paths):
        site_adapter(p, seed=i + 1, cases=1)
    states = [read_adapter(p)[1] for p in paths]
    for weights, ratio in ((["1e308", "1e308"], (1, 1)), (["1.5e308", "5e307"], (3, 1))):
        out = tmp_path / f"m{ratio[0]}.safetensors"
        assert cli.main(["aggregate", *map(str, paths), "--weights", *weights, "-o", str(out)]) == 0
        _, merged = read_adapter(out)
        for key, value in merged.items():
            expected = (ratio[0] * states[0][key].double() + ratio[1] * states[1][key].double()) / sum(ratio)
            torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-6, atol=1e-7)
        assert max(float(v.abs().max()) for v in merged.values()) > 1e-3  # not silently zero
