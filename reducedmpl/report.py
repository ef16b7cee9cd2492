"""Tables and plots of a finished pipeline run (``reducedmpl report RUN_DIR``; ``run`` writes it at its end).

The comparison (:func:`aggregate`) is mean ± sample standard deviation over seeds of each compare run's
``result.json``, plus the per-seed paired difference to a baseline run (``kd`` by default). The plots are
PNG files (matplotlib, Agg) under ``RUN_DIR/report/``; a plot whose data is absent is skipped with a note.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from .engine.runs import read_jsonl
from .errors import UserError
from .run_index import read_index

PROBE_POINTS = ("0.0", "0.25", "0.5", "0.75", "1.0")
N_PROBES_SHOWN = 4


# ---------------------------------------------------------------------------------------------- comparison
def collect_results(run_dir: str | Path) -> list[dict]:
    """One row per finished distill stage of the run's index: run, mode, seed, val/test accuracy, folder."""
    run_dir = Path(run_dir)
    rows = []
    for entry in read_index(run_dir)["stages"]:
        result_path = run_dir / entry["folder"] / "result.json"
        if entry["stage"] != "distill" or not result_path.exists():
            continue
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {result_path} ({e.__class__.__name__})",
                            "run the pipeline again (with --force for that stage) to rewrite it") from None
        if not isinstance(result, dict):
            raise UserError(f"{result_path} is not a result written by distill",
                            "run the pipeline again (with --force for that stage) to rewrite it")
        rows.append({"run": entry["run"], "mode": entry["mode"], "seed": entry["seed"],
                     "test_acc": result.get("test_acc"), "val_acc": result.get("val_acc"),
                     "folder": run_dir / entry["folder"]})
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values, NaN mean for none)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


@dataclass
class RunSummary:
    """One compare run over its seeds (accuracies as fractions)."""

    run: str
    mode: str
    seeds: list[int] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    diff: list[float] | None = None  # per-seed test_acc - baseline test_acc, seeds both have; None: no baseline

    @property
    def test_stats(self) -> tuple[float, float]:
        return mean_std(self.test)

    @property
    def val_stats(self) -> tuple[float, float]:
        return mean_std(self.val)

    @property
    def diff_stats(self) -> tuple[float, float]:
        return mean_std(self.diff or [])


def aggregate(results: list[dict], baseline: str | None = None) -> list[RunSummary]:
    """Group result rows by run (in first-seen order) and pair each run's seeds with the baseline's."""
    summaries: dict[str, RunSummary] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        s = summaries.setdefault(r["run"], RunSummary(r["run"], r["mode"]))
        s.seeds.append(r["seed"])
        s.test.append(r["test_acc"])
        s.val.append(r["val_acc"])
    order = list(dict.fromkeys(r["run"] for r in results))
    base = summaries.get(baseline) if baseline else None
    if base is not None:
        base_test = dict(zip(base.seeds, base.test))
        for s in summaries.values():
            if s is not base:
                s.diff = [t - base_test[seed] for seed, t in zip(s.seeds, s.test)
                          if seed in base_test and t is not None and base_test[seed] is not None]
    return [summaries[name] for name in order]


def _fmt(stats: tuple[float, float], signed: bool = False) -> str:
    mean, std = stats
    if math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return text if math.isnan(std) else f"{text} ± {100 * std:.2f}"


def _columns(baseline: str | None, summaries: list[RunSummary]) -> list[str]:
    cols = ["run", "mode", "seeds", "test acc %", "val acc %"]
    if any(s.diff is not None for s in summaries):
        cols.append(f"Δ test vs {baseline}")
    return cols


def _note(baseline: str | None, with_diff: bool) -> str:
    note = "accuracies in %, mean ± sample standard deviation over seeds"
    if with_diff:
        note += f"; Δ: test accuracy minus {baseline}'s with the same seed, in points, mean ± std"
    return note


def _cells(s: RunSummary, with_diff: bool) -> list[str]:
    cells = [s.run, s.mode, str(len(s.seeds)), _fmt(s.test_stats), _fmt(s.val_stats)]
    if with_diff:
        cells.append("—" if s.diff is None else _fmt(s.diff_stats, signed=True))
    return cells


