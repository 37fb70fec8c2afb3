"""The background worker Slicer starts: ``PythonSlicer -m tcurlora.worker JOB.json``.

It runs the same code as ``tcurlora finetune`` / ``segment`` / ``export`` and prints one JSON event per line
on standard output. The job keys, their defaults and checks, the event names and the exit statuses
(0 done, 2 error with an ``error`` event saying why, 3 cancelled) are defined in :mod:`tcurlora.protocol`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import protocol
from .errors import TCURLoRAError
from .events import Events
from .safejson import read_json


def read_job(path) -> dict:
    """Read and check a job file (types, ranges, unknown keys); returns it completed with the defaults."""
    path = Path(path)
    job = read_json(path, "job file", strict=False)  # non-finite numbers: the settings' checks name them
    return protocol.validate_job(job, where=path.name)


def _base(job: dict, events: Events):
    from .fetch import download_progress
    from .models import load_base

    with download_progress(events.download):  # a catalog model is fetched on first use: show its bytes
        return load_base(job["base"], weights=job.get("weights"), fold=job.get("fold"))


def _finish(result, events: Events) -> int:
    events.result(result.outputs, result.metrics_dict(), result.cancelled)
    return protocol.EXIT_CANCELLED if result.cancelled else protocol.EXIT_OK


def run_finetune(job: dict, events: Events) -> int:
    """Run a ``finetune`` job that :func:`tcurlora.protocol.validate_job` checked (the CLI, :func:`read_job`)."""
    from .train import FinetuneOptions, finetune

    base = _base(job, events)
    options = FinetuneOptions.from_job(job)
    result = finetune(base, [(c["image"], c["label"]) for c in job["cases"]], job["out"],
                      val_pairs=[(c["image"], c["label"]) for c in job["validation"]], labels=job["labels"],
                      options=options, events=events, stop_file=job["stop_file"], resume=job["resume"],
                      start_from=job["start_from"])
    return _finish(result, events)


def run_segment(job: dict, events: Events) -> int:
    """Run a ``segment`` job that :func:`tcurlora.protocol.validate_job` checked (the CLI, :func:`read_job`)."""
    from .infer import segment

    base = _base(job, events)
    result = segment(base, job["inputs"], job["output"], adapter=job["adapter"], device=job["device"],
                     tta=job["tta"], largest_component=job["largest_component"], probabilities=job["probabilities"],
                     sw_batch_size=job["sw_batch_size"], overlap=job["overlap"], events=events,
                     stop_file=job["stop_file"])
    return _finish(result, events)


def run_export(job: dict, events: Events) -> int:
    from .export import export_model

    job = protocol.validate_job(job)
    if not job["adapter"]:
        raise protocol.SettingError("adapter", "is required (the adapter to merge into the base)")
    result = export_model(job["base"], job["adapter"], job["output"], job["format"], weights=job.get("weights"),
                          fold=job.get("fold"), events=events)
    return _finish(result, events)


RUNNERS = {"finetune": run_finetune, "segment": run_segment, "export": run_export}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    events = Events(sys.stdout, None)
    if len(argv) != 1:
        events.error("usage: python -m tcurlora.worker JOB.json")
        return protocol.EXIT_ERROR
    try:
        job = read_job(argv[0])
        return RUNNERS[job["command"]](job, events)
    except TCURLoRAError as exc:
        events.error(str(exc))
        return protocol.EXIT_ERROR
    except Exception as exc:  # the GUI must always get an error event, never a silent death
        import traceback

        events.error(f"internal error: {type(exc).__name__}: {exc}")
        events.log(traceback.format_exc())
        return protocol.EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
