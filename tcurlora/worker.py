"""The background worker Slicer starts: ``PythonSlicer -m tcurlora.worker JOB.json``.

It runs the same code as ``tcurlora finetune`` / ``tcurlora segment`` and prints one JSON event per line
on standard output.  Exit status: 0 done, 2 error (an ``error`` event says why), 3 cancelled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import TCURLoRAError
from .events import Events

JOB_VERSION = 1
FINETUNE_KEYS = {"method", "rank", "preset", "train_modules", "steps", "lr", "batch_size", "patch_size", "val_every",
                 "patience", "grad_accum", "checkpointing", "bf16", "seed"}
COMMON_KEYS = {"version", "command", "base", "weights", "device", "stop_file", "events"}
ALLOWED = {
    "finetune": COMMON_KEYS | FINETUNE_KEYS | {"cases", "validation", "labels", "out", "resume"},
    "segment": COMMON_KEYS | {"inputs", "output", "adapter", "tta", "largest_component", "probabilities",
                              "sw_batch_size", "overlap"},
}


def read_job(path) -> dict:
    """Read and check a job file; unknown keys are an error (a typo must not silently use a default)."""
    path = Path(path)
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TCURLoRAError(f"{path.name}: job file not found") from None
    except (OSError, ValueError) as exc:
        raise TCURLoRAError(f"{path.name}: not a valid JSON job file ({exc})") from None
    if not isinstance(job, dict) or job.get("command") not in ALLOWED:
        raise TCURLoRAError(f"{path.name}: job needs \"command\": \"finetune\" or \"segment\"")
    if int(job.get("version", JOB_VERSION)) > JOB_VERSION:
        raise TCURLoRAError(f"{path.name}: job version {job['version']} is newer than this tcurlora; upgrade it")
    unknown = set(job) - ALLOWED[job["command"]]
    if unknown:
        raise TCURLoRAError(f"{path.name}: unknown job keys: {', '.join(sorted(unknown))}")
    return job


def _base(job: dict):
    from .models import load_base

    return load_base(job.get("base") or "deepbet", weights=job.get("weights"))


def _finish(result: dict, events: Events) -> int:
    events.result(result["outputs"], result.get("metrics"), result.get("cancelled", False))
    return 3 if result.get("cancelled") else 0


def run_finetune(job: dict, events: Events) -> int:
    from .train import FinetuneOptions, finetune

    if not job.get("out"):
        raise TCURLoRAError("the job has no \"out\" adapter path")
    defaults = FinetuneOptions()
    fields = {k: job[k] for k in FINETUNE_KEYS if job.get(k) is not None}
    if "patch_size" in fields:
        fields["patch_size"] = tuple(int(v) for v in fields["patch_size"])
    options = FinetuneOptions(**{**defaults.to_dict(), **fields, "device": job.get("device") or "auto"})
    pairs = [(c["image"], c["label"]) for c in job.get("cases") or []]
    val = [(c["image"], c["label"]) for c in job.get("validation") or []]
    if not pairs:
        raise TCURLoRAError("no training cases given (use --image/--label, --cases FOLDER or a job file)")
    base = _base(job)
    result = finetune(base, pairs, job["out"], val_pairs=val, labels=job.get("labels"), options=options,
                      events=events, stop_file=job.get("stop_file"), resume=bool(job.get("resume")))
    return _finish(result, events)


def run_segment(job: dict, events: Events) -> int:
    from .infer import segment

    inputs = job.get("inputs") or []
    if not inputs or not job.get("output"):
        raise TCURLoRAError("a segment job needs \"inputs\" and \"output\"")
    base = _base(job)
    result = segment(base, inputs, job["output"], adapter=job.get("adapter"), device=job.get("device") or "auto",
                     tta=bool(job.get("tta")), largest_component=job.get("largest_component"),
                     probabilities=bool(job.get("probabilities")), sw_batch_size=int(job.get("sw_batch_size") or 1),
                     overlap=float(job["overlap"]) if job.get("overlap") is not None else None, events=events,
                     stop_file=job.get("stop_file"))
    return _finish(result, events)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    events = Events(sys.stdout, None)
    if len(argv) != 1:
        events.error("usage: python -m tcurlora.worker JOB.json")
        return 2
    try:
        job = read_job(argv[0])
        if job["command"] == "finetune":
            return run_finetune(job, events)
        return run_segment(job, events)
    except TCURLoRAError as exc:
        events.error(str(exc))
        return 2
    except Exception as exc:  # the GUI must always get an error event, never a silent death
        import traceback

        events.error(f"internal error: {type(exc).__name__}: {exc}")
        events.log(traceback.format_exc())
        return 2


if __name__ == "__main__":
    sys.exit(main())