def comparison_table(summaries: list[RunSummary], baseline: str | None = None) -> Table:
    cols = _columns(baseline, summaries)
    table = Table(title="comparison", title_justify="left", caption=_note(baseline, len(cols) > 5),
                  caption_justify="left")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < 2 else "right")
    for s in summaries:
        table.add_row(*_cells(s, len(cols) > 5))
    return table


def comparison_markdown(summaries: list[RunSummary], baseline: str | None = None) -> str:
    cols = _columns(baseline, summaries)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    lines += ["| " + " | ".join(_cells(s, len(cols) > 5)) + " |" for s in summaries]
    note = _note(baseline, len(cols) > 5)
    return "\n".join(lines) + f"\n\n{note[0].upper()}{note[1:]}.\n"


def write_comparison(run_dir: str | Path, summaries: list[RunSummary], baseline: str | None = None) -> None:
    """``comparison.md`` and ``comparison.csv`` (fractions, full precision) in ``run_dir``."""
    run_dir = Path(run_dir)
    (run_dir / "comparison.md").write_text(comparison_markdown(summaries, baseline))
    with open(run_dir / "comparison.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "mode", "n_seeds", "seeds", "test_acc_mean", "test_acc_std", "val_acc_mean",
                    "val_acc_std", "baseline", "diff_test_mean", "diff_test_std", "test_acc_per_seed"])
        for s in summaries:
            diff = s.diff_stats if s.diff is not None else ("", "")
            w.writerow([s.run, s.mode, len(s.seeds), " ".join(map(str, s.seeds)), *_csv(s.test_stats),
                        *_csv(s.val_stats), baseline or "", *_csv(diff), " ".join(f"{t:.6f}" for t in s.test)])


def _csv(stats: tuple[Any, Any]) -> list[str]:
    return ["" if isinstance(v, str) or math.isnan(v) else f"{v:.6f}" for v in stats]


# ---------------------------------------------------------------------------------------------- run data
@dataclass
class RunData:
    """What the plots need from one distill folder."""

    run: str
    mode: str
    seed: int
    folder: Path
    config: dict
    metrics: list[dict]  # step rows (the final summary row left out)

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in self.metrics if isinstance(r.get(key), (int, float)) and "step" in r]
        return np.array([r["step"] for r in rows], float), np.array([r[key] for r in rows], float)


def load_runs(results: list[dict]) -> list[RunData]:
    runs = []
    for r in results:
        folder = r["folder"]
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {folder / 'config.yaml'} ({e.__class__.__name__})",
                            "run the pipeline again (with --force for that stage) to rewrite it") from None
        metrics = [m for m in read_jsonl(folder / "metrics.jsonl") if not m.get("final")] \
            if (folder / "metrics.jsonl").exists() else []
        runs.append(RunData(r["run"], r["mode"], r["seed"], folder, config if isinstance(config, dict) else {}, metrics))
    return runs


def _by_run(runs: list[RunData]) -> dict[str, list[RunData]]:
    grouped: dict[str, list[RunData]] = {}
    for r in runs:
        grouped.setdefault(r.run, []).append(r)
    return grouped


def _mean_curves(grouped: dict[str, list[RunData]], key: str) -> dict:
    """:func:`_mean_curve` of each run name that logged ``key``."""
    curves = {name: _mean_curve(runs, key) for name, runs in grouped.items()}
    return {name: c for name, c in curves.items() if c is not None}


