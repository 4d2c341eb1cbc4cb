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

    pipeline = apply_overrides(load_pipeline(file), list(sets))
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
    from rlflow.inputs import validate
    from rlflow.view import render_problems

    out, err = _console(), _console(stderr=True)
    bad = 0
    for file in args.files:
        if Path(file).name == "__init__.py":  # the package marker of pipelines/, not a pipeline
            continue
        try:
            pipeline = apply_overrides(load_pipeline(file), args.set or [])
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
            out.print(f"{file}: ok ({pipeline.name}: {len(pipeline.nodes)} nodes, {len(pipeline.models)} models{warn})", markup=False)
            for w in pg.warnings:
                out.print(f"  {w.line()}", markup=False, style="yellow")
    return EXIT_USAGE if bad else 0


def cmd_graph(args) -> int:
    from rlflow.view import render_graph, render_problems
    from rlflow.graph import build

    pipeline = apply_overrides(load_pipeline(args.file), args.set or [])
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

    pipes = [resolve(apply_overrides(load_pipeline(f), args.set or [])) for f in args.files]
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
    import rlflow.pipelines

    return sorted(p for p in Path(rlflow.pipelines.__file__).parent.glob("*.py") if p.name != "__init__.py")


def cmd_list(args) -> int:
    from rich.table import Table

    table = Table(title="shipped pipelines (rlflow run pipelines/<file>)", title_justify="left")
    table.add_column("file")
    table.add_column("what it is")
    for f in _pipeline_files():
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        table.add_row(f.name, doc.strip().splitlines()[0] if doc.strip() else "")
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


def _sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    blocks = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    pts = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    lo, hi = min(pts), max(pts)
    return "".join(blocks[int((v - lo) / (hi - lo) * 7) if hi > lo else 0] for v in pts)


def _read_records(path: Path, bad: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a run's jsonl file, one per line; each unreadable line is noted in ``bad``."""
    records = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{i}: not valid JSON ({e.msg}; a truncated line?)")
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        else:
            bad.append(f"{path}:{i}: not a record (a JSON object with a 'step')")
    return records


def _report_summary(c: Console, run: Path, records: list[dict[str, Any]], bad: list[str]) -> None:
    from rlflow.view import summary_lines, summary_table, timing_table

    summary_file = run / "summary.json"
    summary = None
    if summary_file.exists():
        try:
            summary = json.loads(summary_file.read_text(errors="replace"))
        except json.JSONDecodeError as e:
            bad.append(f"{summary_file}: not valid JSON ({e.msg})")
    if isinstance(summary, dict):
        c.print(summary_table(summary))
        for line in summary_lines(summary):
            c.print(line, markup=False)
    elif records:
        c.print(f"run did not finish: {len(records)} steps recorded", markup=False)
        if isinstance(records[-1].get("nodes"), dict):
            c.print(timing_table(records[-1]["nodes"]))
    else:
        c.print("no steps recorded", markup=False)


def cmd_report(args) -> int:
    """What a run recorded. A line that cannot be read (a run killed mid-write) does not stop
    the report: every readable record is shown, then the bad lines are reported (RF113, exit 2)."""
    run = Path(args.run)
    _positive("--samples", args.samples, zero=True)
    metrics = run / "metrics.jsonl"
    if not run.is_dir():
        raise UserError("RF109", f"{run}: " + ("no such directory" if not run.exists() else "not a run directory (a file)"))
    if not metrics.is_file():
        raise UserError("RF109", f"{run}: not a run directory (no metrics.jsonl)")
    bad: list[str] = []
    records = _read_records(metrics, bad)
    c = _console()
    _report_summary(c, run, records, bad)
    rewards = [r["reward/mean"] for r in records if isinstance(r.get("reward/mean"), (int, float))]
    if rewards:
        c.print(f"reward  {_sparkline(rewards)}  {rewards[0]:.3f} -> {rewards[-1]:.3f}", markup=False)
    samples = run / "samples.jsonl"
    if samples.exists() and args.samples:
        c.print("last samples:", markup=False)
        for s in _read_records(samples, bad)[-args.samples:]:
            reward = f" (reward {s['reward']:g})" if isinstance(s.get("reward"), (int, float)) else ""
            c.print(f"  step {s['step']}: {s.get('prompt')!r} -> {s.get('response')!r}{reward}", markup=False)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError("RF113", f"{bad[0]}{more}; what could be read is shown above")
    return 0


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
    _positive("--threads", args.threads)
    pipeline, pg = _load_valid(args.file, args.set or [], steps=args.steps, seed=args.seed)
    out = _run_dir(args, pipeline)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlflow import rundir
    from rlflow.view import LiveView, render_graph

    rank0 = int(os.environ.get("RANK", "0")) == 0
    lock = rundir.lock(out) if rank0 else None  # held until the process ends
    if args.resume:
        _check_resume_config(out, pg.pipeline, override=args.resume_override)
    console = _console()
    if rank0 and not args.quiet:
        console.print(render_graph(pg))
    _quiet_libraries()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from rlflow.engine import Run

    view = LiveView(console, steps=pipeline.steps, enabled=rank0 and not args.quiet)
    run = Run(pipeline, pg, out, observer=view, lock=lock)
    try:
        run.setup()
        if args.resume:
            run.resume()
        run.train()
    finally:
        view.close()
        run.close()
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rlflow", description="RLHF post-training pipelines as small declarative graphs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train a pipeline")
    r.add_argument("file")
    r.add_argument("--steps", type=int, help="iterations (overrides the pipeline's)")
    r.add_argument("--seed", type=int)
    r.add_argument("--out", help="run directory (default runs/<name>-<time>)")
    r.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE", help="override a parameter (repeatable)")
    r.add_argument("--quiet", action="store_true", help="print nothing but errors")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest intact checkpoint")
    r.add_argument("--resume-override", action="store_true",
                   help="resume even though the settings differ from the run's config.json")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is steadiest on a busy machine)")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="every check that needs no model: the graph, model paths, data files")
    v.add_argument("files", nargs="+")
    v.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE", help="override a parameter in every file first")
    v.set_defaults(fn=cmd_validate)

    g = sub.add_parser("graph", help="draw the pipeline's graph")
    g.add_argument("file")
    g.add_argument("--all", action="store_true", help="every parameter and data edge")
    g.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE")
    g.set_defaults(fn=cmd_graph)

    c = sub.add_parser("compare", help="every setting that differs between pipelines (files or runs' config.json)")
    c.add_argument("files", nargs="+", help="pipeline files (.py) or runs' config.json")
    c.add_argument("--set", action="append", metavar="NAME.PARAM=VALUE", help="override a parameter in every file first")
    c.set_defaults(fn=cmd_compare)

    lst = sub.add_parser("list", help="the shipped pipelines")
    lst.set_defaults(fn=cmd_list)

    rep = sub.add_parser("report", help="timing, reward curve and samples of a run")
    rep.add_argument("run")
    rep.add_argument("--samples", type=int, default=8)
    rep.set_defaults(fn=cmd_report)

    d = sub.add_parser("docs", help="the settings tables of every node and variant, read off the code")
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
        debug = args.debug
        _default_accelerator()
        return args.fn(args)
    except UserError as e:
        if debug:
            traceback.print_exc()
        err.print(f"error: {e}", markup=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return 130
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
