"""Quality benchmark: does ReducedMPL beat KD? (slow, not in CI)

Fixed protocol on the MNIST test set (``mnist:DIR``, read in place): split by seed into 4,000 test /
1,000 val / 5,000 train images, 10 labels per class in train (100 labels), the rest unlabeled. A large
teacher is trained once on the 100 labels (``reducedmpl.stages.train_large.run``), its logits are stored
once (``reducedmpl.stages.precompute.run``), then every (variant, seed) distills a ``test_resnet``
student (``reducedmpl.stages.distill.run``). Everything is cached under ``--out``: a rerun reuses the
teacher, the targets, and every distill run whose ``result.json`` exists.

Variants are a base name with optional DistillConfig overrides, ``NAME[:key=value,key=value]``
(values parsed as YAML; nested keys with dots), e.g. ``exact:mpl_weight=3,kl_weight=0.5``. Base names:

    supervised   student on the 100 labels only
    kd           student on q_L of the pool (temperature 1)
    reinforce    reducedmpl, hard sampled pseudo labels, REINFORCE teacher gradient (the paper's)
    exact        reducedmpl, soft pseudo labels, exact first-order teacher gradient

A variant option ``views=K`` distills from a store of K views per row (``precompute --views K``: the clean input
and K-1 augmented ones), replaying a stored view for every drawn row; the store is computed once per K. With
``view_mix=mixup`` beside it the K-1 augmented views are mixup images (``precompute --view-mix mixup``: function
matching), stored once per K in their own folder; ``online-kd:online_mix=mixup`` is the online anchor of those.

The table reports mean ± std (sample std) over seeds of test and val accuracy, and the per-seed paired
difference of test accuracy to ``kd``, to ``online-kd`` (when run) and, for a reducedmpl variant with
``mpl_weight`` > 0, to the same variant at ``mpl_weight=0`` (when run): same seed, same student init, same
batches. For reducedmpl variants it also reports how long the MPL signal lasts: the logged h (every 10 steps)
in windows of 10, and the share of windows whose mean h is positive by more than twice its standard error. Model selection and
tuning use the val split only; the test split is read once per run, for the final number.

Protocol choices (measured on a 2-core CPU shared with other jobs): the large teacher is resnet18 (the
resnet18 class asked for; 40 epochs of 4 steps at batch 25 take ~9 min here, so no smaller model was
needed; label smoothing 0.1, AdamW, weights of the best val epoch); 1,000 distill steps (batch 32 + 128:
~26 passes over the 5,000-image pool); ``exact`` uses the forward-difference J (``exact_method=fd``).

Tuning (val only, seed 0, ``--hide-test --tag sweep``; val acc %: kd 90.7, supervised 90.1):
reinforce mpl_weight 0 / 10 / 100: 91.4 / 92.0 / 91.3 -> 10; exact mpl_weight 0 / 1 / 10: 91.4 / 91.7 /
92.1 -> 10; exact with kl_weight 1: 91.9; exact with supervised_weight 0 (the MPL gradient alone): 93.3,
the best, hence the extra default variant. Control (seed 0): student on argmax(q_L), no reduced teacher
(``reinforce:pseudo_label=argmax,mpl_weight=0,supervised_weight=0``): 91.7.

    python benchmarks/quality.py --out runs/quality                      # the default comparison
    python benchmarks/quality.py --out runs/quality-strong --teacher-labels-per-class 100 --variants \
        supervised kd exact:mpl_weight=0 exact:mpl_weight=10 exact:supervised_weight=0    # a strong teacher
    python benchmarks/quality.py --out runs/quality --seeds 0 --variants exact:mpl_weight=1 \\
        exact:mpl_weight=3 --tag sweep                                    # a tuning sweep (read val only)

Stored views against the consistent teacher (strong teacher, 300 steps; with and without RandAugment; the
paper's regime of a large labeled set; the weak teacher):

    V="kd kd:views=8 online-kd exact:mpl_weight=0 exact:mpl_weight=0,views=8 exact:mpl_weight=1 \\
       exact:mpl_weight=1,views=8"
    python benchmarks/quality.py --out runs/quality-views --teacher-labels-per-class 100 --steps 300 \\
        --eval-every 100 --variants $V --tag strong-300
    python benchmarks/quality.py --out runs/quality-views-ra --randaugment rand-m9-n2 \\
        --teacher-labels-per-class 100 --steps 300 --eval-every 100 --variants $V --tag strong-300-ra
    python benchmarks/quality.py --out runs/quality-paper --labels-per-class 100 --teacher-labels-per-class 100 \\
        --steps 300 --eval-every 100 --variants $V --tag paper-300
    python benchmarks/quality.py --out runs/quality-weak --steps 300 --eval-every 100 --variants $V --tag weak-300
    # and each of the last two with --randaugment rand-m9-n2 and its own --out (a `large` folder linked to the
    # one above reuses the teacher)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from _data import default_data, mean_std  # noqa: E402 - benchmarks/ is on sys.path when a script runs

DEFAULT_DATA = default_data(fallback=None)  # the MNIST folder beside the repository
BASES = {
    "supervised": {"mode": "supervised"},
    "kd": {"mode": "kd"},
    # the consistent anchor: the large teacher itself, run on the student's augmented view every step
    "online-kd": {"mode": "online-kd"},
    "reinforce": {"mode": "reducedmpl", "teacher_grad": "reinforce"},
    # J by forward difference: the same quantity as the jvp up to O(eps), and 1.5x faster on a 2-core CPU
    # (172 vs 259 ms/step here); pass exact_method=jvp to check
    "exact": {"mode": "reducedmpl", "teacher_grad": "exact", "exact_method": "fd"},
}


def default_variants(args) -> list[str]:
    """The baselines, both teacher gradients at mpl_weight 0, and at their tuned weights (--*-weight)."""
    return ["supervised", "kd", "reinforce:mpl_weight=0", f"reinforce:mpl_weight={args.reinforce_weight:g}",
            "exact:mpl_weight=0", f"exact:mpl_weight={args.exact_weight:g}"] + list(args.extra_variants)


# ------------------------------------------------------------------------------------------------ variants
def parse_variant(spec: str) -> dict:
    """``NAME[:k=v,k=v]`` -> DistillConfig overrides (nested dicts for dotted keys)."""
    import yaml

    name, _, rest = spec.partition(":")
    if name not in BASES:
        raise SystemExit(f"unknown variant base {name!r} in {spec!r}; choose from {', '.join(BASES)}")
    kw: dict = json.loads(json.dumps(BASES[name]))
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"variant option {item!r} in {spec!r} is not key=value")
        node = kw
        *parents, last = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(raw)
    return kw


def folder_name(spec: str) -> str:
    return spec.replace(":", "__").replace(",", "_").replace("=", "-").replace("/", "_")


def run_folder(args, spec: str) -> Path:
    """Where a variant's runs are cached: by its spec, and by ``--student`` when that is not the default (so runs
    of another student are never taken for these)."""
    name = folder_name(spec) + ("" if args.student == "test_resnet" else f"@{folder_name(args.student)}")
    return Path(args.out) / "distill" / name


# ------------------------------------------------------------------------------------------------ stages
def data_dict(args) -> dict:
    return {"source": args.data, "split_seed": args.split_seed, "val_size": float(args.val_size),
            "test_size": float(args.test_size), "use_official_test": False,
            "labeled_per_class": args.labels_per_class}


def shared_dir(args) -> Path:
    """Where the large teacher (``large/``) and its stores (``targets*/``) are kept: ``--shared``, else ``--out``."""
    return Path(args.shared or args.out)


def teacher_labels(args) -> int | None:
    """Labels per class the large teacher trains on (None: every training row is labeled)."""
    t = args.teacher_labels_per_class
    return None if t == "all" else int(t) if t is not None else args.labels_per_class


def targets_path(out: Path, views: int, view_mix: str = "none") -> Path:
    mixed = "" if view_mix == "none" else f"-{view_mix}"
    return out / ("targets" if views <= 1 else f"targets-views{views}{mixed}") / "targets.h5"


def teacher_and_targets(args, views: int = 1, view_mix: str = "none") -> Path:
    """Train the large teacher and store its targets (``views`` per row, mixed by ``view_mix``), once; returns the
    targets path."""
    import torch
    from rich.console import Console

    from reducedmpl.config import DataConfig, OptimConfig, PrecomputeConfig, TrainLargeConfig
    from reducedmpl.stages import precompute, train_large

    torch.set_num_threads(args.threads)
    out = shared_dir(args)
    console = Console(stderr=True)
    tdir = out / "large"
    teacher_data = {**data_dict(args), "labeled_per_class": teacher_labels(args),
                    "randaugment": args.teacher_randaugment}
    if not (tdir / "teacher.pt").exists():
        cfg = TrainLargeConfig(data=DataConfig(**teacher_data), model=args.teacher_model,
                               epochs=args.teacher_epochs, batch_size=args.teacher_batch,
                               optim=OptimConfig(opt="adamw", lr=args.teacher_lr, weight_decay=0.05),
                               select="best", device="cpu", seed=0)
        cfg.validate()
        t0 = time.perf_counter()
        r = train_large.run(cfg, tdir, overwrite=True, console=console, quiet=True)
        console.print(f"large teacher {args.teacher_model}: val {r['val_acc']:.4f} test {r['test_acc']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)")
    targets = targets_path(out, views, view_mix)
    if not targets.exists():
        teacher = precompute.open_teacher(tdir / "teacher.pt")
        base = precompute.config_base(teacher)
        # the student's split (a teacher given more labels sees some of the student's unlabeled rows with their
        # labels: the "large, accurate teacher" case; val and test stay out of both)
        student_data = {**base["data"], "labeled_per_class": args.labels_per_class}
        # the student's augmentation and the policy of the stored views (not the teacher's --teacher-randaugment)
        student_data["randaugment"] = args.randaugment
        cfg = PrecomputeConfig(data=DataConfig(**student_data), dtype="float32", device="cpu", views=views,
                               view_mix=view_mix)
        cfg.validate()
        r = precompute.run(cfg, teacher, targets, overwrite=True, console=console, quiet=True)
        console.print(precompute.summary_line(r))
    return targets


def distill_one(args_dict: dict, spec: str, seed: int) -> dict:
    """One (variant, seed) run in its own process; cached by folder (skipped if result.json exists). A run cut off
    (killed, Ctrl-C) resumes from its last checkpoint (every ``--checkpoint-every`` steps) the next time, and
    ``timing.json`` records the seconds and steps of that last part, so step times stay per step."""
    import torch
    from rich.console import Console

    from reducedmpl.config import DistillConfig, from_dict
    from reducedmpl.stages import distill

    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads)
    run_dir = run_folder(args, spec) / f"seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    kw = {"steps": args.steps, "seed": seed, "device": "cpu", "eval_every": args.eval_every,
          "log_every": 10, "checkpoint_every": args.checkpoint_every, "student": args.student,
          **parse_variant(spec)}
    targets = str(targets_path(shared_dir(args), int(kw.pop("views", 1)), str(kw.pop("view_mix", "none"))))
    if kw["mode"] == "online-kd":
        kw["large_teacher"] = str(shared_dir(args) / "large" / "teacher.pt")
    cfg = from_dict(DistillConfig, kw, "distill")
    cfg.validate()
    start = resume_step(run_dir)
    result = distill.run(cfg, targets, run_dir, resume=start is not None, overwrite=start is None,
                         console=Console(stderr=True), quiet=True)
    if start is not None:  # result.json's train_seconds covers only the steps after ``start``
        (run_dir / "timing.json").write_text(json.dumps({"seconds": result["train_seconds"],
                                                         "steps": args.steps - start}))
    return result


def resume_step(run_dir: Path) -> int | None:
    """The step of the run's ``last.pt`` checkpoint (None: no checkpoint, start afresh)."""
    import torch

    last = run_dir / "last.pt"
    if not last.exists():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True)["distiller"]["step"])


