"""Draws docs/architecture.png, the picture of docs/architecture.md: the layers (left) and one fine-tuning run
from TCUR Finetune through the worker process and back (right).

    python docs/architecture_figure.py        # needs matplotlib
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "architecture.png"

SLICER, STDLIB, ENGINE, LIBS = "#dbe9f6", "#fff2cc", "#e2f0d9", "#eeeeee"


def box(ax, x, y, w, h, title, text="", color="#ffffff", size=9.5):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.25,rounding_size=0.8", linewidth=1.0,
                                edgecolor="#555555", facecolor=color))
    if text:
        ax.text(x + 0.8, y + h - 0.9, title, ha="left", va="top", fontsize=size + 0.5, weight="bold")
        ax.text(x + 0.8, y + h - 3.3, text, ha="left", va="top", fontsize=size, linespacing=1.35)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=size, weight="bold")


def arrow(ax, start, end, text="", color="#333333", offset=(0.6, 0.0), style="-|>", ha="left"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13, linewidth=1.3, color=color))
    if text:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, text, ha=ha, va="center", fontsize=8.5, color=color, style="italic")


def layers(ax):
    ax.text(0, 98, "Layers: a box imports only what its arrows reach", fontsize=13, weight="bold", va="top")
    sx, sw, ex, ew = 0, 24, 28, 30  # the Slicer column and the engine column
    box(ax, sx, 80, sw, 12, "TCURSegment/  TCURFinetune/",
        "the module scripts: metadata,\nparameter node (ranges from\nprotocol), widget wiring,\nonReload, self-test entry",
        SLICER)
    box(ax, sx, 50, sw, 26, "TCURLoRALib/",
        "logic: EngineLogic,\n   SegmentLogic, LibraryLogic\nfinetune: FinetuneLogic\ntasks: WorkerTask, TaskRunner\n"
        "nodeio: node <-> file / array\ncaselibrary · plots · models\nselftests (the scenarios)\n"
        "slicerapp (the only Qt)", SLICER)
    box(ax, sx, 33, sw - 6, 13, "the Slicer application",
        "MRML (slicer, vtk),\nQt; in headless\ntests the slicer-core\nwheel's MRML", LIBS)
    box(ax, ex, 80, ew, 12, "entry points",
        "worker: PythonSlicer -m tcurlora.worker JOB.json\ncli: tcurlora finetune | segment | ...\n"
        "demo · federated/ (Flower) · distributed (torchrun)\nadapter: the Python API", ENGINE)
    box(ax, ex, 64, ew, 12, "pipelines",
        "train/  finetune(): options, setup, checkpoint,\n   loss, loop, curve\n"
        "infer  segment(): read, predict, restore, write", ENGINE)
    box(ax, ex, 40.8, ew, 19.2, "building blocks",
        "models/  the bases: deepbet, nnunet, auto3dseg,\n   bundle, discover\n"
        "io/  images, segmentations (.seg.nrrd), cases\npreprocess · metrics\n"
        "tuners/  tensor, fourier, layers, stacks,\n   strategies, baselines, model\nadapter_file · aggregate", ENGINE)
    box(ax, ex + 5, 33, ew - 5, 6, "torch · MONAI · nnU-Net · PEFT · Flower · SimpleITK", color=LIBS, size=8.2)
    box(ax, sx, 15, ex + ew - sx, 13, "the standard-library band  (imported by both sides: no torch, no Qt)",
        "protocol: job keys, defaults, ranges, events, exit codes (the one definition)\n"
        "errors · atomic (every write: temporary name, then rename) · manifest (adapter header)\n"
        "jobs: WorkerJob (start, stream events, stop file, kill) · labels · catalog · fetch", STDLIB)
    for x, w, pairs in ((sx, sw, ((80, 76),)), (ex, ew, ((80, 76), (64, 60)))):
        for top, bottom in pairs:
            arrow(ax, (x + w / 2, top - 0.3), (x + w / 2, bottom + 0.3))
    arrow(ax, ((sx + sw - 6) / 2, 49.7), ((sx + sw - 6) / 2, 46.3))
    arrow(ax, (sx + sw - 3, 49.7), (sx + sw - 3, 28.3))
    arrow(ax, (ex + 3, 40.5), (ex + 3, 28.3))
    arrow(ax, (ex + ew / 2 + 3, 40.5), (ex + ew / 2 + 3, 39.3))
    ax.plot([26, 26], [31, 95], ls="--", color="#aa0000", lw=1.2)
    ax.text(26, 63, "process boundary: JOB.json in, JSON-lines events out", ha="center", va="center", fontsize=8.5,
            color="#aa0000", rotation=90, bbox=dict(facecolor="white", edgecolor="none", pad=1.5))
    ax.text(0, 12.5, "blue: runs inside Slicer   green: the engine (worker process, terminal, Python)   "
                     "yellow: shared, standard library only", fontsize=8.5, va="top", color="#444444")


def flow(ax):
    ax.text(61, 98, "One fine-tuning run from TCUR Finetune", fontsize=13, weight="bold", va="top")
    left, right, w, mid = 61, 83, 17, 80
    ax.text(left + w / 2, 92.5, "Slicer process", ha="center", fontsize=10.5, weight="bold", color="#1f4e79")
    ax.text(right + w / 2, 92.5, "worker process", ha="center", fontsize=10.5, weight="bold", color="#385723")
    ax.plot([mid, mid], [31, 91.5], ls="--", color="#aa0000", lw=1.2)
    steps_left = [
        (79, 11, "1  Start (main thread)", "FinetuneLogic: parameters\n-> FinetuneTask; arrays\ntaken from the nodes"),
        (62, 13, "2  Export (background)", "training_000_image.nrrd\ntraining_000_label\n   .seg.nrrd; job dict\nchecked by "
                                            "validate_job"),
        (46, 12, "4  Poll (timer, main)", "progress -> chart, bar\nlog, warning -> log\nCancel: STOP file, kill:\n"
                                          "gone within 2 s"),
        (32, 11, "6  Import (background)", "atomic_copy into the\nadapter store, then\nlastAdapterPath"),
    ]
    steps_right = [
        (62, 13, "3  the worker", "PythonSlicer -m\ntcurlora.worker JOB.json:\nreads, checks,\nloads the base"),
        (46, 12, "train.finetune()", "cases -> tuner -> loop;\nevents on stdout;\ncheckpoint every 2 min"),
        (32, 11, "5  adapter.safetensors", "cores + manifest;\nresult event; exit 0\n(2 error, 3 cancelled)"),
    ]
    for y, h, title, text in steps_left:
        box(ax, left, y, w, h, title, text, SLICER, size=8.8)
    for y, h, title, text in steps_right:
        box(ax, right, y, w, h, title, text, ENGINE, size=8.8)
    arrow(ax, (left + w / 2, 78.7), (left + w / 2, 75.3))
    arrow(ax, (left + w + 0.3, 68.5), (right - 0.3, 68.5))
    ax.text(mid, 70.3, "job folder", ha="center", fontsize=8.5, style="italic",
            bbox=dict(facecolor="white", edgecolor="none", pad=1))
    arrow(ax, (right + w / 2, 61.7), (right + w / 2, 58.3))
    arrow(ax, (right - 0.3, 52), (left + w + 0.3, 52))
    ax.text(mid, 53.8, "events", ha="center", fontsize=8.5, style="italic",
            bbox=dict(facecolor="white", edgecolor="none", pad=1))
    arrow(ax, (right + w / 2, 45.7), (right + w / 2, 43.3))
    arrow(ax, (right - 0.3, 37.5), (left + w + 0.3, 37.5))
    ax.text(mid, 39.3, "result", ha="center", fontsize=8.5, style="italic",
            bbox=dict(facecolor="white", edgecolor="none", pad=1))
    ax.text(left, 28, "TCUR Segment runs the same way: input.nrrd -> infer.segment()\n"
                      "-> segmentation.seg.nrrd, read on a background thread and put\n"
                      "into a segmentation node on the main thread; 3D surfaces are\n"
                      "built in the background. The CLI runs the same finetune() and\n"
                      "segment() in its own process; the Python API calls the tuner.",
            fontsize=8.8, va="top", linespacing=1.35)


def main() -> None:
    fig, ax = plt.subplots(figsize=(17, 9.6), dpi=110)
    ax.set_xlim(-1, 101)
    ax.set_ylim(9, 100)
    ax.axis("off")
    layers(ax)
    flow(ax)
    fig.savefig(OUT, bbox_inches="tight", facecolor="white")
    print(OUT)


if __name__ == "__main__":
    main()
