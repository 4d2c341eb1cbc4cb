"""The ``rlflow`` command: run, validate, graph, compare, list, report, docs.

Bad input (a missing file, a syntax error, an unknown node kind, a wrong parameter type,
a model path that does not exist, a malformed data file, an invalid graph, a bad flag or
run directory) is one clear message on stderr with a stable code (docs/dsl.md) and exit
code 2, before any model loads. ``validate`` and ``run`` make the same checks
(:func:`rlflow.inputs.validate`), so a run never rejects at start what validate passed.
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from rlflow.loader import UserError, apply_overrides, load_pipeline

EXIT_USAGE = 2


def _console(stderr: bool = False) -> Console:
    # messages on stderr are never hard-wrapped, so they can be grepped whole
    return Console(stderr=stderr, highlight=False, soft_wrap=stderr, width=None if sys.stdout.isatty() else 120)


def _load_valid(file: str, sets: list[str] = (), *, steps: Optional[int] = None, seed: Optional[int] = None):
    """Load, override and validate a pipeline file, its model paths and data; UserError on any problem."""
    from rlflow.inputs import validate
    from rlflow.view import render_problems

    pipeline = apply_overrides(load_pipeline(pipeline_file(file)), list(sets))
    pipeline = _apply_flag(pipeline, "--steps", "steps", steps)
    pipeline = _apply_flag(pipeline, "--seed", "seed", seed)
    pg = validate(pipeline)
    if pg.errors:
        text = render_problems(pg.problems, file).plain.rstrip()
        raise UserError(pg.errors[0].code, "invalid pipeline\n" + text)
    return pipeline, pg


def _apply_flag(pipeline, flag: str, field: str, value: Any):
    """``pipeline`` with ``field = value`` (unchanged for None), checked against the spec's bounds;
    a bad value is RF111 naming the flag."""
    from pydantic import ValidationError

    from rlflow.spec import Pipeline

    if value is None:
        return pipeline
    try:
        return Pipeline.model_validate({**dict(pipeline), field: value})
    except ValidationError as e:
        raise UserError("RF111", f"{flag} {value}: {e.errors()[0]['msg'].lower()}") from None


def _positive(flag: str, value: Optional[int], *, zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero)):
        raise UserError("RF111", f"{flag} {value}: must be {'0 or more' if zero else 'at least 1'}")


def _writable_dir(flag: str, out: Path) -> None:
    """``out`` is, or can be made, a directory this process can write in (RF112)."""
    if out.exists() and not out.is_dir():
        raise UserError("RF112", f"{flag} {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError("RF112", f"{flag} {out}: cannot write there ({e.strerror or e})") from None


# --- commands ----------------------------------------------------------------------------------


def cmd_validate(args) -> int:
    from rlflow.charts import plural
    from rlflow.inputs import validate
    from rlflow.view import render_problems

    out, err = _console(), _console(stderr=True)
    bad = 0
    for file in args.files:
        if Path(file).name == "__init__.py":  # the package marker of pipelines/, not a pipeline
            continue
        try:
            pipeline = apply_overrides(load_pipeline(pipeline_file(file)), args.set or [])
        except UserError as e:
            err.print(f"{file}: {e}", markup=False)
            bad += 1
            continue
        pg = validate(pipeline)
        if pg.errors:
            err.print(render_problems(pg.problems, file))
            bad += 1
        else:
            warn = f", {len(pg.warnings)} warning(s)" if pg.warnings else ""
            out.print(f"{file}: ok ({pipeline.name}: {plural(len(pipeline.nodes), 'node')}, "
                      f"{plural(len(pipeline.models), 'model')}{warn})", markup=False)
            for w in pg.warnings:
                out.print(f"  {w.line()}", markup=False, style="yellow")
    return EXIT_USAGE if bad else 0


def cmd_graph(args) -> int:
    from rlflow.view import render_graph, render_problems
    from rlflow.graph import build

    pipeline = apply_overrides(load_pipeline(pipeline_file(args.file)), args.set or [])
    pg = build(pipeline)
    c = _console()
    c.print(render_graph(pg, everything=args.all))
    if pg.problems:
        c.print(render_problems(pg.problems, args.file))
    return EXIT_USAGE if pg.errors else 0


def cmd_compare(args) -> int:
    """The unified view of each pipeline (data source, reward function, gradient coefficient),
    then the settings that differ between pipeline files or runs' config.json, resolved as they run."""
    from rich.markup import escape
    from rich.table import Table

    from rlflow.graph import resolve
    from rlflow.settings import diff

    pipes = [resolve(apply_overrides(load_pipeline(pipeline_file(f)), args.set or [])) for f in args.files]
    rows = diff(*(p.to_config() for p in pipes))
    c = _console()
    c.print(_unified_table(pipes, args.files))
    if not rows:
        c.print("the pipelines are identical in every setting", markup=False)
        return 0
    table = Table(title="what differs (— = absent; a KL setting that does nothing says so)", title_justify="left")
    table.add_column("setting")
    for p, f in zip(pipes, args.files):
        table.add_column(f"{p.name}\n{Path(f).name}")
    for key, values in rows:
        table.add_row(escape(key), *(escape(_shown(p, key, v)) for p, v in zip(pipes, values)))
    c.print(table)
    return 0


