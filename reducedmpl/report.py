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

from . import cost as costs
from .advice import advise
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
                     "folder": run_dir / entry["folder"],
                     "cost": costs.cached_cost(run_dir / entry["folder"] / "student.pt")})
    return rows


@dataclass
class TeacherSummary:
    """The large teacher of a run: its accuracies (fractions) and what it costs to run."""

    arch: str | None
    test: float | None
    val: float | None
    cost: dict | None


def teacher_summary(run_dir: str | Path, index: dict | None = None) -> TeacherSummary | None:
    """The run's large teacher from its train_large stage (final metrics row, teacher.pt's cost); None without one."""
    run_dir = Path(run_dir)
    index = index if index is not None else read_index(run_dir)
    entry = next((e for e in index["stages"] if e["stage"] == "train_large"), None)
    if entry is None:
        return None
    folder = run_dir / entry["folder"]
    metrics = folder / "metrics.jsonl"
    final = next((r for r in reversed(read_jsonl(metrics)) if r.get("final")), {}) if metrics.exists() else {}
    cost = costs.cached_cost(folder / "teacher.pt")
    if not final and cost is None:
        return None
    return TeacherSummary((cost or {}).get("arch"), final.get("test_acc"), final.get("val_acc"), cost)


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
    costs: list[dict | None] = field(default_factory=list)  # per seed: cost.json of its student (None: unknown)

    @property
    def cost(self) -> dict | None:
        """Parameters and FLOPs of the run's student, latency the mean over its seeds."""
        return costs.mean_cost(self.costs)

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
        s.costs.append(r.get("cost"))
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


def _with_cost(summaries: list[RunSummary], teacher: TeacherSummary | None) -> bool:
    return any(s.cost for s in summaries) or bool(teacher and teacher.cost)


def _columns(baseline: str | None, summaries: list[RunSummary], teacher: TeacherSummary | None = None) -> list[str]:
    cols = ["run", "mode", "seeds", "test acc %", "val acc %"]
    if any(s.diff is not None for s in summaries):
        cols.append(f"Δ test vs {baseline}")
    if _with_cost(summaries, teacher):
        cols += list(costs.COST_COLUMNS)
    return cols


def _note(baseline: str | None, with_diff: bool, cost_note: str = "") -> str:
    note = "accuracies in %, mean ± sample standard deviation over seeds"
    if with_diff:
        note += f"; Δ: test accuracy minus {baseline}'s with the same seed, in points, mean ± std"
    if cost_note:
        note += f"; {cost_note}"
    return note


def _cells(s: RunSummary, with_diff: bool, with_cost: bool = False,
           teacher: TeacherSummary | None = None) -> list[str]:
    cells = [s.run, s.mode, str(len(s.seeds)), _fmt(s.test_stats), _fmt(s.val_stats)]
    if with_diff:
        cells.append("—" if s.diff is None else _fmt(s.diff_stats, signed=True))
    if with_cost:
        cells += costs.cost_cells(s.cost, teacher.cost if teacher is not None else None)
    return cells


def _teacher_cells(t: TeacherSummary, with_diff: bool, with_cost: bool) -> list[str]:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}"  # noqa: E731
    cells = ["large teacher", f"teacher ({t.arch})" if t.arch else "teacher", "1", pct(t.test), pct(t.val)]
    if with_diff:
        cells.append("—")
    if with_cost:
        cells += costs.cost_cells(t.cost)
    return cells


def _rows(summaries: list[RunSummary], baseline: str | None,
          teacher: TeacherSummary | None) -> tuple[list[str], list[list[str]], str]:
    """Columns, cell rows (the teacher first, where the table has cost columns) and the caption."""
    cols = _columns(baseline, summaries, teacher)
    with_diff, with_cost = f"Δ test vs {baseline}" in cols, _with_cost(summaries, teacher)
    rows = [_cells(s, with_diff, with_cost, teacher) for s in summaries]
    if teacher is not None and with_cost:
        rows.insert(0, _teacher_cells(teacher, with_diff, with_cost))
    measured = teacher.cost if teacher is not None and teacher.cost else next((s.cost for s in summaries if s.cost),
                                                                              None)
    return cols, rows, _note(baseline, with_diff, costs.cost_note(measured) if with_cost else "")


