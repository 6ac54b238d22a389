"""Command line: ``run_search.py`` / ``attn-search search``, ``attn-search export``, ``attn-search report``.

Exit status: 0 on success, 2 on bad input (one line saying why), 1 on an internal failure,
130 when interrupted (finished trials are kept; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from attn_search.engine.metrics import COMPUTE_OBJECTIVES
from attn_search.errors import SearchAborted, UsageError
from attn_search.search.loop import BACKENDS, PRUNERS, SEARCH_PRESETS, STRATEGIES, SearchOptions, run_search


class _Parser(argparse.ArgumentParser):
    """argparse, but bad input is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, *, low: float, strict: bool) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) above ``low`` (``strict``) or at least ``low``."""
    noun = "an integer" if kind is int else "a number"
    bound = f"> {low:g}" if strict else (f"at least {low:g}" if kind is int else f">= {low:g}")

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{value} is invalid: it must be {bound}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, Any]:
    """An argparse type: ``KEY=VALUE`` with VALUE read as YAML (``seq_len=128`` is an int)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (for example seq_len=128)")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not a number, word or list") from None


_positive_int = _number(int, low=1, strict=False)
_positive_float = _number(float, low=0, strict=True)
_non_negative_float = _number(float, low=0, strict=False)
_non_negative_int = _number(int, low=0, strict=False)


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """``--task`` and ``--task-param`` (search and record)."""
    p.add_argument("--task", help="task name (mqar, listops, selective_copy) or module:callable (default: the space's)")
    p.add_argument("--task-param", dest="task_params", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="task constructor argument, repeatable (e.g. seq_len=128; overrides the space's "
                   "task.params)")  # fmt: skip


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--space", default="sparse", help="sparse, dense, full, or a PATH.yaml of your own (default: sparse)"
    )
    p.add_argument("--strategy", default="tpe", choices=STRATEGIES, metavar="NAME",
                   help=f"proposer: {', '.join(STRATEGIES)} (default: tpe)")  # fmt: skip
    p.add_argument("--evaluator", default="training", metavar="SPEC",
                   help="training (default), table:PATH to look results up in a recorded table, or module:callable")  # fmt: skip
    p.add_argument("--pretrain", metavar="TABLE", help="ppo-grid/a2c: train the agent on a recorded table first")
    p.add_argument(
        "--pretrain-steps",
        type=_positive_int,
        default=2000,
        help="ppo-grid/a2c: env steps on the table (default: 2000)",
    )
    p.add_argument("--agent", metavar="PATH",
                   help="ppo: a meta-trained candidate policy (.zip; default: the shipped one), or none for the "
                   "untrained acquisition; ppo-grid/a2c: start from this SB3 .zip, or none to train from scratch "
                   "(the run saves agent.zip)")  # fmt: skip
    p.add_argument("--backend", default="local", choices=BACKENDS, metavar="NAME",
                   help="where trials run: local (this process, default) or ray (Ray Tune: local cores, GPUs, a cluster)")  # fmt: skip
    p.add_argument("--address", metavar="ADDR",
                   help="ray: join the cluster at auto or HOST:PORT (default: start Ray on this machine)")  # fmt: skip
    p.add_argument("--cpus-per-trial", type=_positive_float, default=1.0, metavar="X",
                   help="ray: CPUs reserved per trial (default: 1)")  # fmt: skip
    p.add_argument("--gpus-per-trial", type=_non_negative_float, metavar="F",
                   help="ray: GPUs per trial, fractions pack trials on a GPU (default: 1 if the cluster has GPUs, else 0)")  # fmt: skip
    p.add_argument("--max-concurrent", type=_positive_int, metavar="N",
                   help="ray: at most N trials at once (default: as many as resources allow)")  # fmt: skip
    p.add_argument("--population", type=_positive_int, metavar="K",
                   help="trials trained together as one fused model per slot; 1: one at a time "
                        "(default: 16 on CUDA, 1 on CPU and with --evaluator table:/module:)")  # fmt: skip
    p.add_argument(
        "--trials",
        type=_positive_int,
        help="number of trials, a total on --resume (default: from --preset: smoke 6, default 24, full 100)",
    )
    p.add_argument("--time-budget", type=_positive_float, metavar="SECONDS",
                   help="start no new trial after this many seconds (default: from --preset)")  # fmt: skip
    p.add_argument("--preset", default="default", choices=tuple(SEARCH_PRESETS), metavar="NAME",
                   help="smoke (~1 min), default (about 13 min on 2 CPU cores) or full (default: default)")  # fmt: skip
    p.add_argument("--steps", type=_positive_int, help="training steps per trial (default: from --preset)")
    p.add_argument("--confirm", type=_non_negative_int, metavar="K",
                   help="after the search, train each front point again with K more seeds; its accuracy becomes the "
                   "mean (default: 0 for --preset smoke, 1 for default, 2 for full)")  # fmt: skip
    p.add_argument("--no-attention-picture", dest="attention_picture", action="store_false",
                   help="skip the report's picture of what the chosen model attends (it trains the chosen "
                   "configuration once more after the search)")  # fmt: skip
    p.add_argument("--target-len", type=_positive_int, metavar="L",
                   help="report compute (FLOPs, latency, memory) at sequence length L, the one you deploy; accuracy "
                   "is still trained at the task's length (default: the space's target_len, else the task's length)")  # fmt: skip
    add_task_arguments(p)
    p.add_argument("--out", help="run dir (default: runs/<space>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial (default: 0)")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        metavar="NAME",
        help="auto (CUDA when torch sees one, default), cpu or cuda",
    )
    p.add_argument("--select", default="knee",
                   help="best_config.yaml rule (default: knee, the front's knee among points within 95%% of the "
                   "best accuracy; knee=F sets that floor): knee, max-accuracy, min-compute, "
                   "max-accuracy-under-flops=N (also -attn_flops=, -attn_tile_flops=, -latency=, -memory=, -params=)")  # fmt: skip
    p.add_argument("--compute", default=None, choices=(*COMPUTE_OBJECTIVES, "none"), metavar="NAME",
                   help="compute objective (default: the space's; sparse: attn_tile_flops): flops (the whole model's "
                   "analytic forward FLOPs), attn_flops (the attention products' alone, what a pattern changes), "
                   "attn_tile_flops (those products over the 128-tiles FlexAttention computes on a GPU), "
                   "latency, memory, params, or none (accuracy only)")  # fmt: skip
    p.add_argument(
        "--max-flops",
        type=_positive_float,
        help="constraint: the whole model's forward FLOPs per sequence (flops) at most this (default: none)",
    )
    p.add_argument(
        "--max-latency-ms", type=_positive_float, help="constraint: forward latency in ms at most this (default: none)"
    )
    p.add_argument("--pruner", choices=PRUNERS, metavar="NAME",
                   help="early stopping: moasha (default with two objectives), asha (default with one), median, none")  # fmt: skip
    p.add_argument("--eta", type=float, default=3.0, help="successive-halving reduction factor (default: 3)")
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite in the run dir); runs can share one")
    p.add_argument("--study-name", metavar="NAME", help="the run's study in --storage (default: from the run dir)")
    p.add_argument("--quiet", action="store_true", help="print nothing (default: one line per trial and a summary)")