def _unified_table(pipes: list, files: list[str]):
    """The unified view (DeepSeekMath §5.2.1) of each pipeline, read off its nodes: one row per
    part, one column per pipeline (as the table of differences)."""
    from rich.markup import escape
    from rich.table import Table

    from rlflow.unified import unified_view

    table = Table(title="unified view: ∇J = E_(q,o)~D [Σ_t GC · ∇log π_θ(o_t | q, o_<t)]", title_justify="left")
    table.add_column("")
    for p, f in zip(pipes, files):
        table.add_column(f"{p.name}\n{Path(f).name}")
    views = [unified_view(p) for p in pipes]
    for label, part in (("data source D", "data_source"), ("reward function", "reward_function"),
                        ("gradient coefficient GC", "gradient_coefficient"), ("KL penalty", "kl")):
        table.add_row(label, *(escape(getattr(v, part)) for v in views))
    return table


def _shown(pipeline, key: str, value: str) -> str:
    from rlflow.settings import ABSENT
    from rlflow.unified import not_in_effect

    why = None if value == ABSENT else not_in_effect(pipeline, key)
    return f"{value} ({why})" if why else value


def _pipeline_files() -> list[Path]:
    """Every shipped pipeline file: pipelines/*.py, then pipelines/examples/*.py."""
    import rlflow.pipelines

    root = Path(rlflow.pipelines.__file__).parent
    return sorted((p for p in root.rglob("*.py") if p.name != "__init__.py"), key=lambda p: (len(p.parts), p))