def comparison_table(summaries: list[RunSummary], baseline: str | None = None,
                     teacher: TeacherSummary | None = None) -> Table:
    cols, rows, note = _rows(summaries, baseline, teacher)
    table = Table(title="comparison", title_justify="left", caption=note, caption_justify="left")
    for i, col in enumerate(cols):
        table.add_column(col, justify="left" if i < 2 else "right")
    for cells in rows:
        table.add_row(*cells)
    return table


def comparison_markdown(summaries: list[RunSummary], baseline: str | None = None,
                        teacher: TeacherSummary | None = None) -> str:
    cols, rows, note = _rows(summaries, baseline, teacher)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    tip = advise(teacher.val if teacher is not None else None, summaries)
    return "\n".join(lines) + f"\n\n{note[0].upper()}{note[1:]}.\n" + (f"\n{tip}\n" if tip else "")


CSV_COST = ["params", "flops_per_image", "latency_ms_b1", "latency_ms_per_image_b64"]


def write_comparison(run_dir: str | Path, summaries: list[RunSummary], baseline: str | None = None,
                     teacher: TeacherSummary | None = None) -> None:
    """``comparison.md`` and ``comparison.csv`` (fractions, full precision; the cost figures and their
    student / teacher ratios; a ``teacher`` row where the run has one) in ``run_dir``."""
    run_dir = Path(run_dir)
    (run_dir / "comparison.md").write_text(comparison_markdown(summaries, baseline, teacher))
    teacher_cost = teacher.cost if teacher is not None else None
    num = lambda v: "" if v is None else f"{v:.10g}"  # noqa: E731
    with open(run_dir / "comparison.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "mode", "n_seeds", "seeds", "test_acc_mean", "test_acc_std", "val_acc_mean",
                    "val_acc_std", "baseline", "diff_test_mean", "diff_test_std", "test_acc_per_seed", *CSV_COST,
                    *[f"{c}_vs_teacher" for c in CSV_COST]])
        for s in summaries:
            diff = s.diff_stats if s.diff is not None else ("", "")
            w.writerow([s.run, s.mode, len(s.seeds), " ".join(map(str, s.seeds)), *_csv(s.test_stats),
                        *_csv(s.val_stats), baseline or "", *_csv(diff), " ".join(f"{t:.6f}" for t in s.test),
                        *map(num, costs.cost_values(s.cost)), *map(num, costs.ratios(s.cost, teacher_cost))])
        if teacher is not None:
            acc = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731
            w.writerow(["large teacher", "teacher", 1, "", acc(teacher.test), "", acc(teacher.val), "", "", "", "",
                        acc(teacher.test), *map(num, costs.cost_values(teacher_cost)), *[""] * len(CSV_COST)])


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
    ax.set_ylim(0.0, 108.0)  # from 0: bar heights compare honestly; the labels and dots give the differences
    ax.set_yticks(np.arange(0, 101, 20))
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
        lines.append((f"supervised student ({sup[0].run})", _mean_curve(sup, "labeled_acc_student"), "tab:green"))
    lines.append(("large teacher (stored targets)", _mean_curve(grouped[main], "labeled_acc_large"), "black"))
    lines.append((f"reduced teacher ({main})", _mean_curve(grouped[main], "labeled_acc_teacher"), "tab:orange"))
    lines.append((f"ReducedMPL student ({main})", _mean_curve(grouped[main], "labeled_acc_student"), "tab:blue"))
    lines = [line for line in lines if line[1] is not None]
    if not lines:
        return "no labeled-accuracy rows in metrics.jsonl: no 'not label correction' plot"
    fig = _figure()
    ax = fig.subplots()
    styles = {  # the reduced teacher starts as the large one: the large teacher is a wide pale band underneath,
        # the reduced teacher a dashed line with open markers on top, so both stay visible where they coincide
        "black": {"lw": 7, "alpha": 0.22, "zorder": 1, "solid_capstyle": "butt"},
        "tab:orange": {"lw": 1.8, "ls": "--", "marker": "s", "ms": 5, "mfc": "none", "mew": 1.4, "zorder": 5},
    }
    for label, (steps, mean, _, _), color in lines:
        style = styles.get(color, {"lw": 2, "marker": "o", "ms": 3, "zorder": 3})
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