def _options(args: argparse.Namespace) -> SearchOptions:
    fields = SearchOptions.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["task_params"] = dict(args.task_params) if args.task_params else None
    return SearchOptions(**values)


def search_main(argv: Sequence[str] | None = None, *, prog: str = "run_search.py") -> int:
    parser = _Parser(prog=prog, description="Search attention configurations for the accuracy/compute Pareto front.")
    add_search_arguments(parser)
    args = parser.parse_args(argv)
    return _run(lambda: run_search(_options(args)), prog, bad_input=(UsageError,))


def _run(fn: object, prog: str, *, bad_input: tuple[type[Exception], ...] = (UsageError, ValueError)) -> int:
    """Run a command: bad input is one line and exit 2, a search stopped by the failure policy one
    line and exit 1, Ctrl-C exit 130. For ``search`` only :class:`UsageError` is bad input: a
    ``ValueError`` from deep inside a running search is an internal failure (exit 1, traceback)."""
    import warnings

    import optuna

    # Optuna's experimental/accuracy notes are for library users; the CLI reports what matters.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module="optuna")
    import os

    if os.getcwd() not in sys.path and "" not in sys.path:
        # `--task mymodule:fn` (and --evaluator) finds mymodule.py in the current directory, as
        # `python -m` would; a console script's sys.path does not hold it
        sys.path.insert(0, os.getcwd())
    try:
        fn()  # type: ignore[operator]
    except bad_input as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except SearchAborted as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; finished trials are saved, continue with --resume", file=sys.stderr)
        return 130
    return 0


