"""`distill` command line: train, eval, report, precompute, generate, serve, demo.

    distill train --config configs/smoke.yaml [section.key=value ...]
    distill eval  --config configs/demo.yaml --model student=runs/demo/kd/final [--model ...]
    distill eval  --model teacher=runs/demo/teacher/final --model student=runs/demo/student_kd/final
    distill report runs/smoke [runs/other ...]          # PNG plots + report.md
    distill precompute --config configs/smoke.yaml distill.store=stores/smoke   # offline teacher targets
    distill verify-store stores/smoke
    distill generate --config configs/generate.yaml generate.store=stores/samples   # the teacher's own samples
    distill serve --config configs/smoke.yaml serve.port=0 serve.address_file=server.url   # docs/serving.md
    distill demo                       # teacher, distilled student and CE-only student on the built-in corpus

`python train.py ...` and `accelerate launch train.py ...` take the same arguments as `distill train`.
Mistakes in config, data or launch, and failed writes (a full disk), print one line (`error: ...`) and exit with
status 2; a run stopped by SIGTERM/SIGUSR1 exits 75 and by Ctrl-C 130, after checkpointing (docs/robustness.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from . import lock
from .config import describe, load_config
from .errors import DistillError, Preempted, RankError, ReportedElsewhere

# Each command imports its module when it runs: the trainer, evaluation and precompute pull in transformers,
# datasets, Accelerate and DeepSpeed (seconds), which a config mistake or `--help` never needs.


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. train.max_steps=20"
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # config mistakes fail before the heavy imports
    # A second job on the same output_dir stops here, in a fraction of a second (the lock is held for this
    # process's life; the trainer shares it with the other ranks).
    lock.acquire_early(cfg.output_dir, "output_dir")
    from .trainer import train

    result = train(cfg)
    if result and _main_process():
        print(json.dumps({"output_dir": cfg.output_dir, **result}))
    return 0


def _main_process() -> bool:
    """After a run: whether this is the main process (the result line is printed once, not once per rank)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def cmd_eval(args: argparse.Namespace) -> int:
    named = {}
    for item in args.model or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DistillError(f"--model {item!r} must look like NAME=DIR")
        if name in named:
            raise DistillError(f"--model {name}=... is given twice; give each model its own name")
        named[name] = path
    out = Path(args.json)
    check_output_file(out, "--json")  # before the evaluation, not after it
    from .eval.evaluate import eval_config, evaluate_models, format_table, write_rows

    cfg = eval_config(args.config, args.overrides, named)  # distill.cross_tokenizer too: span metrics (docs/eval.md)
    rows = evaluate_models(cfg, named)
    if _main_process():
        print(format_table(rows))
        try:
            write_rows(rows, out)
        except OSError as e:  # checked before, but the disk may have filled up since: the rows are not lost
            print(json.dumps(rows, indent=2))
            print(f"could not write --json {out} ({(e.strerror or str(e)).lower()}): the rows are printed above")
            return 2
        print(f"wrote {out}")
    return 0


def only_train_crosses(cfg, command: str):
    """distill.cross_tokenizer is built for `distill train`, `distill eval`, and the stores students of another
    tokenizer read (`distill precompute`, `distill generate`); `distill serve` refuses it in one line before any
    work (docs/cross_tokenizer.md, what is built)."""
    if cfg.distill.cross_tokenizer is not None:
        raise DistillError(
            f"distill {command} with distill.cross_tokenizer: not supported yet; a teacher with another tokenizer "
            "trains and validates through `distill train` (docs/cross_tokenizer.md)"
        )
    return cfg


def cmd_report(args: argparse.Namespace) -> int:
    from .eval.report import default_out, report

    run_dirs = [Path(d) for d in args.run_dir]
    out = Path(args.out) if args.out else default_out(run_dirs)
    check_output_dir(out, "--out" if args.out else "the report directory (--out)")
    print(report(run_dirs, out, wandb=not args.no_wandb))
    return 0


def check_output_file(path: Path, what: str) -> None:
    """A file a command writes when its work is done (its directory created if missing): refused now, before the
    work, if it cannot be written."""
    if path.is_dir():
        raise DistillError(f"{what} {path} is a directory; give a file name")
    check_output_dir(path.parent, what, path)


