"""Where the ``tcurlora`` engine lives and how to start its worker process.

Installed extension: ``tcurlora/`` and ``TCURLoRALib/`` sit next to the module scripts in the extension's
``qt-scripted-modules`` folder, which Slicer puts on ``sys.path``. Source tree ("Additional module paths" =
``<repo>/TCURSegment`` and ``<repo>/TCURFinetune``): both packages are at the repository root, which the
module scripts add to ``sys.path`` when the import fails. Either way the worker process gets the folder that
holds ``tcurlora`` on its ``PYTHONPATH``. :func:`reloadLibrary` is the modules' "Reload" for ``TCURLoRALib``.
"""

import os
import shutil
import sys
from typing import Callable, Dict, List, Optional, Sequence


def candidateRoots(moduleFile: str) -> List[str]:
    """Folders that may hold ``tcurlora``/``TCURLoRALib`` for a module script at ``moduleFile``:
    its own folder (installed layout) and its parent (source layout)."""
    here = os.path.dirname(os.path.abspath(moduleFile))
    return [here, os.path.dirname(here)]


def reloadLibrary(package: str = "TCURLoRALib") -> List[str]:
    """Import ``package`` and its loaded submodules afresh (developer mode's "Reload"): they leave
    ``sys.modules`` together and are imported again, so each one sees the new version of the others. Returns
    their names."""
    import importlib

    names = sorted(n for n in sys.modules if n == package or n.startswith(package + "."))
    for name in names:
        del sys.modules[name]
    for name in names:
        importlib.import_module(name)
    return names


TESTING_DIR_ENV = "TCURLORA_TESTING_DIR"


def testingFile(moduleFile: str, name: str, environ=None) -> str:
    """A test-only file of the repository's ``Testing/`` folder (not installed with the extension), for the
    module self-tests run from the source tree or by ctest; ``TCURLORA_TESTING_DIR`` overrides the folder.
    FileNotFoundError (naming where it looked) otherwise."""
    environ = os.environ if environ is None else environ
    folders = [environ[TESTING_DIR_ENV]] if environ.get(TESTING_DIR_ENV) else []
    folders += [os.path.join(root, "Testing") for root in candidateRoots(moduleFile)]
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{name} not found in {', '.join(folders)}: run the self-tests from the source tree "
                            f"or set {TESTING_DIR_ENV} to its Testing folder")


def engineRoot() -> str:
    """The folder that contains the ``tcurlora`` package (what the worker needs on ``PYTHONPATH``)."""
    import tcurlora

    return os.path.dirname(os.path.dirname(os.path.abspath(tcurlora.__file__)))


def pythonSlicerExecutable(slicerHome: Optional[str] = None) -> Optional[str]:
    """``PythonSlicer`` of the running Slicer (None when it cannot be found)."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidates = []
    if slicerHome:
        candidates.append(os.path.join(slicerHome, "bin", name))
    candidates.append(os.path.join(os.path.dirname(sys.executable), name))
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def workerPythonExecutable() -> str:
    """Interpreter for the worker: ``PythonSlicer`` inside Slicer, else the current interpreter."""
    slicerHome = None
    try:
        import slicer

        app = getattr(slicer, "app", None)
        slicerHome = app.slicerHome if app is not None else None
    except ImportError:
        pass
    return pythonSlicerExecutable(slicerHome) or sys.executable


def defaultLauncher(pythonExecutable: Optional[str] = None, extraEnv: Optional[Dict[str, str]] = None,
                    module: str = "tcurlora.worker", script: Optional[str] = None,
                    pythonpath: Optional[Sequence[str]] = None) -> Callable:
    """A launcher: ``launcher(job: dict, workdir: str) -> tcurlora.jobs.WorkerJob`` (not started).

    The Logic classes take such a factory so tests can run a stand-in worker (``script=``) or a different
    interpreter.
    """
    from tcurlora.jobs import WorkerJob

    def launch(job, workdir):
        paths = list(pythonpath) if pythonpath is not None else [engineRoot()]
        return WorkerJob(job, workdir=workdir, python_executable=pythonExecutable or workerPythonExecutable(),
                         module=module, script=script, pythonpath=paths, extra_env=extraEnv)

    return launch


class ModelDiscovery:
    """The base models already on this computer (``tcurlora models --discover --json``), searched once in a
    separate process on a background thread, so Slicer itself never imports torch.

    Call it for the model entries found (``[]`` until the search has ended: :attr:`done`); the search starts
    at the first call. ``roots`` (``{kind: [folder]}``) replaces the default places (tests)."""

    def __init__(self, pythonExecutable: Optional[str] = None, pythonpath: Optional[Sequence[str]] = None,
                 roots: Optional[Dict[str, Sequence[str]]] = None, timeoutSeconds: float = 300.0) -> None:
        self.pythonExecutable = pythonExecutable
        self.pythonpath = pythonpath
        self.roots = roots
        self.timeoutSeconds = timeoutSeconds
        self.entries: List[dict] = []
        self.error = ""
        self._thread = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def commandLine(self) -> List[str]:
        command = [self.pythonExecutable or workerPythonExecutable(), "-m", "tcurlora.cli", "models", "--discover",
                   "--json"]
        for kind, folders in (self.roots or {}).items():
            command += [arg for folder in folders for arg in ("--root", f"{kind}={folder}")]
        return command

    def _search(self) -> None:
        import json
        import logging
        import subprocess

        from .models import discoveredEntries

        env = dict(os.environ)
        paths = list(self.pythonpath) if self.pythonpath is not None else [engineRoot()]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        try:
            done = subprocess.run(self.commandLine(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=self.timeoutSeconds, check=False)
            if done.returncode != 0:
                lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"exit status {done.returncode}")
            self.entries = discoveredEntries(json.loads(done.stdout.decode("utf-8")))
        except Exception as exc:  # no torch yet, a broken model folder...: the catalog still works
            self.error = str(exc)
            logging.warning(f"TCURLoRA: looking for models on this computer failed: {exc}")
        finally:
            self._done = True

    def __call__(self) -> List[dict]:
        if self._thread is None:
            import threading

            self._thread = threading.Thread(target=self._search, daemon=True)
            self._thread.start()
        return self.entries if self._done else []

    def retryIfFailed(self) -> None:
        """Search again at the next call if the last search failed (e.g. torch was installed since)."""
        if self._done and self.error:
            self._thread, self._done, self.error = None, False, ""

    def wait(self, timeoutSeconds: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeoutSeconds)
        return self._done