def plot_accuracy_latency(summaries: list[RunSummary], teacher: TeacherSummary | None, path: Path) -> str | None:
    """Test accuracy against measured latency (batch 1, and per image at batch 64): the teacher and each run,
    mean ± std over seeds on both axes."""
    points = [s for s in summaries if costs.latency_ms(s.cost, 1) is not None and s.test]
    if not points:
        return "no measured latency (no student.pt): no accuracy-latency plot"
    fig = _figure(9.0, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    colors = _colors([s.run for s in summaries])
    markers = "osD^vP<>hX"
    for ax, (batch, per_image, title) in zip(axes, ((1, False, "batch 1: ms per batch"),
                                                    (64, True, "batch 64: ms per image"))):
        xs = []  # right ends of the points' error bars
        if teacher is not None and costs.latency_ms(teacher.cost, batch) is not None and teacher.test is not None:
            x = costs.latency_ms(teacher.cost, batch, per_image)
            ax.scatter([x], [100 * teacher.test], marker="*", s=260, color="black", zorder=4,
                       label=f"large teacher ({teacher.arch})" if ax is axes[0] else None)
            xs.append(x)
        for i, s in enumerate(points):
            lat = s.cost["latency"][str(batch)]
            per_seed = np.asarray(lat.get("per_seed_ms", [lat["median_ms"]]), float) / (batch if per_image else 1)
            mean, std = s.test_stats
            xerr = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
            ax.errorbar([per_seed.mean()], [100 * mean], xerr=[xerr], yerr=[0.0 if math.isnan(std) else 100 * std],
                        fmt=markers[i % len(markers)], ms=9, color=colors[s.run], capsize=4, lw=1.5, zorder=3,
                        label=f"{s.run} ({s.mode})" if ax is axes[0] else None)
            xs.append(float(per_seed.mean()) + xerr)
        positive = [x for x in xs if x > 0]
        if positive and max(positive) > 8 * min(positive):  # orders of magnitude apart: a log axis
            ax.set_xscale("log")
        else:  # from 0, so that the distance between two points reads as their ratio
            ax.set_xlim(0.0, 1.15 * max(xs))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("measured latency (ms, median of timed runs)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    values = [100 * t for s in points for t in s.test] + ([100 * teacher.test] if teacher and teacher.test else [])
    spread = max(values) - min(values)
    axes[0].set_ylim(max(0.0, min(values) - max(2.0, 0.3 * spread)), min(101.0, max(values) + max(2.0, 0.3 * spread)))
    env = next((c for c in [teacher.cost if teacher else None] + [s.cost for s in points] if c), {})
    fig.suptitle(f"Accuracy against latency (up and to the left is better; {env.get('device_name', 'cpu')}, "
                 f"{env.get('threads', '?')} thread(s); bars: ± std over seeds)", fontsize=10)
    fig.legend(loc="outside lower center", ncols=min(5, len(points) + 1), fontsize=8)
    fig.savefig(path)
    return None


# ---------------------------------------------------------------------------------------------- report
CAPTIONS = {
    "accuracy.png": "Test accuracy of the student per compare run: bars are the mean over seeds, error bars one "
                    "standard deviation, dots the single seeds; the dashed line is the large teacher.",
    "accuracy_latency.png": "Test accuracy against the latency measured on this machine, at batch 1 (left) and per "
                            "image at batch 64 (right): the large teacher (star) and each compare run (mean over "
                            "seeds, bars one standard deviation over seeds on both axes).",
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


@dataclass
class Report:
    path: Path  # report.md
    summaries: list[RunSummary]
    baseline: str | None
    plots: list[str]  # PNG file names written
    notes: list[str]  # why the other plots were skipped
    teacher: TeacherSummary | None = None


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
    teacher = teacher_summary(run_dir, index)
    write_comparison(run_dir, summaries, baseline, teacher)
    main = main_mpl_run(grouped)
    teacher_test = teacher.test if teacher is not None else None
    plots: dict[str, Callable[[Path], str | None]] = {
        "accuracy.png": lambda p: plot_accuracy(summaries, p, teacher_test),
        "accuracy_latency.png": lambda p: plot_accuracy_latency(summaries, teacher, p),
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
    lines += ["## Comparison", "", comparison_markdown(summaries, baseline, teacher) if summaries
              else "No finished distill run.\n"]
    for name in written:
        lines += [f"## {name.removesuffix('.png').replace('_', ' ')}", "", f"![{name}]({name})", "",
                  CAPTIONS[name], ""]
    if notes:
        lines += ["## Skipped", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Stages", "", "| stage | key | folder |", "|---|---|---|"]
    lines += [f"| {e['label']} | {e['key'][:8]} | {e['folder']} |" for e in index["stages"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return Report(out / "report.md", summaries, baseline, written, notes, teacher)
