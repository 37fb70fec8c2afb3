"""A stand-in for what only the Slicer application gives the module scripts: ``qt``, the scripted-module base
classes (``slicer.ScriptedLoadableModule``) and the typed parameter node (``slicer.parameterNodeWrapper``).

Test-only. With it, and the real MRML of the ``slicer-core`` wheel, ``TCURSegment.py`` and ``TCURFinetune.py``
import headless, so their declarations run: the parameter nodes' fields, defaults and ranges, and the Logic
classes' bases. :func:`parameterNodeWrapper` does with a class what Slicer's does: every annotated field becomes
an attribute holding its default (the class value, else the type's: ``[]`` for a list, ``None`` for a node,
``""``, ``0``, ``0.0``, ``False``), and a value that a ``WithinRange`` or ``Choice`` annotation refuses raises
ValueError. Nothing of the GUI runs: ``qt`` names are empty classes.
"""

import copy
import sys
import types
import typing

TYPE_DEFAULTS = {str: "", int: 0, float: 0.0, bool: False}


class WithinRange:
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


class Choice:
    def __init__(self, choices) -> None:
        self.choices = list(choices)

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


def parameterNodeWrapper(cls):
    fields = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        validators = ()
        if typing.get_origin(hint) is typing.Annotated:
            hint, *validators = typing.get_args(hint)
        if name in cls.__dict__:
            default = cls.__dict__[name]
        else:
            default = [] if typing.get_origin(hint) is list else TYPE_DEFAULTS.get(hint)
        fields[name] = (default, tuple(validators))

    def __init__(self, parameterNode=None):
        for field, (default, _) in fields.items():
            object.__setattr__(self, field, copy.copy(default))

    def __setattr__(self, field, value):
        if field not in fields:
            raise AttributeError(f"{cls.__name__} has no parameter '{field}'")
        for validator in fields[field][1]:
            validator.validate(value)
        object.__setattr__(self, field, value)

    cls.__init__, cls.__setattr__, cls.allParameters = __init__, __setattr__, fields
    return cls


class _Base:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def getParameterNode(self):
        return None


def _qtName(name):
    if name.startswith("__"):  # module attributes others look up (__file__, __path__, ...): qt has none
        raise AttributeError(name)
    return type(name, (), {})


def install() -> typing.Callable[[], None]:
    """Put the stand-ins in place (``slicer`` itself is the real ``slicer-core`` package); returns an undo."""
    import slicer

    qt = types.ModuleType("qt")
    qt.__getattr__ = _qtName
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (_Base,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.WithinRange, wrapper.Choice = parameterNodeWrapper, WithinRange, Choice
    modules = {"qt": qt, "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper}
    before = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper = scripted, wrapper

    def undo():
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in ("ScriptedLoadableModule", "parameterNodeWrapper"):
            if hasattr(slicer, name):
                delattr(slicer, name)

    return undo
