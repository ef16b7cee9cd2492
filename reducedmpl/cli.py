"""The ``reducedmpl`` command line: one thin function per command.

Known problems (:class:`UserError`) print one line on stderr and exit with code 2; ``--debug`` (or
``REDUCEDMPL_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import functools
import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import ConfigError, DiskFullError, Interrupted, UserError, one_line, write_refused

app = typer.Typer(
    name="reducedmpl", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Low-memory Meta Pseudo Labels distillation for timm image classifiers.")


def _flags_without_a_type() -> None:
    """``--help`` lists a type after each option; a pure flag (``--resume``) takes no value, so it gets none
    (Typer shows ``<bool>`` there, which reads as if the flag wanted one)."""
    try:
        from typer.core import TyperOption
    except ImportError:  # another Typer layout: its own help is kept
        return
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_flags_untyped", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and self.metavar is None else shown(self, ctx)

    display_type_rich._flags_untyped = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_a_type()
# Piped into a file or a log, tables are not squeezed to 80 columns (rich's default without a terminal)
out_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": os.environ.get("REDUCEDMPL_DEBUG") == "1"}


def _usage_errors_in_one_line() -> None:
    """A usage error (an unknown option, a flag's value of the wrong type, a missing option) is one ``error:``
    line that says where help is, like every other error, instead of Typer's framed panel over several lines."""
    try:
        from typer import rich_utils
    except ImportError:  # without rich, click prints its own two lines
        return
    shown = getattr(rich_utils, "rich_format_error", None)
    if shown is None or getattr(shown, "_one_line", False):
        return

    def rich_format_error(self) -> None:
        if self.__class__.__name__ == "NoArgsIsHelpError":  # no arguments: the help itself
            return shown(self)
        ctx = getattr(self, "ctx", None)
        where = f"see `{ctx.command_path} --help`" if ctx is not None else "see `reducedmpl --help`"
        err_console.print(f"error: {one_line(self.format_message(), where)}", style="red", highlight=False,
                          markup=False, soft_wrap=True)

    rich_format_error._one_line = True
    rich_utils.rich_format_error = rich_format_error


_usage_errors_in_one_line()

# Shared options
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Pipeline YAML file with the settings.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE", help="Override a setting: --set section.key=value (repeatable).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder of this stage.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a run already in --out.")]
DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="Data source: digits, mnist:DIR, cifar10:DIR, cifar100:DIR, folder:DIR, npz:FILE, "
                   "hf:NAME_OR_DIR, wds:PATTERN.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed of the run.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
LogOpt = Annotated[Optional[list[str]], typer.Option(
    "--log", metavar="SINK", help="Also log the metrics to: tensorboard (OUT/tensorboard/; needs the tensorboard package).")]


def fail(message: str, code: int = 2) -> None:
    """``error: MESSAGE`` on stderr, one line of at most :data:`~reducedmpl.errors.MESSAGE_MAX_BYTES`; exit."""
    err_console.print(f"error: {one_line(message)}", style="red", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn :class:`UserError` into one line on stderr and exit code 2; leave the process group at the end.

    Under torchrun a settings error, or one found by rank 0 and shared with the others, is printed once, by
    rank 0; an error of another rank's own is printed by that rank, with its rank."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import distributed

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _state["debug"]:
                raise
            rank = distributed.current().rank or int(os.environ.get("RANK", "0") or 0)
            if rank and (isinstance(e, (distributed.RankZeroError, ConfigError)) or e.same_on_every_rank):
                raise typer.Exit(2)  # the settings are every rank's: rank 0 reports them
            fail(f"(rank {rank}) {e}" if rank else str(e))
        except KeyboardInterrupt as e:  # Interrupted says where the loop stopped
            if distributed.current().is_main:
                err_console.print(str(e) if isinstance(e, Interrupted) and str(e) else
                                  "interrupted: the last checkpoint is kept; continue with --resume", highlight=False)
            raise typer.Exit(130)
        except Exception as e:  # a full disk or a refused write where no writer named the file
            refused = None if isinstance(e, typer.Exit) or _state["debug"] else write_refused(e)
            if refused is None:
                raise
            fail(str(refused))
        finally:
            distributed.shutdown()

    return wrapper


def say(*objects, to: Console | None = None, **kwargs) -> None:
    """Print a command's result on stdout (or ``to``), once: on rank 0 under torchrun."""
    from . import distributed

    if distributed.current().is_main:
        (to or out_console).print(*objects, **kwargs)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"reducedmpl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    """Train a large teacher, precompute its targets, distill a small student with a reduced teacher."""
    if debug:
        _state["debug"] = True


@app.command("train-large")
@handle_errors
def train_large(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="timm model name: NAME, NAME.TAG or hf-hub:ORG/NAME.")] = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", help="'scratch', 'pretrained' (the name's weights from the Hugging Face Hub cache) or "
                       "'checkpoint:PATH' (.pt, .pth, .safetensors).")] = None,
    reset_head: Annotated[Optional[bool], typer.Option(
        "--reset-head", help="Allow a checkpoint whose classifier has another class count.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Epochs; 0 only loads and evaluates.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs/large"),
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    log: LogOpt = None,
) -> None:
    """Train a large timm teacher on the labeled data (or load one) and write OUT/teacher.pt."""
    from .config import stage_config
    from .logsinks import configure
    from .stages import train_large as stage

    configure(log or ())
    flags = {"data.source": data, "model": model, "init": init, "reset_head": reset_head, "epochs": epochs,
             "batch_size": batch_size, "optim.lr": lr, "seed": seed, "device": device}
    cfg = stage_config("train_large", config, set_ or (), flags)
    result = stage.run(cfg, out, resume=resume, overwrite=overwrite, console=err_console, quiet=quiet)
    say(f"teacher {cfg.model}: val acc {_pct(result.get('val_acc'))}, "
                      f"test acc {_pct(result.get('test_acc'))} -> {out / stage.ARTIFACT}")


@app.command("distill")
@handle_errors
def distill(
    targets: Annotated[Path, typer.Option("--targets", "-t", help="targets.h5 written by precompute.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    student: Annotated[Optional[str], typer.Option(
        "--student", help="timm model name of the student: NAME, NAME.TAG or hf-hub:ORG/NAME.")] = None,
    student_init: Annotated[Optional[str], typer.Option(
        "--student-init", help="'scratch', 'pretrained' (the name's hub weights) or 'checkpoint:PATH' (weights, "
                               "or a teacher.pt / student.pt).")] = None,
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", help="The student's input size (default: data.input_size, else its pretrained "
                             "configuration's, else the data's).")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="reducedmpl, kd, online-kd or supervised.")] = None,
    teacher: Annotated[Optional[Path], typer.Option(
        "--teacher", help="online-kd: the large teacher.pt, run on the student's own view each step.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (before the finetune).")] = None,
    teacher_grad: Annotated[Optional[str], typer.Option(
        "--teacher-grad", help="exact (soft pseudo labels) or reinforce (hard, the paper's).")] = None,
    mpl_weight: Annotated[Optional[float], typer.Option("--mpl-weight", help="Weight of the MPL signal.")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs/distill"),
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    log: LogOpt = None,
) -> None:
    """Co-train the reduced teacher with the student on stored targets; write OUT/student.pt."""
    from .config import stage_config
    from .logsinks import configure
    from .stages import distill as stage

    configure(log or ())
    flags = {"data.source": data, "student": student, "student_init": student_init, "input_size": input_size,
             "mode": mode, "steps": steps, "teacher_grad": teacher_grad,
             "mpl_weight": mpl_weight, "seed": seed, "device": device,
             "large_teacher": str(teacher) if teacher is not None else None}
    cfg = stage_config("distill", config, set_ or (), flags)
    result = stage.run(cfg, targets, out, resume=resume, overwrite=overwrite, console=err_console, quiet=quiet)
    say(f"student {cfg.student} ({cfg.mode}): val acc {_pct(result.get('val_acc'))}, "
                      f"test acc {_pct(result.get('test_acc'))} -> {out / stage.ARTIFACT}")


@app.command("precompute")
@handle_errors
def precompute(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    teacher: Annotated[Optional[Path], typer.Option(
        "--teacher", help="teacher.pt written by train-large (its data and splits are the default).")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="timm model name of plain teacher weights (with --checkpoint and --data).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(
        "--checkpoint", help="Plain teacher weights: .pt, .pth or .safetensors state dict.")] = None,
    data: DataOpt = None,
    splits: Annotated[Optional[str], typer.Option(
        "--splits", help="Comma-separated splits to cover: labeled,unlabeled,val,test.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float16 or float32 logits.")] = None,
    topk: Annotated[Optional[int], typer.Option("--topk", help="Store only the top-K logits (0: all).")] = None,
    shards: Annotated[Optional[int], typer.Option("--shards", help="Number of shard files.")] = None,
    views: Annotated[Optional[int], typer.Option(
        "--views", help="Views per row: the clean input plus VIEWS-1 augmented ones (the data's training "
                        "augmentation, seeded per row and view), each with its own stored targets.")] = None,
    view_mix: Annotated[Optional[str], typer.Option(
        "--view-mix", help="none, or mixup: each augmented view mixed with a partner row's (function "
                           "matching).")] = None,
    mix_alpha: Annotated[Optional[float], typer.Option(
        "--mix-alpha", help="The mixup weight ~ Beta(ALPHA, ALPHA) (default 1: uniform).")] = None,
    temperature: Annotated[Optional[float], typer.Option(
        "--temperature", help="Recorded in the store; readers divide the logits by it.")] = None,
    device: DeviceOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="The targets.h5 to write (a folder gets targets.h5 inside; default: beside "
                            "the teacher).")] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the teacher once over the data and store its logits (rerun the same command to finish a killed run)."""
    from .config import stage_config
    from .stages import precompute as stage

    source = stage.open_teacher(teacher, model, checkpoint)
    split_list = [s.strip() for s in splits.split(",") if s.strip()] if splits is not None else None
    flags = {"data.source": data, "splits": split_list, "batch_size": batch_size, "dtype": dtype, "topk": topk,
             "shards": shards, "views": views, "view_mix": view_mix, "mix_alpha": mix_alpha,
             "temperature": temperature, "device": device}
    cfg = stage_config("precompute", config, set_ or (), flags, base=stage.config_base(source))
    from .engine.interrupt import graceful_stop

    try:  # Ctrl-C stops between batches; precompute has no --resume, running it again continues
        with graceful_stop(notice=stage.STOP_NOTICE):
            result = stage.run(cfg, source, out, overwrite=overwrite, console=err_console, quiet=quiet)
            say(stage.summary_line(result), highlight=False, soft_wrap=True)
            gc.collect()  # the run's cyclic garbage (and its weakref callbacks) goes while Ctrl-C is only a request
    except KeyboardInterrupt:
        say("interrupted: finished shards are kept; run the same command again to continue", to=err_console)
        raise typer.Exit(130)


@app.command("inspect")
@handle_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="targets.h5 (or its folder), teacher.pt, student.pt or reduced_teacher.pt.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed forward passes per batch size for the latency "
                                                            "of a teacher or student (after 3 warm-up passes).")] = 20,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Skip measuring latency.")] = False,
) -> None:
    """Show what an artifact holds, check that it is sound (exit 1 when it is not), and what a model costs."""
    from . import inspect as insp

    report = insp.inspect_path(path, latency=not no_latency, runs=runs)
    if as_json:
        out_console.print_json(data=insp.jsonable(report))
    else:
        insp.render(report, out_console)
    if report["problems"]:
        raise typer.Exit(1)