def seconds_per_step(run_dir: Path) -> float:
    """Training seconds per step of a finished run: of its last part when it was resumed (``timing.json``)."""
    timing = run_dir / "timing.json"
    if timing.exists():
        t = json.loads(timing.read_text())
        return t["seconds"] / t["steps"]
    res = json.loads((run_dir / "result.json").read_text())
    return res["train_seconds"] / res["steps"]


# ------------------------------------------------------------------------------------------------ report
def diagnostics(run_dir: Path) -> dict:
    """End-of-training means of the logged reduced-teacher diagnostics (last 10 % of logged steps)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    logged = [r for r in rows if "entropy_teacher" in r]
    out = {}
    if logged:
        tail = logged[-max(1, len(logged) // 10):]
        for k in ("entropy_teacher", "entropy_large", "flip_rate", "train_acc_teacher"):
            vals = [r[k] for r in tail if k in r]
            if vals:
                out[k] = statistics.mean(vals)
    hs = [r["h"] for r in rows if "h" in r]
    if len(hs) >= 20:
        out["h_positive_share"], out["h_last_positive"] = h_persistence(hs)
    res = json.loads((run_dir / "result.json").read_text())
    for k in ("final_val_acc_teacher", "final_val_acc_large"):
        if k in res:
            out[k] = res[k]
    return out


def h_persistence(hs: list[float], window: int = 10) -> tuple[float, float]:
    """(share of windows of ``window`` logged h whose mean exceeds twice its standard error, the fraction of
    training at the end of the last such window): how long the MPL signal stays above its own noise."""
    windows = [hs[i:i + window] for i in range(0, len(hs) - window + 1, window)]
    positive = [statistics.mean(w) > 2 * statistics.stdev(w) / len(w) ** 0.5 for w in windows]
    last = max((i + 1 for i, p in enumerate(positive) if p), default=0)
    return sum(positive) / len(windows), last / len(windows)


def paired(per_seed: dict, other: dict, key: str) -> list[float]:
    return [100 * (per_seed[s][key] - other[s][key]) for s in sorted(per_seed) if s in other]


def ablation(spec: str) -> str | None:
    """The same variant at mpl_weight 0 (None unless ``spec`` is a reducedmpl variant with mpl_weight > 0)."""
    cfg = parse_variant(spec)
    if cfg["mode"] != "reducedmpl" or not cfg.get("mpl_weight", 1.0):
        return None
    name, _, rest = spec.partition(":")
    items = [i for i in rest.split(",") if i and not i.startswith("mpl_weight=")]
    return f"{name}:" + ",".join(["mpl_weight=0", *items])


def build_report(args, results: dict[str, dict[int, dict]], command: str, elapsed: float) -> tuple[str, dict]:
    kd = results.get("kd", {})
    students = sorted({parse_variant(spec).get("student", args.student) for spec in results})
    lines = [f"# Quality benchmark: {args.data}, {args.labels_per_class} labels/class, "
             f"test {args.test_size} / val {args.val_size}, student {', '.join(students)}, {args.steps} steps", "",
             f"Large teacher: {args.teacher_model}, {args.teacher_epochs} epochs on "
             f"{teacher_labels(args) or 'all'} labels per class "
             f"(val {100 * args._teacher['val_acc']:.2f} %"
             + ("" if args.hide_test else f", test {100 * args._teacher['test_acc']:.2f} %") + ").", "",
             "| variant | test acc % (mean ± std) | val acc % (mean ± std) | paired Δ to kd (pts) "
             "| paired Δ to online-kd | paired Δ to mpl_weight 0 | n seeds |", "|---|---|---|---|---|---|---|"]
    if args.hide_test:  # a tuning sweep: val only, so nothing is chosen on test
        lines[-2:] = ["| variant | val acc % (mean ± std) | paired val Δ to kd (pts) | paired val Δ to online-kd "
                      "| paired val Δ to mpl_weight 0 | n seeds |", "|---|---|---|---|---|---|"]
    summary = {}
    key = "val_acc" if args.hide_test else "test_acc"
    for spec, per_seed in results.items():
        seeds = sorted(per_seed)
        test = [100 * per_seed[s]["test_acc"] for s in seeds]
        val = [100 * per_seed[s]["val_acc"] for s in seeds]
        base = ablation(spec)
        diffs = {"kd": paired(per_seed, kd, key) if spec != "kd" else [],
                 "online-kd": paired(per_seed, results.get("online-kd", {}), key) if spec != "online-kd" else [],
                 "mpl0": paired(per_seed, results[base], key) if base in results else []}
        cells = " | ".join(mean_std(d) for d in diffs.values())
        summary[spec] = {"seeds": seeds, "val_acc": val, "config": parse_variant(spec),
                         **{f"{'val_' if args.hide_test else ''}diff_to_{k}": d for k, d in diffs.items()}}
        if args.hide_test:
            lines.append(f"| {spec} | {mean_std(val)} | {cells} | {len(seeds)} |")
        else:
            lines.append(f"| {spec} | {mean_std(test)} | {mean_std(val)} | {cells} | {len(seeds)} |")
            summary[spec]["test_acc"] = test
    diag_lines = ["", "Reduced-teacher diagnostics (mean over seeds; entropies in nats, last 10 % of logged "
                  "steps; teacher accuracies on val from the stored q_L):", "",
                  "| variant | H(T) | H(q_L) | label flips | T labeled acc | T val acc | q_L val acc "
                  "| h > 2 s.e. (share of windows) | last such window (fraction of training) |",
                  "|---|---|---|---|---|---|---|---|---|"]
    any_diag = False
    for spec, per_seed in results.items():
        if parse_variant(spec)["mode"] != "reducedmpl":
            continue
        ds = [diagnostics(run_folder(args, spec) / f"seed{s}") for s in per_seed]
        mean = {k: statistics.mean(d[k] for d in ds if k in d) for k in ds[0]}
        summary[spec]["diagnostics"] = mean
        any_diag = True
        f = lambda k, pct=False: (f"{100 * mean[k]:.1f}" if pct else f"{mean[k]:.3f}") if k in mean else "–"  # noqa
        diag_lines.append(f"| {spec} | {f('entropy_teacher')} | {f('entropy_large')} | {f('flip_rate', True)} "
                          f"| {f('train_acc_teacher', True)} | {f('final_val_acc_teacher', True)} "
                          f"| {f('final_val_acc_large', True)} | {f('h_positive_share', True)} % "
                          f"| {f('h_last_positive', True)} % |")
    if any_diag:
        lines += diag_lines
    lines += ["", f"Command: `{command}`", "", f"Wall time of this invocation: {elapsed / 60:.1f} min "
              f"(cached runs are not recomputed)."]
    return "\n".join(lines) + "\n", summary


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--data", default=DEFAULT_DATA, required=DEFAULT_DATA is None,
                   help="mnist:DIR (default: ../shared/data/mnist-t10k beside the repository)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--test-size", type=int, default=4000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--labels-per-class", type=int, default=10)
    p.add_argument("--teacher-model", default="resnet18")
    p.add_argument("--teacher-labels-per-class", type=lambda v: v if v == "all" else int(v), default=None,
                   help="labels per class for the teacher (default: the student's), or `all` (every training row); "
                        "more makes a stronger teacher")
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--teacher-batch", type=int, default=25)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--student", default="test_resnet", help="the student of every variant that names none")
    p.add_argument("--shared", default=None, help="folder of the large teacher and its stores, shared by several "
                                                  "--out folders (default: --out)")
    p.add_argument("--teacher-randaugment", default=None,
                   help="e.g. rand-m9-n2: train the large teacher with RandAugment (a teacher robust to the views)")
    p.add_argument("--randaugment", default=None, help="e.g. rand-m9-n2: the student's augmentation and the stored "
                                                       "views' (use its own --out)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints; a run cut off resumes from its last one when rerun")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=None,
                   help="default: supervised, kd, reinforce and exact at mpl_weight 0 and at the tuned weights")
    p.add_argument("--reinforce-weight", type=float, default=10.0, help="tuned mpl_weight of reinforce (val)")
    p.add_argument("--exact-weight", type=float, default=10.0, help="tuned mpl_weight of exact (val)")
    p.add_argument("--extra-variants", nargs="*", default=["exact:supervised_weight=0"],
                   help="added to the default variants (default: the best variant of the val sweep)")
    p.add_argument("--jobs", type=int, default=1, help="distill runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="torch threads per process")
    p.add_argument("--tag", default="quality", help="report name: OUT/TAG.md and OUT/TAG.json")
    p.add_argument("--hide-test", action="store_true",
                   help="tuning sweeps: report val accuracy only (paired diff to kd on val)")
    args = p.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    if args.variants is None:
        args.variants = default_variants(args)
    for spec in args.variants:
        parse_variant(spec)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stores = {(int(v.get("views", 1)), str(v.get("view_mix", "none"))) for v in map(parse_variant, args.variants)}
    for views, view_mix in sorted(stores | {(1, "none")}):
        teacher_and_targets(args, views, view_mix)
    import torch

    args._teacher = torch.load(shared_dir(args) / "large" / "teacher.pt", weights_only=True)["metrics"]

    jobs = [(spec, s) for spec in args.variants for s in args.seeds]
    results: dict[str, dict[int, dict]] = {spec: {} for spec in args.variants}
    plain = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    done = 0
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(distill_one, plain, spec, s): (spec, s) for spec, s in jobs}
        for fut in as_completed(futs):
            spec, s = futs[fut]
            r = fut.result()
            results[spec][s] = r
            done += 1
            test = "" if args.hide_test else f" test {100 * r['test_acc']:.2f}"
            print(f"[{done}/{len(jobs)}] {spec} seed {s}: val {100 * r['val_acc']:.2f}{test} "
                  f"({r['train_seconds']:.0f} s)", file=sys.stderr, flush=True)
    if "kd" not in results:
        results = {"kd": {}, **results}
        for s in args.seeds:
            kd_res = run_folder(args, "kd") / f"seed{s}" / "result.json"
            if kd_res.exists():
                results["kd"][s] = json.loads(kd_res.read_text())
        if not results["kd"]:
            del results["kd"]
    md, summary = build_report(args, results, command, time.perf_counter() - t0)
    (out / f"{args.tag}.md").write_text(md)
    (out / f"{args.tag}.json").write_text(json.dumps({"command": command, "args": plain, "teacher": args._teacher,
                                                      "variants": summary}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
