"""Python packages the engine needs, installed at first use after asking the user once.

The list is the engine's own ``tcurlora/requirements.txt`` (the file ``pyproject.toml`` reads too), so the
Slicer installer and ``pip install tcurlora`` can never disagree.

* torch through the PyTorch extension (``PyTorchUtils.PyTorchUtilsLogic().installTorch``), which picks a build
  that matches the computer's GPU; an installed torch older than the minimum is upgraded the same way;
* the others through ``slicer.util.pip_install``.

One question covers everything: PyTorchUtils is called with ``askConfirmation=False``. Every pip call gets a
constraints file that pins the installed torch (so a monai install cannot swap the torch PyTorchUtils chose)
and the packages Slicer itself ships (SimpleITK, numpy), which are never replaced.

Offline: set the environment variable ``TCURLORA_WHEELHOUSE`` to a local folder of wheels (for example made
with ``pip download -d wheels -r requirements.txt`` on a computer with the same OS and Python version as
Slicer). Every package, torch included, is then installed with ``pip install --no-index --find-links <folder>``
and nothing is downloaded.

Everything that talks to Slicer is injected, so this module is testable without Slicer.
"""

import importlib
import os
import re
import tempfile
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

WHEELHOUSE_ENV = "TCURLORA_WHEELHOUSE"
TORCH = "torch"
# Shipped with Slicer: any installed version is accepted and pinned, never replaced by pip.
KEEP_INSTALLED = ("simpleitk", "numpy")

_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?$")


class Requirement(NamedTuple):
    name: str  # distribution name as pip knows it
    minimum: Optional[str]  # "2.1" or None

    @property
    def text(self) -> str:
        return self.name + (f">={self.minimum}" if self.minimum else "")


def requirementsFile() -> str:
    """``requirements.txt`` of the ``tcurlora`` package that the modules use (importing it needs no torch)."""
    import tcurlora

    return os.path.join(os.path.dirname(os.path.abspath(tcurlora.__file__)), "requirements.txt")


def readRequirements(path: Optional[str] = None) -> List[Requirement]:
    """The requirements file as a list; ValueError naming the file and line for anything but ``name[>=v]``."""
    path = path or requirementsFile()
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            match = _LINE.match(text)
            if not match:
                raise ValueError(f"{path}:{number}: '{text}' is not of the form name>=version")
            out.append(Requirement(match.group(1), match.group(2)))
    return out


def versionTuple(version: str) -> Tuple[int, ...]:
    """Leading numeric release parts: ``"2.13.0+cpu"`` -> (2, 13, 0), ``"1.6rc1"`` -> (1, 6)."""
    parts = []
    for piece in str(version).split("+", 1)[0].split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group(0)))
        if digits.group(0) != piece:
            break
    return tuple(parts)


