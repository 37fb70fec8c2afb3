"""Python packages the engine needs, installed at first use after asking the user.

* torch through the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)``),
  which picks a build that matches the computer's GPU;
* monai, safetensors, nibabel, pynrrd, slicerio, scipy, matplotlib through ``slicer.util.pip_install``.

Slicer's own SimpleITK is never replaced: every pip call gets a constraints file that pins the installed
SimpleITK version.

Offline: set the environment variable ``TCURLORA_WHEELHOUSE`` to a local folder of wheels (for example made
with ``pip download -d wheels torch monai safetensors nibabel pynrrd slicerio scipy matplotlib`` on a computer
with the same OS and Python version as Slicer). Every package, torch included, is then installed with
``pip install --no-index --find-links <folder> ...`` and nothing is downloaded.

Everything that talks to Slicer is injected, so this module is testable without Slicer.
"""

import importlib
import importlib.util
import os
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

WHEELHOUSE_ENV = "TCURLORA_WHEELHOUSE"
TORCH_REQUIREMENT = ">=2.1"

# (import name, pip requirement)
TORCH = ("torch", "torch" + TORCH_REQUIREMENT)
PACKAGES = (
    ("monai", "monai>=1.3"),
    ("safetensors", "safetensors>=0.4"),
    ("nibabel", "nibabel>=5.0"),
    ("nrrd", "pynrrd>=1.0"),
    ("slicerio", "slicerio>=1.0"),
    ("scipy", "scipy>=1.9"),
    ("matplotlib", "matplotlib>=3.6"),
)


def isImportable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missingPackages(isAvailable: Callable[[str], bool] = isImportable) -> List[Tuple[str, str]]:
    """(import name, pip requirement) of every required package that is not importable."""
    return [pkg for pkg in (TORCH,) + PACKAGES if not isAvailable(pkg[0])]


def wheelhouse(environ=None) -> Optional[str]:
    """The offline wheel folder from ``TCURLORA_WHEELHOUSE`` (None when unset; ValueError when not a folder)."""
    environ = os.environ if environ is None else environ
    folder = environ.get(WHEELHOUSE_ENV, "").strip()
    if not folder:
        return None
    if not os.path.isdir(folder):
        raise ValueError(f"{WHEELHOUSE_ENV} is set to '{folder}', which is not a folder")
    return folder


def simpleITKVersion() -> Optional[str]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for name in ("SimpleITK", "simpleitk"):
        try:
            return metadata.version(name)
        except Exception:
            continue
    return None


def writeConstraints(folder: Optional[str] = None, sitkVersion: Optional[str] = None) -> Optional[str]:
    """A pip constraints file that keeps the installed SimpleITK (None when SimpleITK is not installed)."""
    version = sitkVersion if sitkVersion is not None else simpleITKVersion()
    if not version:
        return None
    fd, path = tempfile.mkstemp(prefix="tcurlora-constraints-", suffix=".txt", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(f"SimpleITK=={version}\n")
    return path


def pipArguments(requirements: Sequence[str], wheelhouseFolder: Optional[str] = None,
                 constraintsFile: Optional[str] = None) -> List[str]:
    """Arguments for ``slicer.util.pip_install`` (a list, so paths with spaces need no quoting)."""
    args: List[str] = []
    if wheelhouseFolder:
        args += ["--no-index", "--find-links", wheelhouseFolder]
    if constraintsFile:
        args += ["-c", constraintsFile]
    return args + list(requirements)


def confirmationText(missing: Sequence[Tuple[str, str]], offlineFolder: Optional[str]) -> str:
    names = ", ".join(req for _, req in missing)
    text = ("TCURLoRA needs these Python packages, which are not installed yet:\n\n"
            f"{names}\n\n")
    if offlineFolder:
        text += f"They will be installed from the local wheel folder {offlineFolder} ({WHEELHOUSE_ENV}).\n\n"
    else:
        text += ("They will be downloaded and installed now (PyTorch through the PyTorch extension). "
                 "This can take several minutes. Slicer's own SimpleITK is kept.\n\n")
    return text + "Install them now?"


class DependencyInstaller:
    """Checks and installs the engine's packages.

    :param confirm: ``confirm(text) -> bool`` (``slicer.util.confirmOkCancelDisplay`` in Slicer).
    :param pipInstall: ``pipInstall(args: list)`` (``slicer.util.pip_install``).
    :param installTorch: ``installTorch() -> torch module or None`` (the PyTorch extension); None when that
        extension is not available.
    :param isAvailable: ``isAvailable(importName) -> bool``.
    """

    def __init__(self, confirm: Callable[[str], bool], pipInstall: Callable[[List[str]], object],
                 installTorch: Optional[Callable[[], object]] = None,
                 isAvailable: Callable[[str], bool] = isImportable, log: Callable[[str], None] = print,
                 environ=None, sitkVersion: Optional[str] = None) -> None:
        self.confirm = confirm
        self.pipInstall = pipInstall
        self.installTorch = installTorch
        self.isAvailable = isAvailable
        self.log = log
        self.environ = environ
        self.sitkVersion = sitkVersion

    def missing(self) -> List[Tuple[str, str]]:
        return missingPackages(self.isAvailable)

    def ensure(self) -> bool:
        """True when everything is importable (installing what is missing after asking); False when the user
        declined. Raises RuntimeError with a readable message when an installation fails."""
        missing = self.missing()
        if not missing:
            return True
        offline = wheelhouse(self.environ)
        if not self.confirm(confirmationText(missing, offline)):
            return False
        constraints = writeConstraints(sitkVersion=self.sitkVersion)
        try:
            if TORCH in missing:
                if offline:
                    self.log("Installing PyTorch from " + offline)
                    self.pipInstall(pipArguments([TORCH[1]], offline, constraints))
                else:
                    if self.installTorch is None:
                        raise RuntimeError("PyTorch is not installed and the PyTorch extension is not available: "
                                           "install the 'PyTorch' extension from the Extensions Manager.")
                    self.log("Installing PyTorch through the PyTorch extension")
                    if self.installTorch() is None:
                        raise RuntimeError("PyTorch was not installed; TCURLoRA cannot run without it.")
            rest = [req for pkg, req in missing if pkg != TORCH[0]]
            if rest:
                self.log("Installing " + ", ".join(rest))
                self.pipInstall(pipArguments(rest, offline, constraints))
        finally:
            if constraints and os.path.exists(constraints):
                os.remove(constraints)
        importlib.invalidate_caches()
        still = self.missing()
        if still:
            raise RuntimeError("These packages could not be installed: " + ", ".join(r for _, r in still)
                               + ". See the Python console for pip's messages.")
        return True


def slicerInstaller(log: Callable[[str], None] = print) -> DependencyInstaller:
    """The installer wired to the Slicer application (import inside Slicer only)."""
    import slicer

    def installTorch():
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("TCURLoRA needs the 'PyTorch' extension: install it from the Extensions Manager "
                               "and restart Slicer.")
        import inspect

        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        kwargs = {"askConfirmation": True}
        try:
            if "torchVersionRequirement" in inspect.signature(torchLogic.installTorch).parameters:
                kwargs["torchVersionRequirement"] = TORCH_REQUIREMENT
        except (TypeError, ValueError):
            pass
        return torchLogic.installTorch(**kwargs)

    return DependencyInstaller(confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, "TCURLoRA"),
                               pipInstall=slicer.util.pip_install, installTorch=installTorch, log=log)