def pipeline_file(arg: str) -> str:
    """``arg`` itself when it names a file (or looks like a path), else the shipped pipeline of
    that name (``grpo`` -> pipelines/grpo.py, ``gsm8k_grpo`` -> pipelines/examples/gsm8k_grpo.py)."""
    if Path(arg).exists() or "/" in arg or arg.endswith((".py", ".json")):
        return arg
    shipped = {p.stem: p for p in _pipeline_files()}
    if arg in shipped:
        return str(shipped[arg])
    import difflib

    close = difflib.get_close_matches(arg, list(shipped), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError("RF100", f"{arg}: no such pipeline file, nor a shipped pipeline of that name; {hint}"
                             f"shipped: {', '.join(shipped)} (rlflow list)")


def cmd_list(args) -> int:
    from rich.table import Table

    table = Table(title="shipped pipelines (rlflow run <name>, or rlflow run pipelines/<file>)", title_justify="left")
    table.add_column("file")
    table.add_column("what it is")
    root = _pipeline_files()[0].parent
    for f in _pipeline_files():
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        table.add_row(str(f.relative_to(root)), doc.strip().splitlines()[0] if doc.strip() else "")
    _console().print(table)
    return 0


def cmd_docs(args) -> int:
    """The settings tables of every node kind and variant; ``--write`` puts them into
    docs/nodes.md and the unified view of every shipped pipeline into docs/algorithms.md
    (or the generated blocks of ``--file``), ``--check`` exits 1 when a page is out of date."""
    from rlflow.docgen import ALGORITHMS_MD, NODES_MD, markdown, updated

    if not (args.write or args.check):
        print(markdown(), end="")
        return 0
    stale = 0
    for path in [Path(args.file)] if args.file else [NODES_MD, ALGORITHMS_MD]:
        try:
            old, new = updated(path)
        except (OSError, ValueError) as e:
            raise UserError("RF100", f"{path}: {e}") from None
        if args.write and new != old:
            path.write_text(new)
        if args.check and new != old:
            _console(stderr=True).print(f"{path} is out of date with the code; run: rlflow docs --write", markup=False)
            stale += 1
            continue
        print(f"{path}: {'updated' if args.write and new != old else 'up to date'}")
    return 1 if stale else 0


def _width(console: Console) -> int:
    """The terminal's width (``$COLUMNS`` or 100 when not a terminal)."""
    if sys.stdout.isatty():
        return console.width
    return int(os.environ.get("COLUMNS", "100") or 100)


def cmd_report(args) -> int:
    """What runs recorded: a terminal dashboard (curves, time per node, samples), several runs
    overlaid; ``--html FILE`` writes the same as one self-contained page. A line that cannot
    be read (a run killed mid-write) does not stop the report: every readable record is
    shown, then the bad lines are reported (RF113, exit 2)."""
    from rlflow.charts import PALETTE
    from rlflow.report import dashboard, load_run

    _positive("--samples", args.samples, zero=True)
    runs = [load_run(r, PALETTE[i % len(PALETTE)]) for i, r in enumerate(args.runs)]
    c = _console()
    c.print(dashboard(runs, _width(c), args.samples))
    if args.html:
        _write_html(Path(args.html), runs, args.samples)
        c.print(f"wrote {args.html}", markup=False)
    bad = [b for r in runs for b in r.bad]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError("RF113", f"{bad[0]}{more}; what could be read is shown above")
    return 0


def _write_html(path: Path, runs, samples: int) -> None:
    from rlflow.page import html_page

    try:
        path.write_text(html_page(runs, samples), encoding="utf-8")
    except OSError as e:
        raise UserError("RF112", f"--html {path}: cannot write there ({e.strerror or e})") from None


def _run_dir(args, pipeline) -> Path:
    """The run directory: ``--resume``'s, ``--out``, or ``runs/<name>-<time>``; checked writable (RF112)."""
    if args.resume:
        out = Path(args.resume)
        if not (out / "checkpoints").is_dir():
            raise UserError("RF109", f"--resume {out}: no checkpoints/ there (set pipeline.save_every to write them)")
        if args.out and Path(args.out).resolve() != out.resolve():
            raise UserError("RF111", f"--out {args.out} with --resume {out}: a resumed run continues in its own directory")
        _writable_dir("--resume", out)
        return out
    if args.out:
        from rlflow import rundir

        out = Path(args.out)
        if rundir.is_run(out):
            raise UserError("RF112", f"--out {out}: already holds a run ({', '.join(rundir.RUN_MARKERS)}); continue it "
                            f"with --resume {out}, or choose another --out")
        _writable_dir("--out", out)
        return out
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would pick its own time stamp
        raise UserError("RF110", "with several processes, name the run directory: --out runs/<name>")
    from rlflow import rundir

    out = rundir.default_out(pipeline.name)  # a new directory, never another run's
    _writable_dir("--out (default)", out)
    return out


def cmd_run(args) -> int:
    from rlflow import trackers

    _positive("--threads", args.threads)
    _positive("--nproc", args.nproc)
    _positive("--log-every", args.log_every)
    names = trackers.parse(args.log)
    pipeline, pg = _load_valid(args.file, args.set or [], steps=args.steps, seed=args.seed)
    if args.nproc and args.nproc > pipeline.data.batch_size:
        raise UserError("RF111", f"--nproc {args.nproc}: more processes than data.batch_size ({pipeline.data.batch_size}); "
                                 "the batch size is global and each process needs at least one prompt")
    out = _run_dir(args, pipeline)
    if args.nproc and args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch(args, pipeline, out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlflow import rundir
    from rlflow.view import Fanout, LiveView, render_graph

    rank0 = int(os.environ.get("RANK", "0")) == 0
    lock = rundir.lock(out) if rank0 else None  # held until the process ends
    if args.resume:
        _check_resume_config(out, pg.pipeline, override=args.resume_override)
    console = _console()
    if rank0 and not args.quiet:
        console.print(render_graph(pg))
    view = LiveView(console, steps=pipeline.steps, every=args.log_every or 0, enabled=rank0 and not args.quiet)
    Run = _import_runtime(view, args.threads)
    observer = Fanout(view, *trackers.make(names, out)) if rank0 and names else view
    run = Run(pipeline, pg, out, observer=observer, lock=lock)
    try:
        run.setup()
        if args.resume:
            run.resume()
        run.train()
    finally:
        observer.close()
        run.close()
    return 0


def _launch(args, pipeline, out: Path) -> int:
    """``rlflow run ... --nproc N``: build what the processes share once (built-in models,
    DeepSpeed's JIT op), then start N processes of the same command with
    ``python -m torch.distributed.run`` on this machine, each with its share of the cores."""
    import socket
    import subprocess

    _prepare(pipeline, say=None if args.quiet else _console(stderr=True).print)
    argv, skip = [], False
    for a in args.argv:  # the same command line without --nproc, with the run directory named
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        argv.append(a)
    if not args.out and not args.resume:
        argv += ["--out", str(out)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "rlflow", *argv]
    return _wait_for(subprocess.Popen(cmd, env=env))


def _wait_for(launcher) -> int:
    """Wait for the launcher and its processes to finish. Ctrl-C reached them too (one
    process group): they end their step, save a checkpoint and stop, so keep waiting; a
    SIGTERM sent to this process alone is passed on to the launcher, which passes it on."""
    import signal

    def forward(signum, frame):
        launcher.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return launcher.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, old)


def _prepare(pipeline, say=None) -> None:
    """Build the pipeline's built-in models and DeepSpeed's communication op in one process
    (several processes building them at once would train the model twice or crash the op build)."""
    import subprocess

    from rlflow.engine import train_pipeline
    from rlflow.models import resolve

    for spec in pipeline.models.values():
        resolve(spec.path, train=train_pipeline, on_build=say)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cpu_adam = any(m.train and m.offload and m.zero_stage > 0 for m in pipeline.models.values())
    subprocess.run([sys.executable, "-c", f"from rlflow.models import build_ops; build_ops(cpu_adam={cpu_adam})"],
                   env=env, check=True, capture_output=True)


def _import_runtime(view, threads: Optional[int]):
    """Import torch, transformers and DeepSpeed (shown and timed as set-up); the engine's Run."""
    view.doing("importing torch, transformers and deepspeed")
    _quiet_libraries()
    import torch

    if threads:
        torch.set_num_threads(threads)
    from rlflow.engine import Run

    view.done("imported torch, transformers and deepspeed")
    return Run


RESUMABLE_CHANGES = ("steps",)  # settings a resume may change without --resume-override (train longer)


def _check_resume_config(out: Path, pipeline, *, override: bool) -> None:
    """Refuse (UserError) to resume ``out`` with settings other than those it was started
    with (the resolved pipeline against the run's config.json), naming every differing
    setting; ``override`` lets the new settings stand."""
    from rlflow.settings import describe, diff

    if override:
        return
    recorded = out / "config.json"
    if not recorded.exists():
        raise UserError("RF111", f"--resume {out}: no config.json there to check the settings against; "
                                 "pass --resume-override to resume anyway")
    try:
        old = json.loads(recorded.read_text())
    except ValueError as e:
        raise UserError("RF111", f"--resume {out}: {recorded} is unreadable ({e}); "
                                 "pass --resume-override to resume anyway") from None
    differences = [row for row in diff(old, pipeline.to_config()) if row[0] not in RESUMABLE_CHANGES]
    if differences:
        raise UserError("RF111", f"--resume {out}: the run was started with other settings "
                                 f"({recorded} -> now):\n{describe(differences)}\n"
                                 "resume with the same settings, or pass --resume-override to continue with these")


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")


# --- entry point -------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one UserError (RF111) rather than usage text and exit."""

    def error(self, message: str):
        raise UserError("RF111", f"{self.prog}: {message} (see {self.prog} --help)")


_SET_HELP = "override a parameter: a node (by name), a model (by name), data or pipeline; repeatable"
_FILE_HELP = "a pipeline file (.py), a run's config.json, or a shipped pipeline's name (rlflow list)"


def _run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("file", help=_FILE_HELP)
    r.add_argument("--steps", type=int, help="iterations (overrides the pipeline's)")
    r.add_argument("--seed", type=int, help="random seed (overrides the pipeline's)")
    r.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    r.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE", help=_SET_HELP)
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")
    r.add_argument("--log", metavar="TRACKERS", help="also send the metrics to these trackers, comma-separated: "
                   "tensorboard, wandb, mlflow, csv (docs/watching.md)")
    r.add_argument("--log-every", type=int, metavar="N", help="keep a step line in the scrollback every N steps "
                   "(default: about 20 in a run)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest intact checkpoint")
    r.add_argument("--resume-override", action="store_true",
                   help="resume even though the settings differ from the run's config.json")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is steadiest on a busy machine)")
    r.add_argument("--nproc", type=int, help="processes on this machine, one per GPU (starts them with torch.distributed.run; "
                   "data.batch_size stays the global batch)")
    r.set_defaults(fn=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlflow", description="RLHF post-training pipelines as small declarative graphs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the command)")
    sub = p.add_subparsers(dest="command", required=True)
    # --debug after the command too; SUPPRESS keeps the top-level value when it is not given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def command(name: str, text: str):
        return sub.add_parser(name, help=text, description=text, parents=[common])

    _run_arguments(command("run", "train a pipeline"))

    v = command("validate", "every check that needs no model: the graph, model paths, data files")
    v.add_argument("files", nargs="+", metavar="file", help=_FILE_HELP + "; several at once")
    v.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE", help=_SET_HELP + "; applied to every file")
    v.set_defaults(fn=cmd_validate)

    g = command("graph", "draw the pipeline's graph")
    g.add_argument("file", help=_FILE_HELP)
    g.add_argument("--all", action="store_true", help="show every parameter of every node (defaults included) "
                   "and the columns each node reads from the data source")
    g.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE", help=_SET_HELP)
    g.set_defaults(fn=cmd_graph)

    c = command("compare", "every setting that differs between pipelines (files or runs' config.json)")
    c.add_argument("files", nargs="+", metavar="file", help=_FILE_HELP + "; two or more")
    c.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE", help=_SET_HELP + "; applied to every file")
    c.set_defaults(fn=cmd_compare)

    lst = command("list", "the shipped pipelines")
    lst.set_defaults(fn=cmd_list)

    rep = command("report", "a dashboard of one or more runs: curves, time per node, samples")
    rep.add_argument("runs", nargs="+", metavar="run", help="a run directory (runs/<name>-<time>); several overlay")
    rep.add_argument("--samples", type=int, default=8, help="samples shown per run (default 8; 0 for none)")
    rep.add_argument("--html", metavar="FILE", help="also write the report as one self-contained HTML page")
    rep.set_defaults(fn=cmd_report)

    d = command("docs", "the settings tables of every node and variant, read off the code")
    d.add_argument("--write", action="store_true", help="replace the generated tables in docs/nodes.md and docs/algorithms.md")
    d.add_argument("--check", action="store_true", help="exit 1 if docs/nodes.md or docs/algorithms.md is out of date")
    d.add_argument("--file", help="the one page to write or check (default: the repository's docs/nodes.md and docs/algorithms.md)")
    d.set_defaults(fn=cmd_docs)
    return p