def _mean_curve(runs: list[RunData], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps, mean, min and max of ``key`` over seeds, on the steps every seed logged."""
    curves = [r.curve(key) for r in runs]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return None
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    if not len(steps):
        return None
    ys = np.stack([y[np.searchsorted(s, steps)] for s, y in curves])
    return steps, ys.mean(0), ys.min(0), ys.max(0)


def main_mpl_run(grouped: dict[str, list[RunData]]) -> str | None:
    """The reducedmpl run the analyses show: best mean val accuracy among those with mpl_weight > 0 (else any)."""
    mpl = {name: rs for name, rs in grouped.items() if rs[0].mode == "reducedmpl"}
    weighted = {n: rs for n, rs in mpl.items() if float(rs[0].config.get("mpl_weight", 1.0)) > 0} or mpl
    if not weighted:
        return None

    def val(name: str) -> float:
        v = [json.loads((r.folder / "result.json").read_text()).get("val_acc") or 0.0 for r in weighted[name]]
        return float(np.mean(v))

    return max(weighted, key=val)


# ---------------------------------------------------------------------------------------------- plots
def _figure(width: float = 7.0, height: float = 4.2, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout=layout)


def _colors(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def plot_accuracy(summaries: list[RunSummary], path: Path, teacher_test: float | None) -> str | None:
    if not summaries:
        return "no finished distill run: no accuracy plot"
    fig = _figure(max(5.0, 1.3 * len(summaries) + 2), 4.2)
    ax = fig.subplots()
    names = [s.run for s in summaries]
    colors = _colors(names)
    x = np.arange(len(summaries))
    means = np.array([100 * s.test_stats[0] for s in summaries])
    stds = np.array([0.0 if math.isnan(s.test_stats[1]) else 100 * s.test_stats[1] for s in summaries])
    ax.bar(x, means, yerr=stds, capsize=6, color=[colors[n] for n in names], alpha=0.75,
           error_kw={"elinewidth": 1.5}, label="mean ± std over seeds")
    for i, s in enumerate(summaries):
        ax.scatter(np.full(len(s.test), i), [100 * t for t in s.test], color="black", s=14, zorder=3,
                   label="one seed" if i == 0 else None)
        ax.annotate(f"{means[i]:.1f}", (i, means[i] + stds[i]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=9)
    if teacher_test is not None:
        ax.axhline(100 * teacher_test, color="gray", ls="--", lw=1, label=f"large teacher ({100 * teacher_test:.1f})")
    values = [100 * t for s in summaries for t in s.test] + ([100 * teacher_test] if teacher_test else [])
    low = max(0.0, min(values) - max(3.0, 0.3 * (max(values) - min(values))))
    ax.set_ylim(low, min(100.0, max(values) + 3.0))
    ax.set_xticks(x, [f"{s.run}\n({s.mode})" for s in summaries])
    ax.set_ylabel("test accuracy (%)")
    n_seeds = max(len(s.seeds) for s in summaries)
    ax.set_title(f"Student test accuracy per run ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return None


def plot_learning_curves(grouped: dict[str, list[RunData]], path: Path) -> str | None:
    curves = _mean_curves(grouped, "val_acc")
    if not curves:
        return "no validation accuracy logged: no learning curves"
    fig = _figure()
    ax = fig.subplots()
    colors = _colors(list(grouped))
    for name, (steps, mean, lo, hi) in curves.items():
        ax.plot(steps, 100 * mean, color=colors[name], lw=1.8, label=f"{name} ({grouped[name][0].mode})")
        if len(grouped[name]) > 1:
            ax.fill_between(steps, 100 * lo, 100 * hi, color=colors[name], alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    seeds = max(len(rs) for rs in grouped.values())
    band = ", band: min–max over seeds" if seeds > 1 else ""
    ax.set_title(f"Learning curves (mean over {seeds} seed{'s' if seeds > 1 else ''}{band})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return None


def smooth(y: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with a span of ``span`` points, bias-corrected at the start."""
    alpha = 2.0 / (span + 1.0)
    out, avg, weight = np.empty_like(y, dtype=float), 0.0, 0.0
    for i, v in enumerate(y):
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = avg / weight
    return out


def plot_mpl_signal(grouped: dict[str, list[RunData]], path: Path) -> str | None:
    mpl = {n: rs for n, rs in grouped.items() if rs[0].mode == "reducedmpl"}
    curves = _mean_curves(mpl, "h")
    if not curves:
        return "no reducedmpl run: no plot of the MPL signal h"
    fig = _figure()
    ax = fig.subplots()
    colors = _colors(list(grouped))
    for name, (steps, mean, _, _) in curves.items():
        span = max(3, len(steps) // 10)
        weight = mpl[name][0].config.get("mpl_weight")
        ax.plot(steps, mean, color=colors[name], alpha=0.2, lw=0.8)
        ax.plot(steps, smooth(mean, span), color=colors[name], lw=2,
                label=f"{name} (mpl_weight {weight}), EMA over {span} logs")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("h = L_old − L_new (labeled CE)")
    ax.set_title("MPL signal h: > 0 when the student's step on pseudo labels\nlowered its loss on labeled data")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return None


def plot_label_correction(grouped: dict[str, list[RunData]], main: str | None, path: Path) -> str | None:
    if main is None:
        return "no reducedmpl run: no 'not label correction' plot"
    lines = []
    sup = next((rs for rs in grouped.values() if rs[0].mode == "supervised"), None)
    if sup is not None:
        lines.append((f"supervised student ({sup[0].run})", _mean_curve(sup, "labeled_acc_student"), "tab:gray"))
    lines.append(("large teacher (stored targets)", _mean_curve(grouped[main], "labeled_acc_large"), "black"))
    lines.append((f"reduced teacher ({main})", _mean_curve(grouped[main], "labeled_acc_teacher"), "tab:orange"))
    lines.append((f"ReducedMPL student ({main})", _mean_curve(grouped[main], "labeled_acc_student"), "tab:blue"))
    lines = [line for line in lines if line[1] is not None]
    if not lines:
        return "no labeled-accuracy rows in metrics.jsonl: no 'not label correction' plot"
    fig = _figure()
    ax = fig.subplots()
    for label, (steps, mean, _, _), color in lines:
        style = {"ls": "--", "lw": 1.4, "zorder": 4} if color == "black" else {"lw": 2, "marker": "o", "ms": 3}
        ax.plot(steps, 100 * mean, color=color, label=label, **style)
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy on the labeled training set (%)")
    title = "MPL is not label correction: training accuracy on the labeled data"
    if sup is None:
        title += "\n(no supervised run in the comparison)"
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return None


def plot_target_distributions(grouped: dict[str, list[RunData]], main: str | None, path: Path) -> str | None:
    if main is None:
        return "no reducedmpl run: no 'not only regularization' plot"
    run = grouped[main][0]
    probes_path = run.folder / "probes.json"
    if not probes_path.exists():
        return f"{probes_path} is missing: no 'not only regularization' plot"
    probes = json.loads(probes_path.read_text())
    points = [p for p in PROBE_POINTS if p in probes.get("snapshots", {})]
    if not probes.get("ids") or not points:
        return "no probe snapshots (distill.probe_size 0?): no 'not only regularization' plot"
    large = np.exp(np.asarray(probes["large"], float))
    snaps = {p: np.exp(np.asarray(probes["snapshots"][p], float)) for p in points}
    # show the probes whose distribution the reduced teacher changed most by the end
    change = np.abs(snaps[points[-1]] - large).sum(1)
    shown = np.argsort(-change, kind="stable")[:N_PROBES_SHOWN]
    num_classes = large.shape[1]
    cols = [("large teacher", large)] + [(f"reduced, {100 * float(p):.0f}%", snaps[p]) for p in points]
    fig = _figure(2.0 * len(cols) + 0.6, 1.7 * len(shown) + 1.0, layout=None)  # a fixed grid: no layout solver
    fig.subplots_adjust(left=0.09, right=0.99, bottom=0.1, top=0.9, wspace=0.12, hspace=0.4)
    axes = fig.subplots(len(shown), len(cols), sharey=True, squeeze=False)
    for r, i in enumerate(shown):
        label = int(probes["labels"][i])
        classes = np.arange(num_classes) if num_classes <= 12 else np.argsort(-large[i])[:10]
        for c, (title, probs) in enumerate(cols):
            ax = axes[r][c]
            colors = ["tab:green" if k == label else "tab:blue" for k in classes]
            ax.bar(np.arange(len(classes)), probs[i, classes], color=colors)
            ax.set_ylim(0, 1)
            ax.set_xticks(np.arange(len(classes)), [str(k) for k in classes], fontsize=6)
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"id {probes['ids'][i]}\nlabel {label}\np(class)", fontsize=8)
    fig.supxlabel("class (green: the true label" + ("" if num_classes <= 12 else "; the large teacher's top 10")
                  + ")", fontsize=9)
    fig.suptitle(f"MPL is not only regularization: the reduced teacher's targets over training ({main}, seed "
                 f"{run.seed}; the {len(shown)} most changed of {len(probes['ids'])} probes)", fontsize=10)
    fig.savefig(path)
    return None


# ---------------------------------------------------------------------------------------------- report
CAPTIONS = {
    "accuracy.png": "Test accuracy of the student per compare run: bars are the mean over seeds, error bars one "
                    "standard deviation, dots the single seeds; the dashed line is the large teacher.",
    "learning_curves.png": "Validation accuracy during training (mean over seeds; the band spans the seeds).",
    "mpl_signal.png": "The MPL signal h per reducedmpl run (raw in light, smoothed in bold). Positive h means the "
                      "student's step on the reduced teacher's pseudo labels lowered its labeled loss; h near zero "
                      "throughout means the MPL term has little to say.",
    "label_correction.png": "Accuracy on the labeled training images during training: the supervised student, "
                            "the large and the reduced teacher, and the ReducedMPL student. If MPL were label "
                            "correction, the student would only gain where the teacher fits the labels better; "
                            "compare how fast each fits the labels with the test accuracies above.",
    "target_distributions.png": "The reduced teacher's distribution on probe examples at 0/25/50/75/100 % of "
                                "training next to the large teacher's. At 0 % it equals the large teacher; targets "
                                "that change during training (not just flatten) are more than a regulariser.",
}


def _teacher_test_acc(run_dir: Path, index: dict) -> float | None:
    entry = next((e for e in index["stages"] if e["stage"] == "train_large"), None)
    metrics = run_dir / entry["folder"] / "metrics.jsonl" if entry else None
    if metrics is None or not metrics.exists():
        return None
    final = next((r for r in reversed(read_jsonl(metrics)) if r.get("final")), {})
    return final.get("test_acc")


@dataclass
class Report:
    path: Path  # report.md
    summaries: list[RunSummary]
    baseline: str | None
    plots: list[str]  # PNG file names written
    notes: list[str]  # why the other plots were skipped


def write_report(run_dir: str | Path, out: str | Path | None = None, console: Console | None = None) -> Report:
    """Write ``comparison.md``/``.csv`` into ``run_dir``, and the PNG plots and ``report.md`` into ``out``
    (default ``RUN_DIR/report``)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    index = read_index(run_dir)  # read before making any folder: a failed report leaves nothing behind
    results = collect_results(run_dir)
    grouped = _by_run(load_runs(results))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {out} ({e.strerror or e})",
                        "choose a writable --out") from None
    baseline = index.get("baseline")
    summaries = aggregate(results, baseline)
    write_comparison(run_dir, summaries, baseline)
    main = main_mpl_run(grouped)
    teacher_test = _teacher_test_acc(run_dir, index)
    plots: dict[str, Callable[[Path], str | None]] = {
        "accuracy.png": lambda p: plot_accuracy(summaries, p, teacher_test),
        "learning_curves.png": lambda p: plot_learning_curves(grouped, p),
        "mpl_signal.png": lambda p: plot_mpl_signal(grouped, p),
        "label_correction.png": lambda p: plot_label_correction(grouped, main, p),
        "target_distributions.png": lambda p: plot_target_distributions(grouped, main, p),
    }
    written, notes = [], []
    for name, draw in plots.items():
        (out / name).unlink(missing_ok=True)  # never leave a plot of an earlier run beside this one
        note = draw(out / name)
        if note is None:
            written.append(name)
        else:
            notes.append(note)
            if console is not None:
                console.print(f"report: skipped {name}: {note}", highlight=False)

    lines = [f"# Report: {index.get('name', run_dir.name)}", ""]
    if teacher_test is not None:
        lines += [f"Large teacher: test accuracy {100 * teacher_test:.2f} %.", ""]
    lines += ["## Comparison", "", comparison_markdown(summaries, baseline) if summaries
              else "No finished distill run.\n"]
    for name in written:
        lines += [f"## {name.removesuffix('.png').replace('_', ' ')}", "", f"![{name}]({name})", "",
                  CAPTIONS[name], ""]
    if notes:
        lines += ["## Skipped", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Stages", "", "| stage | key | folder |", "|---|---|---|"]
    lines += [f"| {e['label']} | {e['key'][:8]} | {e['folder']} |" for e in index["stages"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return Report(out / "report.md", summaries, baseline, written, notes)
