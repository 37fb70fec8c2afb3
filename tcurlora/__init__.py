"""tcurlora: tensor-CUR low-rank adaptation (tCURLoRA) of 3D segmentation networks.

The engine of the SlicerTCURLoRA 3D Slicer extension; imports neither ``slicer`` nor ``qt``.
Importing this package is cheap: torch-dependent names load on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "TCURLoRAConfig": "config",
    "inject_adapter": "adapter",
    "merge_adapter": "adapter",
    "unmerge_adapter": "adapter",
    "merge_and_unload": "adapter",
    "adapter_state_dict": "adapter",
    "load_adapter_state_dict": "adapter",
    "trainable_parameter_count": "adapter",
    "set_active_adapter": "adapter",
    "list_adapters": "adapter",
    "delete_adapter": "adapter",
    "base_state_dict": "adapter",
    "save_adapter": "adapter_file",
    "load_adapter": "adapter_file",
    "base_fingerprint": "adapter",
    "describe_adapter": "adapter",
    "get_tuner": "tuners",
    "TCURTuner": "tuners",
    "read_manifest": "manifest",
    "load_base": "models",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):  # PEP 562: keep `import tcurlora` light for Slicer and the CLI's --help
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'tcurlora' has no attribute {name!r}")