def check_output_dir(path: Path, what: str, target: Path | None = None) -> None:
    """A directory a command writes into (created if missing): refused now if a file stands in its way or it cannot
    be written. `target`: the file to be written there (named in the message instead)."""
    named = f"{what} {target or path}"
    for p in (path, *path.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            raise DistillError(f"{named} cannot be written: {p} is a file, not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise DistillError(f"{named} cannot be written: {p} is not writable")
        return


def cmd_precompute(args: argparse.Namespace) -> int:
    from .precompute import precompute

    return _write_store(precompute, args)


def _write_store(write, args: argparse.Namespace) -> int:
    """`distill precompute` and `distill generate`: write the store, print the result line once."""
    # distill.cross_tokenizer: both write a store in the teacher's tokenization, which students of any tokenizer
    # read through the alignment (cross_store.py, cross_samples.py)
    result = write(load_config(args.config, args.overrides))
    if _main_process():
        print(json.dumps(result))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_store

    return _write_store(generate_store, args)


def cmd_verify_store(args: argparse.Namespace) -> int:
    from .store import verify_store

    print(verify_store(args.store_dir))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = only_train_crosses(load_config(args.config, args.overrides), "serve")
    from .serve import serve

    return serve(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.output_dir), args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distill (or CE-train) a student", description="Train a student from a config.")
    _add_config_args(p)
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="validation loss, teacher-relative and generation metrics of models on the same data (docs/eval.md)",
    )
    _add_config_args(p)
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME=PATH",
        help="a model directory (e.g. an exported run/final) to evaluate (repeatable); default: the config's student "
        "and teacher. Without --config: the built-in corpus, and the model named `teacher` is the reference",
    )
    p.add_argument("--json", default="eval.json", help="write the rows as JSON to this file (default: eval.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "precompute",
        help="run the teacher over the data once and write its top-k targets to distill.store",
        description="Write an offline logit store (see docs/store.md); rerun the same command to resume.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser(
        "generate",
        help="sample the teacher's completions of the data's prompts into generate.store",
        description="Write a sample store (see docs/generate.md); rerun the same command to resume.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("verify-store", help="check a logit or sample store: manifest, checksums, rows, hashes")
    p.add_argument("store_dir", metavar="DIR")
    p.set_defaults(func=cmd_verify_store)

    p = sub.add_parser(
        "report",
        help="plots (PNG) and a Markdown summary of one or more run directories, finished or still running",
    )
    p.add_argument("run_dir", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="where the PNGs and report.md go; default: RUN_DIR/report (one run) or report/")
    p.add_argument(
        "--no-wandb",
        action="store_true",
        help="do not log the plots to the runs' wandb runs (those whose config has wandb on)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "serve",
        help="serve the config's teacher over HTTP (teacher.engine=remote clients; docs/serving.md)",
        description="Serve the teacher until SIGTERM/SIGINT; under torchrun a zero3 teacher across its ranks.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="teacher, distilled student and CE-only student on the built-in corpus")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides applied to every phase")
    p.set_defaults(func=cmd_demo)
    return parser


def end_process_group() -> None:
    """Destroy the process group once every rank is done with it, as torch.distributed's shutdown rule asks: after a
    command that finished, or a stop all ranks agreed on. Not after an error: a rank still waiting in a collective
    would make the destroy hang. (It does not stop gloo's worker threads; `leave` deals with those.)
    torch.distributed is looked up, not imported: a command that never used it skips the import."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """Exit with `code`; the entry points' last call. A rank of a multi-process launch (`lock.launcher_world_size`)
    leaves by `os._exit` once its output is flushed, without interpreter finalization: gloo's worker threads
    outlive `destroy_process_group` (a core dump of an aborted rank shows them running after it), and one that
    drops a finished collective's tensors while the interpreter finalizes needs the GIL, is ended by
    `pthread_exit` inside a C++ destructor and aborts the process ("terminate called without an active
    exception", SIGABRT; pytorch#179291): a finished run failed. Nothing is lost: trackers, checkpoints, the export
    and metrics are closed before this, and the OS releases the run lock."""
    if lock.launcher_world_size()[1] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def run(argv: list[str] | None = None) -> NoReturn:
    """The `distill` script and `python -m distributed_distill.cli`."""
    leave(main(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "help_config", False):
        print("\n".join(describe()))
        return 0
    try:
        code = args.func(args)
        end_process_group()
        return code
    except ReportedElsewhere:
        return 2  # the main process prints it
    except DistillError as e:
        # One line per job: every rank checks the same config, data and models and meets the same refusal; rank 0
        # says it. A rank that fails on its own (RankError) says so itself.
        if lock.launch_rank() == 0 or isinstance(e, RankError):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        end_process_group()  # every rank agreed to stop at this step (checkpoint.py), so none is left in a collective
        print(e, file=sys.stderr)  # "preempted at step N: checkpoint ... written; ..."
        if e.exit_code == 130:
            # Interpreter shutdown resets Python signal handlers to the default, under which a second Ctrl-C during
            # shutdown (torch's takes a moment) killed the process by SIGINT (-2, not 130); an ignored one stays so.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which turns it into a checkpoint): no traceback
        print("interrupted", file=sys.stderr)
        return 130


def train_main(argv: list[str] | None = None) -> int:
    """Entry for the root `train.py`: the arguments of `distill train`."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    run()