def _confirm(args: argparse.Namespace) -> None:
    from attn_search.confirm import confirm_scale, confirm_seeds

    if args.seq_len is None:
        if any(v is not None for v in (args.d_model, args.n_layers, args.steps, args.top)):
            raise ValueError("--d-model, --n-layers, --steps and --top belong to the scale check: add --seq-len L")
        confirm_seeds(args.run_dir, seeds=args.seeds, device=args.device)
    else:
        confirm_scale(args.run_dir, seq_len=args.seq_len, d_model=args.d_model, n_layers=args.n_layers,
                      steps=args.steps, top=args.top, device=args.device)  # fmt: skip
    print(f"rewrote the outputs of {args.run_dir} (report.html)")


def _meta_train(args: argparse.Namespace) -> str:
    import time
    from pathlib import Path

    from attn_search.search.space import load_space
    from attn_search.strategies.agent import meta_train

    missing = [t for t in args.tables if not Path(t).is_file()]
    if missing:
        raise UsageError(f"--tables: no such table: {', '.join(missing)}")
    try:
        space = load_space(args.space)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    kind = "the candidate policy (--strategy ppo)" if args.kind == "policy" else "the grid agent (--strategy ppo-grid)"
    print(f"meta-training {kind} on {len(args.tables)} table(s) for {args.steps} environment steps", flush=True)
    start = time.perf_counter()
    try:
        if args.kind == "policy":
            from attn_search.strategies import candidates
            from attn_search.strategies.head import add_head

            candidates.meta_train(args.tables, steps=args.steps, seed=args.seed, out=args.out)
            add_head(args.out, args.tables)
        else:
            meta_train(args.tables, space, steps=args.steps, seed=args.seed, out=args.out)
    except (ValueError, KeyError) as exc:
        raise UsageError(str(exc)) from exc
    out = Path(args.out).with_suffix(".zip")
    return f"wrote {out} and {out.with_suffix('.json')} in {time.perf_counter() - start:.0f} s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="attn-search", description="attn_search: accuracy/compute optimal attention configurations.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p_search = sub.add_parser("search", help="run a search (same flags as run_search.py)")
    add_search_arguments(p_search)
    p_export = sub.add_parser("export", help="export the chosen configuration of a run")
    p_export.add_argument("run_dir")
    p_export.add_argument("--format", default="yaml", choices=("yaml", "json", "python"), metavar="NAME",
                          help="yaml, json or python (a self-contained torch module)")  # fmt: skip
    p_export.add_argument("--select", help="selection rule (default: the run's); it becomes the run's rule")
    p_export.add_argument("--out", help="file to write (default: in the run dir)")
    p_report = sub.add_parser("report", help="rebuild a run's tables, plots and report.html")
    p_report.add_argument("run_dir")
    p_report.add_argument("--select", help="selection rule for best_config.yaml (default: the run's); it becomes "
                          "the run's rule, so a later export agrees")  # fmt: skip
    p_record = sub.add_parser("record", help="train every configuration of a discretised space into a table")
    p_record.add_argument("--space", default="sparse", help="space name or PATH.yaml")
    p_record.add_argument("--out", required=True, help="table to write (CSV); the work dir is OUT.run")
    p_record.add_argument("--bins", type=_positive_int, default=3, help="values per numeric parameter (default: 3)")
    p_record.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                          help="replace a parameter's grid values (repeatable; one value pins it)")  # fmt: skip
    p_record.add_argument("--preset", default="smoke", choices=tuple(SEARCH_PRESETS), metavar="NAME")
    p_record.add_argument("--steps", type=_positive_int, help="training steps per configuration")
    add_task_arguments(p_record)
    p_record.add_argument("--seed", type=int, default=0)
    p_record.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), metavar="NAME")
    p_record.add_argument("--target-len", type=_positive_int, metavar="L",
                          help="count compute at sequence length L (default: the task's, whatever the space's "
                          "target_len: meta-training and replays read a table's compute at its task's length)")  # fmt: skip
    p_record.add_argument("--resume", action="store_true", help="continue an interrupted recording")
    p_record.add_argument("--quiet", action="store_true")
    p_meta = sub.add_parser("meta-train", help="meta-train PPO on recorded tables (how the shipped agent is made: "
                            "make agent)")  # fmt: skip
    p_meta.add_argument("--kind", default="policy", choices=("policy", "grid"),
                        help="policy: the candidate policy of --strategy ppo, for any space (default); grid: the "
                        "MultiDiscrete agent of --strategy ppo-grid, on the tables' grid")  # fmt: skip
    p_meta.add_argument("--tables", nargs="+", required=True, metavar="CSV",
                        help="recorded tables of one grid (attn-search record)")  # fmt: skip
    p_meta.add_argument("--out", required=True, help="agent to write (.zip, with its grid in a .json beside it)")
    p_meta.add_argument("--space", default="sparse", help="the space the tables were recorded on (default: sparse)")
    p_meta.add_argument("--steps", type=_positive_int, default=100_000,
                        help="environment steps in all (default: 100000, the shipped agent's)")  # fmt: skip
    p_meta.add_argument("--seed", type=int, default=0)
    p_confirm = sub.add_parser("confirm", help="retrain a finished run's front with more seeds, or at a larger scale")
    p_confirm.add_argument("run_dir")
    p_confirm.add_argument("--seeds", type=_positive_int, default=2,
                           help="more seeds per front point (default: 2); the front and selection use the mean")  # fmt: skip
    p_confirm.add_argument("--seq-len", type=_positive_int, metavar="L",
                           help="scale check instead: train the front at sequence length L and report Kendall's tau "
                           "between the proxy's and the scale's accuracies")  # fmt: skip
    p_confirm.add_argument("--d-model", type=_positive_int, help="scale check: model width (default: the run's)")
    p_confirm.add_argument("--n-layers", type=_positive_int, help="scale check: layers (default: the run's)")
    p_confirm.add_argument("--steps", type=_positive_int, help="scale check: training steps (default: the run's)")
    p_confirm.add_argument("--top", type=_positive_int, metavar="K",
                           help="scale check: only the K most accurate front points (default: the whole front)")  # fmt: skip
    p_confirm.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), metavar="NAME",
                           help="auto (default), cpu or cuda")  # fmt: skip
    args = parser.parse_args(argv)
    prog = f"attn-search {args.command}"
    if args.command == "confirm":
        return _run(lambda: _confirm(args), prog)
    if args.command == "meta-train":
        return _run(lambda: print(_meta_train(args)), prog, bad_input=(UsageError,))
    if args.command == "record":
        from attn_search.record import record

        def do_record() -> None:
            print(record(args.space, args.out, bins=args.bins, grid=args.grid, preset=args.preset, steps=args.steps,
                         task=args.task, task_params=dict(args.task_params or []), seed=args.seed, device=args.device, target_len=args.target_len, resume=args.resume, quiet=args.quiet,
                         argv=list(argv) if argv is not None else None))  # fmt: skip

        return _run(do_record, prog)
    if args.command == "search":
        return _run(lambda: run_search(_options(args)), prog, bad_input=(UsageError,))
    if args.command == "export":
        from attn_search.export import export_run

        def do_export() -> None:
            print(export_run(args.run_dir, fmt=args.format, select=args.select, out=args.out))

        return _run(do_export, prog)
    from attn_search.report.outputs import rebuild

    return _run(lambda: print(rebuild(args.run_dir, select=args.select)), prog)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