def _default_accelerator() -> None:
    """No GPU driver: tell DeepSpeed to use its CPU accelerator before anything imports it."""
    import shutil

    if shutil.which("nvidia-smi") is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv: Optional[list[str]] = None) -> int:
    # DeepSpeed's launcher passes --local_rank; accept and ignore it
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    err = _console(stderr=True)
    debug = "--debug" in argv  # until the command line is parsed
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        debug = args.debug
        _default_accelerator()
        return args.fn(args)
    except UserError as e:
        if debug:
            traceback.print_exc()
        err.print(f"error: {e}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", 2)  # rlflow.engine.Stopped: a signal ended the run after a checkpoint
        err.print("stopped" if hasattr(e, "signum") else "interrupted", markup=False)
        return 128 + signum
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into messages
        if debug:
            traceback.print_exc()
        if _is_bad_input(e):  # found while loading: no traceback to offer
            err.print(f"error: {e}", markup=False)
            return EXIT_USAGE
        err.print(f"error: {type(e).__name__}: {e}" + ("" if debug else "\n(run with --debug for the traceback)"), markup=False)
        return 1


def _is_bad_input(e: Exception) -> bool:
    """A model that cannot be loaded or a checkpoint that cannot be resumed (their modules are
    only consulted when already imported, so that an error in validate imports no torch)."""
    found = ((sys.modules.get(m), k) for m, k in (("rlflow.models", "ModelLoadError"), ("rlflow.checkpoint", "ResumeError"),
                                                  ("rlflow.rundir", "RunDirError")))
    kinds = tuple(getattr(m, k) for m, k in found if m is not None)
    return bool(kinds) and isinstance(e, kinds)


if __name__ == "__main__":
    sys.exit(main())
