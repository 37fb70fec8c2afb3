"""An adapted MONAI bundle as a MONAI bundle: the base's folder with the merged weights.

Everything of the base bundle is copied (configs, docs, scripts) except its ``models/`` folder, which gets the
merged weights under the base's file name and in its form (``model.pt`` as a state dict, wrapped as the base
wrapped it; or ``model.safetensors``). Other model files there (``model.ts``, ONNX, TensorRT) hold the base's
weights and are left out, with a warning. A new head changes ``network_def``'s ``out_channels`` in every JSON
config (following ``@`` references to the value), ``channel_def``/``num_channels`` of ``metadata.json``'s
``pred`` output, and the labels of ``configs/tcurlora.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, List, Tuple

import torch

from ..errors import InputError
from ..models import _bundle_network, read_weights
from ..safejson import read_config
from .common import Export, format_state, read_json_object, write_json

TOOL = "MONAI bundle (python -m monai.bundle run, MONAI Label, MONAI Deploy)"
WEIGHT_FILES = ("model.pt", "model.safetensors")
STATE_KEYS = ("state_dict", "model", "network", "model_state_dict")  # what read_weights unwraps


def write(export: Export, folder: Path, final: Path) -> List[str]:
    """Fill ``folder`` (the exported bundle, renamed to ``final`` afterwards); returns how to run it."""
    source = Path(export.base_path)
    config_file = next((source / "configs" / n for n in ("inference.json", "inference.yaml")
                        if (source / "configs" / n).is_file()), None)
    weights = next((source / "models" / n for n in WEIGHT_FILES if (source / "models" / n).is_file()), None)
    if config_file is None or weights is None:
        raise InputError(source, "not a MONAI bundle with configs/inference.json and models/model.pt")
    shutil.copytree(source, folder, ignore=lambda d, names: names if Path(d) == source / "models" else [],
                    dirs_exist_ok=True)
    left_out = sorted(p.name for p in (source / "models").iterdir() if p.name != weights.name)
    if left_out:
        export.warnings.append(f"models/{', models/'.join(left_out)} left out: they hold the base's weights "
                               "(export TorchScript again with python -m monai.bundle ckpt_export)")
    channels = len(export.labels) + 1
    if export.new_head:
        for path in sorted((folder / "configs").glob("*")):
            if path.suffix in (".yaml", ".yml") and "network_def" in path.read_text(encoding="utf-8"):
                raise InputError(source / "configs" / path.name, "a new head changes the number of output "
                                 "channels, which tcurlora writes into JSON configs only")
            if path.suffix == ".json" and path.name not in ("metadata.json", "tcurlora.json"):
                config = read_json_object(path)
                if _set_out_channels(config, channels):
                    write_json(path, config)
                elif path.name == config_file.name:
                    raise InputError(config_file, "network_def has no out_channels value tcurlora can change")
        _relabel_metadata(folder / "configs" / "metadata.json", export)
        _relabel_tcurlora_json(folder / "configs" / "tcurlora.json", export)
    target = _format_network(folder / "configs" / config_file.name)
    state = format_state(target, export.network.state_dict(), read_weights(weights), export.channel_sources(),
                         weights)
    (folder / "models").mkdir(exist_ok=True)
    _save_like(weights, state, folder / "models" / weights.name)
    return [f"python -m monai.bundle run --bundle_root {final} --config_file {final / 'configs' / config_file.name} "
            "(with the overrides the base bundle takes, e.g. its input folder)",
            f"MONAI Label / MONAI Deploy: load {final} as you load the base bundle"]


def _format_network(config_file: Path) -> torch.nn.Module:
    """The network the exported config builds (its plain-value ``network_def``, as tcurlora reads bundles)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(read_config(config_file, "bundle config"))
    return _bundle_network(parser, config_file, ()).network


def _save_like(original: Path, state: dict, path: Path) -> None:
    """``state`` in the form of the base's weights file: safetensors, or a ``.pt`` state dict (under the same
    key and ``module.`` prefix as the base's, its other entries kept)."""
    if original.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return
    raw = torch.load(str(original), map_location="cpu", weights_only=True)  # read_weights read it this way
    key = next((k for k in STATE_KEYS if isinstance(raw, dict) and isinstance(raw.get(k), dict)), None)
    held = raw[key] if key else raw
    prefix = "module." if any(str(k).startswith("module.") for k in held) else ""
    state = {prefix + k: v for k, v in state.items()}
    torch.save({**raw, key: state} if key else state, str(path))


def _set_out_channels(config: dict, channels: int) -> bool:
    """Set ``network_def``'s ``out_channels`` (or the value its ``@`` reference names) to ``channels``."""
    holder, key = _resolve(config, config, "network_def")
    network = holder[key] if holder is not None else None
    if not isinstance(network, dict) or "out_channels" not in network:
        return False
    holder, key = _resolve(config, network, "out_channels")
    if holder is None or not isinstance(holder[key], int):
        return False
    holder[key] = channels
    return True


def _resolve(config: dict, holder: Any, key: Any, depth: int = 0) -> Tuple[Any, Any]:
    """(container, key) of the value that ``holder[key]`` is or refers to with ``@id`` (``::`` or ``#`` nesting)."""
    value = holder[key] if isinstance(holder, dict) and key in holder else None
    if not (isinstance(value, str) and value.startswith("@")) or depth > 16:
        return (holder, key) if value is not None else (None, None)
    parts = value[1:].replace("#", "::").split("::")
    parent: Any = config
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) and part.isdigit() else \
            parent.get(part) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or parts[-1] not in parent:
        return None, None
    return _resolve(config, parent, parts[-1], depth + 1)


def _relabel_metadata(path: Path, export: Export) -> None:
    if not path.is_file():
        return
    metadata = read_json_object(path)
    pred = metadata.get("network_data_format", {}).get("outputs", {}).get("pred")
    if isinstance(pred, dict):
        pred["num_channels"] = len(export.labels) + 1
        pred["channel_def"] = {"0": "background", **{str(l["channel"]): l["name"] for l in export.labels}}
        write_json(path, metadata)


def _relabel_tcurlora_json(path: Path, export: Export) -> None:
    if not path.is_file():
        return
    extra = read_json_object(path)
    if "labels" in extra:
        extra["labels"] = [{"value": l["channel"], "name": l["name"], "color": l["color"],
                            **({"terminology": l["terminology"]} if l.get("terminology") else {})}
                           for l in export.labels]
        write_json(path, extra)