@app.command("export")
@handle_errors
def export(
    artifact: Annotated[Path, typer.Argument(help="teacher.pt or student.pt written by reducedmpl.")],
    format_: Annotated[str, typer.Option("--format", "-f", help="onnx, torchscript or safetensors.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="File to write (default: beside the artifact, e.g. student.onnx); a sidecar "
                            "FILE.json describes its input and classes.")] = None,
    batch: Annotated[Optional[int], typer.Option(
        "--batch", help="ONNX only: fix the batch size of the graph (default: a dynamic batch).")] = None,
    normalize: Annotated[bool, typer.Option(
        "--normalize", help="Put the mean/std normalisation inside the graph: it then takes pixels in [0, 1].")] = False,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset version (default: the exporter's).")] = None,
    no_check: Annotated[bool, typer.Option(
        "--no-check", help="Skip running the export against PyTorch on the artifact's test images.")] = False,
) -> None:
    """Export a teacher or student as ONNX, TorchScript or safetensors, checked against PyTorch."""
    from .export import export_artifact

    result = export_artifact(artifact, format_, out, batch=batch, normalize=normalize, opset=opset,
                             check=not no_check)
    say(result.summary(), highlight=False, soft_wrap=True)


@app.command("run")
@handle_errors
def run_pipeline(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file, e.g. pipelines/digits.yaml.")],
    set_: SetOpt = None,
    force: Annotated[Optional[list[str]], typer.Option(
        "--force", help="Rerun a stage and those after it: train_large, precompute, distill or a distill "
                        "folder label such as distill-kd-0 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (stage, key, status, output) and "
                                                            "exit without computing.")] = False,
    out_root: Annotated[Path, typer.Option("--out-root", help="Folder of the run folders.")] = Path("runs"),
    quiet: QuietOpt = False,
    log: LogOpt = None,
) -> None:
    """Run train-large, precompute and the distill runs of a pipeline, cached by key; then compare and report."""
    from .logsinks import configure
    from .pipeline import run_pipeline as run_all

    configure(log or ())
    try:
        run_all(pipeline, set_ or (), force=force or (), dry_run=dry_run, out_root=out_root, console=out_console,
                stage_console=err_console, quiet=quiet)
    except KeyboardInterrupt:
        say("interrupted: finished stages are kept; run the same command again to resume", to=err_console)
        raise typer.Exit(130)
    except DiskFullError as e:  # `run` has no --resume: running it again resumes
        raise e.with_fix("free some space, then run the same command again: it continues where it stopped") from None


@app.command("report")
@handle_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `reducedmpl run` (runs/NAME).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder of the report (default: "
                                                                    "RUN_DIR/report).")] = None,
) -> None:
    """Write the comparison table and the PNG plots of a finished run, with a report.md that shows them."""
    from . import report as rep

    written = rep.write_report(run_dir, out, console=err_console)
    out_console.print(rep.comparison_table(written.summaries, written.baseline, written.teacher))
    out_console.print(f"report: {written.path}", highlight=False)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def run() -> None:
    """Entry point of the ``reducedmpl`` script."""
    code: int | str | None = 1
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
        raise
    except BrokenPipeError:
        sys.exit(1)
    finally:
        _exit_at_once_on_ctrl_c(code)


def _exit_at_once_on_ctrl_c(code: int | str | None) -> None:
    """The command is over: a Ctrl-C while Python shuts down (atexit handlers, threads) ends the process at once
    with the command's exit code, instead of printing a KeyboardInterrupt traceback from an atexit handler."""
    import signal

    status = code if isinstance(code, int) else 0 if code is None else 1

    def exit_now(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - interrupted in the middle of a write
                pass
        os._exit(status)

    try:
        signal.signal(signal.SIGINT, exit_now)
    except ValueError:  # not the main thread
        pass


if __name__ == "__main__":
    run()