def satisfies(installed: Optional[str], minimum: Optional[str]) -> bool:
    if installed is None:
        return False
    if not minimum:
        return True
    have, need = versionTuple(installed), versionTuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installedVersion(name: str) -> Optional[str]:
    """Version of an installed distribution (None when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


class Missing(NamedTuple):
    requirement: Requirement
    installed: Optional[str]  # the too-old version, or None

    def describe(self) -> str:
        return self.requirement.text + (f" (installed: {self.installed})" if self.installed else "")


def missingPackages(requirements: Sequence[Requirement],
                    versionOf: Callable[[str], Optional[str]] = installedVersion) -> List[Missing]:
    """Requirements that are not installed or older than their minimum (torch first)."""
    out = []
    for req in requirements:
        have = versionOf(req.name)
        if req.name.lower() in KEEP_INSTALLED and have is not None:
            continue
        if not satisfies(have, req.minimum):
            out.append(Missing(req, have))
    return sorted(out, key=lambda m: m.requirement.name != TORCH)


def wheelhouse(environ=None) -> Optional[str]:
    """The offline wheel folder from ``TCURLORA_WHEELHOUSE`` (None when unset; ValueError when not a folder)."""
    environ = os.environ if environ is None else environ
    folder = environ.get(WHEELHOUSE_ENV, "").strip()
    if not folder:
        return None
    if not os.path.isdir(folder):
        raise ValueError(f"{WHEELHOUSE_ENV} is set to '{folder}', which is not a folder")
    return folder


def writeConstraints(pins: Sequence[Tuple[str, str]], folder: Optional[str] = None) -> Optional[str]:
    """A pip constraints file pinning ``(name, version)`` pairs (None when there is nothing to pin)."""
    lines = [f"{name}=={version}\n" for name, version in pins if version]
    if not lines:
        return None
    fd, path = tempfile.mkstemp(prefix="tcurlora-constraints-", suffix=".txt", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
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


def confirmationText(missing: Sequence[Missing], offlineFolder: Optional[str]) -> str:
    names = ", ".join(m.describe() for m in missing)
    text = f"TCURLoRA needs these Python packages, which are not installed or too old:\n\n{names}\n\n"
    if offlineFolder:
        text += f"They will be installed from the local wheel folder {offlineFolder} ({WHEELHOUSE_ENV}).\n\n"
    else:
        text += ("They will be downloaded and installed now (PyTorch through the PyTorch extension, which picks "
                 "the build for this computer's GPU). This can take several minutes. Slicer's own SimpleITK and "
                 "numpy are kept.\n\n")
    return text + "Install them now?"


class DependencyInstaller:
    """Checks and installs the engine's packages.

    :param confirm: ``confirm(text) -> bool`` (``slicer.util.confirmOkCancelDisplay`` in Slicer); asked once.
    :param pipInstall: ``pipInstall(args: list)`` (``slicer.util.pip_install``).
    :param installTorch: ``installTorch(requirement: str) -> torch module or None`` (the PyTorch extension,
        without a question of its own); None when that extension is not available.
    :param versionOf: ``versionOf(distribution) -> version or None``.
    :param requirements: the list to satisfy (default: ``tcurlora/requirements.txt``).
    :param progress: ``progress(done, total, text)`` before each installation step.
    """

    def __init__(self, confirm: Callable[[str], bool], pipInstall: Callable[[List[str]], object],
                 installTorch: Optional[Callable[[str], object]] = None,
                 versionOf: Callable[[str], Optional[str]] = installedVersion, log: Callable[[str], None] = print,
                 environ=None, requirements: Optional[Sequence[Requirement]] = None,
                 progress: Optional[Callable[[int, int, str], None]] = None) -> None:
        self.confirm = confirm
        self.pipInstall = pipInstall
        self.installTorch = installTorch
        self.versionOf = versionOf
        self.log = log
        self.environ = environ
        self.requirements = list(requirements) if requirements is not None else readRequirements()
        self.progress = progress or (lambda done, total, text: None)

    def missing(self) -> List[Missing]:
        return missingPackages(self.requirements, self.versionOf)

    def pins(self) -> List[Tuple[str, str]]:
        """What pip must not change: the installed torch and the packages Slicer ships."""
        names = [TORCH] + [r.name for r in self.requirements if r.name.lower() in KEEP_INSTALLED]
        return [(name, self.versionOf(name)) for name in names if self.versionOf(name)]

    def ensure(self) -> bool:
        """True when every requirement is satisfied (installing what is missing after one question); False when
        the user declined. Raises RuntimeError with a readable message when an installation fails."""
        missing = self.missing()
        if not missing:
            return True
        offline = wheelhouse(self.environ)
        if not self.confirm(confirmationText(missing, offline)):
            return False
        torch = [m for m in missing if m.requirement.name == TORCH]
        rest = [m.requirement.text for m in missing if m.requirement.name != TORCH]
        total = len(torch) + (1 if rest else 0)
        if torch:
            self.progress(0, total, "Installing PyTorch...")
            self._installTorch(torch[0].requirement, offline)
        if rest:
            self.progress(len(torch), total, "Installing " + ", ".join(rest) + "...")
            constraints = writeConstraints(self.pins())  # after torch: pins the version just installed
            try:
                self.log("Installing " + ", ".join(rest))
                self.pipInstall(pipArguments(rest, offline, constraints))
            finally:
                if constraints and os.path.exists(constraints):
                    os.remove(constraints)
        self.progress(total, total, "Installed.")
        importlib.invalidate_caches()
        still = self.missing()
        if still:
            raise RuntimeError("These packages could not be installed: " + ", ".join(m.describe() for m in still)
                               + ". See the Python console for pip's messages.")
        return True

    def _installTorch(self, requirement: Requirement, offline: Optional[str]) -> None:
        if offline:
            self.log("Installing PyTorch from " + offline)
            constraints = writeConstraints([p for p in self.pins() if p[0] != TORCH])
            try:
                self.pipInstall(pipArguments([requirement.text], offline, constraints))
            finally:
                if constraints and os.path.exists(constraints):
                    os.remove(constraints)
            return
        if self.installTorch is None:
            raise RuntimeError("PyTorch is not installed (or too old) and the PyTorch extension is not available: "
                               "install the 'PyTorch' extension from the Extensions Manager.")
        self.log("Installing PyTorch through the PyTorch extension")
        if self.installTorch(">=" + requirement.minimum if requirement.minimum else "") is None:
            raise RuntimeError("PyTorch was not installed; TCURLoRA cannot run without it.")


def slicerInstaller(log: Callable[[str], None] = print,
                    progress: Optional[Callable[[int, int, str], None]] = None) -> DependencyInstaller:
    """The installer wired to the Slicer application (import inside Slicer only)."""
    import slicer

    def installTorch(versionRequirement: str):
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("TCURLoRA needs the 'PyTorch' extension: install it from the Extensions Manager "
                               "and restart Slicer.")
        # Our own question already covered torch: PyTorchUtils must not ask a second time.
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=versionRequirement or None)

    return DependencyInstaller(confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, "TCURLoRA"),
                               pipInstall=slicer.util.pip_install, installTorch=installTorch, log=log,
                               progress=progress)
