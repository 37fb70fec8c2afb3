"""The recorded runs of ``benchmarks/new_structure.py`` and what is written from them: how a run is named and
keyed, the tables of ``docs/benchmarks-results/new_structure.md`` and their plot, the ablation and the head-start
table of ``docs/new_structure.md``.

    python benchmarks/new_structure.py --report     # (or this file) rewrite them from the runs recorded so far
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quality import latest_weights  # noqa: E402  (benchmarks/ is on sys.path as a script)

RUNS_FILE = "new_structure_runs.jsonl"
#: task -> (its label table, its two images in table order)
TASK_LABELS = {"lesion": [{"value": 1, "name": "lesion"}], "ventricles": [{"value": 1, "name": "lateral ventricles"}]}
TASK_IMAGES = {"lesion": ("brain1", "brain2"), "ventricles": ("cat12", "mni152")}


def task_of(row: dict) -> str:
    return row.get("task", "lesion")  # the first runs were all the lesion task


def rates_of(row: dict) -> str:
    return row.get("rates", "default")


#: where a new label's head channel starts (finetune's ``head_start``, asked for explicitly: its ``auto`` differs
#: by method); runs record it, so runs of each start stay apart in the tables; "low prior" is the paper's row
HEAD_STARTS = ("prototype", "low prior")
ENGINE_HEAD_START = {"prototype": "prototype", "low prior": "low-prior"}


def head_start_of(row: dict) -> str:
    return row.get("head_start", "low prior")  # the start before prototypes


#: how training pads a patch beyond the image's edge: with zeros, as every inferer pads a window (runs before
#: that replicated the border: on the nnU-Net base, whose 3 mm images are smaller than its patch, the network
#: trained on a border it never saw at inference)
PATCH_PAD = "zero"
#: bases whose patches the padding reaches: deepbet's model space is its input size, so its patches are never
#: padded and its runs are the same under either rule
PADDED_BASES = ("nnunet",)


def patch_pad_of(row: dict) -> str:
    return row.get("patch_pad", "replicate") if row["base"] in PADDED_BASES else PATCH_PAD


def basis_of(row: dict) -> str:
    return row.get("basis", "cur")


#: tCURLoRA's adapter options beyond the basis (TCURLoRAConfig fields; FinetuneOptions takes them): a run
#: records those it sets, and each differs from its default by a phrase in the row's name
CORE_OPTIONS = {"rank_stable": (False, lambda v: "rank-stable scale"),
                "norm_scale_shift": (False, lambda v: "norm scale-shift"),
                "selection": ("deterministic", lambda v: f"{v} selection"),
                "rank_budget": (None, lambda v: f"rank budget {v:,d}")}


def options_of(row: dict) -> tuple:
    """The run's tCURLoRA options (basis included) as a key: a run recorded before an option existed had its
    default."""
    given = row.get("options", {})
    return (basis_of(row),) + tuple(given.get(k, default) for k, (default, _) in CORE_OPTIONS.items())


def method_of(row: dict) -> str:
    """The row's method as the tables name it, with the head start when it is not the first one and each
    tCURLoRA option that is not its default (the core basis first)."""
    start, basis = head_start_of(row), basis_of(row)
    given = row.get("options", {})
    extra = [name(given[k]) for k, (default, name) in CORE_OPTIONS.items() if given.get(k, default) != default]
    return (row["method"] + ("" if start == "low prior" else f", {start} head")
            + ("" if basis == "cur" else f", {basis} basis") + "".join(f", {e}" for e in extra)
            + ("" if patch_pad_of(row) == PATCH_PAD else f", {patch_pad_of(row)}-padded patches"))


RATES = {"default": "the package's default learning rates",
         "comparison": "each method at the rate benchmarks/comparison.py chose for it on deepbet's brain-mask task"}


def rates_text(rates: str) -> str:
    name, _, scale = rates.partition("×")
    return RATES[name] + (f", times {scale}" if scale else "")


def _mean_sd(values: list) -> str:
    finite = [v for v in values if v == v and v != float("inf")]
    if not finite:
        return f"– ({len(values)} empty)"
    sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
    missing = len(values) - len(finite)
    return f"{statistics.mean(finite):.2f} ± {sd:.2f}" + (f" ({missing} empty)" if missing else "")


def setting(row: dict) -> tuple:
    return task_of(row), rates_of(row), row["base"], row["steps"], row["batch"], row["resolution"]


def settings(rows: list) -> list:
    """(task, rates, base, steps, batch, resolution) blocks in the order first seen."""
    return list(dict.fromkeys(setting(r) for r in rows))


def table(rows: list) -> str:
    lines = []
    for key in settings(rows):
        task, rates, base, steps, batch, res = key
        block = [r for r in rows if setting(r) == key]
        seeds = sorted({r["seed"] for r in block})
        tests = TASK_IMAGES[task][::-1]
        lines += [f"**{task}, {base}, {rates} rates** ({'model input ' + str(res) + '³' if base == 'deepbet' else 'nnU-Net patch, largest side ' + str(res)}, "
                  f"{steps} steps, batch {batch}, seeds {', '.join(map(str, seeds))}; runs = directions × seeds; "
                  f"{rates_text(rates)})", "",
                  f"| method | lr | runs | Dice mean ± sd | Dice, test {tests[0]} | Dice, test {tests[1]} | "
                  "HD95 mm mean ± sd | fit: Dice on the training case | trainable values | adapter file | "
                  "train time (median) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method in dict.fromkeys(method_of(r) for r in block):
            sub = [r for r in block if method_of(r) == method]
            dice = [r["dice"] for r in sub]
            per = {}
            for test in tests:
                d = [r["dice"] for r in sub if r["test"] == test]
                per[test] = (f"{statistics.mean(d):.3f} ± {statistics.stdev(d) if len(d) > 1 else 0.0:.3f}"
                             if d else "–")
            sd = statistics.stdev(dice) if len(dice) > 1 else 0.0
            lines.append(f"| {method} | {sub[0]['lr']:.0e} | {len(sub)} | {statistics.mean(dice):.3f} ± {sd:.3f} | {per[tests[0]]} | "
                         f"{per[tests[1]]} | {_mean_sd([r['hd95_mm'] for r in sub])} | "
                         f"{statistics.mean(r['dice_train_case'] for r in sub):.3f} | {sub[0]['trainable']:,d} | "
                         f"{sub[0]['adapter_bytes'] / 1024:,.1f} KB | "
                         f"{statistics.median(r['train_s'] for r in sub):.0f} s |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = settings(rows)
    cols = min(2, len(blocks))
    rows_n = (len(blocks) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(7 * cols, 4.6 * rows_n), dpi=100, squeeze=False)
    for ax in axes.flat[len(blocks):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, blocks):
        block = [r for r in rows if setting(r) == key]
        tests = TASK_IMAGES[key[0]][::-1]
        names = list(dict.fromkeys(method_of(r) for r in block))
        for k, name in enumerate(names):
            pts = [r for r in block if method_of(r) == name]
            for test, colour, dx in ((tests[0], "tab:blue", -0.12), (tests[1], "tab:orange", 0.12)):
                v = [r["dice"] for r in pts if r["test"] == test]
                ax.scatter(np.full(len(v), k) + dx, v, s=14, color=colour, zorder=3,
                           label=f"test {test}" if k == 0 else None)
            ax.hlines(np.mean([r["dice"] for r in pts]), k - 0.3, k + 0.3, color="black", lw=1.5, zorder=4)
            fit = [r["dice_train_case"] for r in pts]
            ax.scatter(np.full(len(fit), k + 0.3), fit, s=16, marker="x", color="grey", zorder=3,
                       label="fit: the training case" if k == 0 else None)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(-0.02, 1.0)
        ax.set_ylabel(f"{TASK_LABELS[key[0]][0]['name']} Dice, held-out case (points: runs; bar: mean)")
        ax.set_title(f"{key[0]} on {key[2]}, {key[3]} steps, {key[1]} rates: a new head", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


TABLE_START = "<!-- tables: written by benchmarks/new_structure.py from new_structure_runs.jsonl -->"
TABLE_END = "<!-- end of tables -->"


def write_summary(path: Path, tables: str, start: str = TABLE_START, end: str = TABLE_END) -> None:
    """Put the tables between the markers of ``path`` (the prose around them is kept), or start the file."""
    text = path.read_text() if path.is_file() else f"{start}\n{end}\n"
    head, sep, rest = text.partition(start)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise SystemExit(f"{path}: the table markers are missing")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{head}{start}\n\n{tables}\n{end}{tail}")
    tmp.replace(path)


# --- the ablation of docs/new_structure.md: each step adds one option to the row before -----------------------

ABLATION_START = "<!-- ablation: written by benchmarks/new_structure.py from new_structure_runs.jsonl -->"
ABLATION_END = "<!-- end of ablation -->"
#: (the step, head start, tCURLoRA options of new_structure.py's runs) in the order the steps add up; the budget
#: is each base's (the new-label recipe's: a tenth of LoRA r = 8's values, the head and norms included)
ABLATION = [
    ("tCURLoRA r=8 (the paper's)", "low prior", {}),
    ("+ prototype head start", "prototype", {}),
    ("+ orthonormal basis", "prototype", {"basis": "orthonormal"}),
    ("+ rank-stable scale, + norm scale-shift", "prototype",
     {"basis": "orthonormal", "rank_stable": True, "norm_scale_shift": True}),
    ("+ gradient-aligned selection", "prototype",
     {"basis": "orthonormal", "rank_stable": True, "norm_scale_shift": True, "selection": "gradient"}),
    ("+ rank budget (all of the above)", "prototype", {"basis": "orthonormal", "rank_stable": True,
                                                        "norm_scale_shift": True, "selection": "gradient",
                                                        "rank_budget": "budget"}),
    ("rank budget without gradient selection: finetune's new-label recipe", "prototype",
     {"basis": "orthonormal", "rank_stable": True, "norm_scale_shift": True, "rank_budget": "budget"}),
]
ABLATION_BUDGET = {"deepbet": 19_500, "nnunet": 14_300}
#: the issue's goal on the ventricles: LoRA r = 8's held-out Dice at its chosen rate, measured before training
#: padded patches with zeros, and a tenth of its values, per base
ABLATION_GOAL = {"deepbet": (0.682, 20_200), "nnunet": (0.606, 14_800)}
#: the reference rows under each ablation table: LoRA r = 8 from either head start
ABLATION_REFERENCE = [("LoRA r=8 (reference)", "LoRA (PEFT) r=8", "low prior"),
                      ("LoRA r=8, prototype head start", "LoRA (PEFT) r=8", "prototype")]


def _ablation_line(name: str, sub: list, tests: list) -> str:
    if not sub:
        return f"| {name} | 0 | not measured | | | | | |"
    dice = [r["dice"] for r in sub]
    per = [statistics.mean(r["dice"] for r in sub if r["test"] == t) if any(r["test"] == t for r in sub)
           else float("nan") for t in tests]
    sd = statistics.stdev(dice) if len(dice) > 1 else 0.0
    return (f"| {name} | {len(sub)} | {statistics.mean(dice):.3f} ± {sd:.3f} | {per[0]:.3f} | {per[1]:.3f} | "
            f"{statistics.mean(r['dice_train_case'] for r in sub):.3f} | {sub[0]['trainable']:,d} | "
            f"{statistics.median(r['train_s'] for r in sub):.0f} s |")


def ablation_tables(rows: list, rates: str = "comparison") -> str:
    """Per task and base, one line per ablation step: Dice (mean ± sd over directions × seeds, and per test
    image), fit, trainable values and median train time, from the recorded runs of tCURLoRA r=8 (patches padded
    as now), then LoRA r = 8 from both head starts."""
    lines = []
    for task in ("ventricles", "lesion"):
        for base, budget in ABLATION_BUDGET.items():
            block = [r for r in rows if task_of(r) == task and rates_of(r) == rates and r["base"] == base
                     and patch_pad_of(r) == PATCH_PAD]
            if not any(r["method"] == "tCURLoRA r=8" for r in block):
                continue
            tests = TASK_IMAGES[task][::-1]
            goal, values = ABLATION_GOAL[base]
            aim = (f"goal: held-out Dice {goal:.3f} (LoRA r = 8 as the issue measured it) with at most {values:,d} "
                   "values" if task == "ventricles" else "no goal set: the reference is LoRA r = 8")
            lines += [f"**{task}, {base}** ({rates} rates, 60 steps; {aim}; runs = directions × seeds)", "",
                      f"| step | runs | Dice mean ± sd | test {tests[0]} | test {tests[1]} | fit | trainable values | "
                      "train time (median) |", "|---|---|---|---|---|---|---|---|"]
            for name, start, options in ABLATION:
                options = {k: (budget if v == "budget" else v) for k, v in options.items()}
                key = options_of({"basis": options.get("basis", "cur"),
                                  "options": {k: v for k, v in options.items() if k != "basis"}})
                lines.append(_ablation_line(name, [r for r in block if r["method"] == "tCURLoRA r=8" and
                                                   head_start_of(r) == start and options_of(r) == key], tests))
            for name, method, start in ABLATION_REFERENCE:
                lines.append(_ablation_line(name, [r for r in block if r["method"] == method
                                                   and head_start_of(r) == start], tests))
            lines.append("")
    return "\n".join(lines)


# --- the head-start table of docs/new_structure.md: every method from either start ----------------------------

HEAD_START_TABLE_START = "<!-- head starts: written by benchmarks/new_structure.py from new_structure_runs.jsonl -->"
HEAD_START_TABLE_END = "<!-- end of head starts -->"
#: the methods in the table's order, as runs name them (each with its own default options)
HEAD_START_METHODS = ("tCURLoRA r=8", "CURLoRA r=8", "LoRA (PEFT) r=8", "PiSSA (PEFT) r=8", "DoRA (PEFT) r=8",
                      "LoRA-PT (t-SVD) r=8", "decoder-only", "full fine-tuning")


def _start_cell(sub: list, field: str) -> str:
    if not sub:
        return "not measured"
    values = [r[field] for r in sub]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({len(sub)})"


def head_start_tables(rows: list, rates: str = "comparison") -> str:
    """Per task and base, each method's held-out Dice and fit (mean ± sd (runs)) from the low-prior and the
    prototype start, with the change of the mean Dice; the methods' own options (tCURLoRA: the paper's)."""
    default = options_of({})
    lines = []
    for task in ("ventricles", "lesion"):
        for base in ("deepbet", "nnunet"):
            block = [r for r in rows if task_of(r) == task and rates_of(r) == rates and r["base"] == base
                     and patch_pad_of(r) == PATCH_PAD and options_of(r) == default]
            if not block:
                continue
            lines += [f"**{task}, {base}** ({rates} rates, 60 steps; mean ± sd (runs) over directions × seeds)", "",
                      "| method | Dice, low prior | Dice, prototype | change | fit, low prior | fit, prototype |",
                      "|---|---|---|---|---|---|"]
            for method in HEAD_START_METHODS:
                low, proto = ([r for r in block if r["method"] == method and head_start_of(r) == start]
                              for start in HEAD_STARTS[::-1])
                change = (f"{statistics.mean(r['dice'] for r in proto) - statistics.mean(r['dice'] for r in low):+.3f}"
                          if low and proto else "–")
                lines.append(f"| {method} | {_start_cell(low, 'dice')} | {_start_cell(proto, 'dice')} | {change} | "
                             f"{_start_cell(low, 'dice_train_case')} | {_start_cell(proto, 'dice_train_case')} |")
            lines.append("")
    return "\n".join(lines)


def write_report(out: Path) -> str:
    """Rewrite the tables, the plot, the ablation and the head-start tables from the runs recorded in ``out``;
    returns the tables."""
    rows = latest_weights([json.loads(l) for l in (out / RUNS_FILE).read_text().splitlines()])
    text = table(rows)
    write_summary(out / "new_structure.md", text)
    doc = HERE.parent / "docs" / "new_structure.md"
    write_summary(doc, ablation_tables(rows), ABLATION_START, ABLATION_END)
    write_summary(doc, head_start_tables(rows), HEAD_START_TABLE_START, HEAD_START_TABLE_END)
    plot(rows, out / "new_structure.png")
    return text


if __name__ == "__main__":
    print(write_report(HERE.parent / "docs" / "benchmarks-results"))
