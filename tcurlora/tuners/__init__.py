"""tCURLoRA and its baselines as a tuner (HF PEFT's config / layer / model split).

* :mod:`.fourier` — the Fourier-domain kernels (Δ𝒲 build, projected core gradient);
* :mod:`.layers` — the stack, the layer wrapper, the switch for fully trained modules;
* :mod:`.stacks` — naming through wrappers and aliases, and which layers form which stack (presets);
* :mod:`.heads` — an adapter's own output layer for new labels, and where its channels start;
* :mod:`.strategies` — the base strategy and ``tcurlora``, ``decoder``, ``full``, ``lora``;
* :mod:`.baselines` — the paper's other baselines (``pissa``, ``dora``, ``curlora``, ``lorapt``);
* :mod:`.registry` — the strategy of each method, registered by the module that defines it;
* :mod:`.model` — :class:`TCURTuner`, the object that owns a model's adapters.

The model-level functions users call live in :mod:`tcurlora.adapter`.
"""

from . import baselines  # noqa: F401  (imported for its methods, which register themselves)
from .layers import AdapterError, ModuleSwitch, TCURLayer, TCURStack
from .model import TCURTuner, get_tuner
from .registry import STRATEGIES
from .stacks import Member, StackSpec, resolve_stacks
from .strategies import AdapterRecord

__all__ = ["AdapterError", "AdapterRecord", "Member", "ModuleSwitch", "STRATEGIES", "StackSpec", "TCURLayer",
           "TCURStack", "TCURTuner", "get_tuner", "resolve_stacks"]
