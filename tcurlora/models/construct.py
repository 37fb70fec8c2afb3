"""Building a base model's network from a description someone else wrote: a network spec, a bundle's
``network_def``, nnU-Net plans or an Auto3DSeg config.

Before any weight is allocated the network is built on torch's ``meta`` device (shapes, no storage): its
parameters and one forward pass through each window it declares (patch, sliding-window ROI) are measured
against the memory this machine has (:mod:`tcurlora.limits`), and a window the network cannot take is refused.
Arguments that make a class fetch weights from the network are refused (:func:`refuse_downloads`), and the
real build runs under :func:`tcurlora.offline.no_network`. Every failure is one
:class:`~tcurlora.errors.InputError` naming the file.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import InputError
from ..limits import check_bytes, forward_cost, size_text
from ..offline import no_network

PathLike = Union[str, "os.PathLike[str]"]

#: Constructor arguments that fetch (or read from a path of their own) pretrained weights when true.
DOWNLOAD_ARGUMENTS = frozenset({"pretrained", "pretrained_url", "pretrained_path", "pretrained_weights",
                                "pretrained_state_dict_key", "url", "model_url", "weights_url", "download",
                                "weights", "checkpoint", "path_or_repo_id", "repo_id", "cache_dir"})
#: Classes that fetch weights whatever their arguments.
ALWAYS_DOWNLOADS = {"TransChex": "it always fetches its language model from the Hugging Face hub"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^www\.", re.IGNORECASE)
SUPPLY_WEIGHTS = ("tcurlora never downloads a base's weights: set it to false or leave it out, and supply the "
                  "trained weights as files")
#: Most items in one list argument (channels per level, kernel sizes...): more is a crafted config.
MAX_ARGUMENT_ITEMS = 256
#: Most layers (modules) a network may have: several times any segmentation network's (UNETR 351, SwinUNETR
#: 270, Auto3DSeg's SegResNetDS 159), far below what a count such as ``blocks_down: [1, 1, 1000000]`` builds.
#: Each layer is a Python object even on the meta device: such a network took 19 GB before it could be measured.
MAX_MODULES = 5_000


class _TooManyModules(Exception):
    pass


@contextlib.contextmanager
def _module_budget(limit: int):
    """Raise :class:`_TooManyModules` as soon as more than ``limit`` modules are registered as submodules."""
    count = 0

    def hook(module, name, submodule):
        nonlocal count
        count += 1
        if count > limit:
            raise _TooManyModules

    handle = torch.nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def refuse_downloads(cls: type, args: Dict[str, Any], where: PathLike) -> None:
    """Refuse, naming ``where``, a class that always downloads, an argument of :data:`DOWNLOAD_ARGUMENTS`
    (or ``pretrained...``) that is true once the class's defaults apply (``EfficientNetBN`` defaults to
    ``pretrained=True``), and any URL among the argument values."""
    name = cls.__name__
    if name in ALWAYS_DOWNLOADS:
        raise InputError(where, f"network {name} cannot be used: {ALWAYS_DOWNLOADS[name]}; {SUPPLY_WEIGHTS}")
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    for key, value in {**defaults, **args}.items():
        if (key in DOWNLOAD_ARGUMENTS or key.startswith("pretrained")) and _truthy(value):
            shown = repr(value) if key in args else f"{value!r} (its default)"
            raise InputError(where, f"network argument {key}={shown} would download weights; {SUPPLY_WEIGHTS}")
    todo = list(args.values())
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(value.values())
        elif isinstance(value, (list, tuple)):
            todo.extend(value)
        elif isinstance(value, str) and _URL.match(value.strip()):
            raise InputError(where, f"network arguments hold the address {value[:80]!r}; {SUPPLY_WEIGHTS}")


def check_plain_arguments(args: Any, where: PathLike, what: str = "network arguments") -> Dict[str, Any]:
    """``args`` as constructor keywords: a mapping of names to plain values (numbers, texts, booleans, null,
    and lists or mappings of them), each list at most :data:`MAX_ARGUMENT_ITEMS` long."""
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise InputError(where, f"{what} must map argument names to values")
    todo = list(args.items())
    while todo:
        key, value = todo.pop()
        if isinstance(value, (list, dict)):
            if len(value) > MAX_ARGUMENT_ITEMS:
                raise InputError(where, f"{what}: {key} has {len(value):,} items; at most {MAX_ARGUMENT_ITEMS}")
            todo.extend((key, v) for v in (value.values() if isinstance(value, dict) else value))
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            raise InputError(where, f"{what}: {key} is not a plain value")
    return args


def _parameter_bytes(network: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])


def _truthy(value: Any) -> bool:
    try:
        return bool(value)
    except Exception:  # an array default: something is set
        return True


@dataclass
class Built:
    """A network built from a description: ``window_bytes``, the peak memory of its largest declared window
    (0 when not measured); ``out_channels``, its output channels as measured (None when not measured)."""

    network: nn.Module
    window_bytes: int = 0
    out_channels: Optional[int] = None


def _channels(output: Any) -> Optional[int]:
    first = output[0] if isinstance(output, (list, tuple)) and output else output  # deep supervision: a list
    return int(first.shape[1]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else None


def build_network(make: Callable[[], nn.Module], where: PathLike, name: str,
                  windows: Sequence[Sequence[int]] = (), in_channels: int = 1) -> Built:
    """``make()`` checked, then built.

    Args:
        make: builds the network (any exception it raises is reported as the config's problem).
        where: the file the description comes from (named in every message).
        name: the network, as messages call it.
        windows: input sizes (D, H, W) the base feeds the network: its patch and sliding-window ROI.
        in_channels: input channels of each window.
    """
    try:
        with torch.device("meta"), no_network(where), _module_budget(MAX_MODULES):
            shaped = make()
    except InputError:
        raise
    except _TooManyModules:
        raise InputError(where, f"{name} declares more than {MAX_MODULES:,} layers") from None
    except Exception as exc:  # constructors fed bad values raise TypeError, ValueError, AssertionError, ...
        raise InputError(where, f"cannot build {name} ({_reason(exc)})") from None
    if not isinstance(shaped, nn.Module):
        raise InputError(where, f"{name} is not a network")
    check_bytes(where, f"{name} with {sum(p.numel() for p in shaped.parameters()):,} parameters",
                _parameter_bytes(shaped), "the model is too large for this machine")
    built = Built(shaped)
    shaped.eval()
    for window in windows:
        shape = (1, int(in_channels), *[int(w) for w in window])
        try:
            need, output = forward_cost(shaped, shape)
        except NotImplementedError:  # an operation without a meta version: measured when it runs
            continue
        except Exception as exc:
            if "meta" in str(exc):
                continue
            raise InputError(where, f"a window of {size_text(window)} voxels does not fit {name} "
                                    f"({_reason(exc)})") from None
        check_bytes(where, f"one window of {size_text(window)} voxels through {name}", need,
                    "the model's patch or ROI is too large for this machine")
        built.window_bytes = max(built.window_bytes, need)
        built.out_channels = _channels(output)
    del shaped
    try:
        with no_network(where):
            built.network = make()
    except InputError:
        raise
    except Exception as exc:
        raise InputError(where, f"cannot build {name} ({_reason(exc)})") from None
    return built


def check_outputs(labels: Sequence[dict], out_channels: Optional[int], where: PathLike) -> None:
    """A label table fits a network of ``out_channels`` outputs: background plus one channel per label, or a
    single foreground channel for a single label."""
    if out_channels is None or out_channels == len(labels) + 1 or (out_channels == 1 and len(labels) == 1):
        return
    raise InputError(where, f"the network has {out_channels} output channel(s) but {len(labels)} label(s) are "
                            f"declared (background + one channel per label)")
