"""Shared command-line front end: ``--mode``, ``--config``, ``key=value`` overrides, ``--dry-run``.

A mode names the stages it runs; every key those stages read is validated before the first one starts
(docs/design.md §9), so a bad value of a late stage never costs the early stages' time. Bad input
reaches the user as one sentence and exit status 2, never as a traceback; Ctrl-C and SIGTERM stop
after saving what can be saved, with exit status 130. A plain launch may run its stages as worker processes of
one torch.distributed group (key ``procs``, pipeline/core/launch.py); under torchrun the ranks are already there.
"""
import argparse
import contextlib
import dataclasses
import os
import signal
import sys
from typing import Callable, Optional

from .core import config, launch
from .core.config_keys import KEYS, accepted_text
from .core.errors import AlreadySaid, UserError


@dataclasses.dataclass(frozen=True)
class Mode:
    help: str
    stages: tuple
    run: Optional[Callable]  # run(cfg); None: the mode runs the modes named by its stages, in turn (--mode all)
    plan: Optional[Callable] = None  # plan(cfg) -> lines that --dry-run prints
    many_processes: bool = False  # the stages share their work between torchrun's processes (docs/design.md §16)
    before: Optional[Callable] = None  # before(cfg): checks of a mode of several stages, before the first starts


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def key_lines(stages) -> list:
    """One line per key the stages read, grouped by the table's sections: what --help prints."""
    lines, section = [], None
    for name in config.keys_of(stages):
        spec = KEYS[name]
        if spec.section != section:
            section = spec.section
            lines.append(f"\n  [{section}]")
        lines.append(f"  {name} = {spec.default!r}  ({accepted_text(spec, ' | ')}) {spec.help}")
    return lines


def build_parser(prog, description, modes, default_mode):
    mode_lines = "\n".join(f"  {name:<10} {mode.help}" for name, mode in modes.items())
    stages = sorted({s for mode in modes.values() for s in mode.stages})
    keys = "\n".join(key_lines(stages))
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"modes:\n{mode_lines}\n\npresets: {', '.join(config.preset_names())}\n\n"
               f"keys (key=value; docs/config.md has the same table):{keys}")
    parser.add_argument("--mode", choices=list(modes), default=default_mode, help=f"stage to run (default {default_mode})")
    parser.add_argument("--config", default="fashion_mnist", help="preset name or path to a .toml/.json config")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and print the resolved config and plan, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(prog, description, modes, default_mode="generate", argv=None, script=None):
    """Parse, resolve and validate the config, print it, and run (or, with --dry-run, plan) the mode. ``script``
    (the entry point's file) lets a plain launch run stages as worker processes (key ``procs``,
    pipeline/core/launch.py)."""
    parser = build_parser(prog, description, modes, default_mode)
    args = parser.parse_intermixed_args(argv)  # key=value may follow --dry-run or --mode
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    worker = launch.become_worker()
    code = _run_mode(args, modes, script, worker=worker)
    if not launch.torchrun_launched():
        return code
    # A rank (of torchrun or of our launcher) ends here without tearing its process group down: every rank has
    # passed the closing barrier (or failed together with the others), and gloo's C++ teardown, in
    # destroy_process_group or at interpreter exit, now and then aborts a process (SIGABRT, "terminate called
    # without an active exception") after the work and its one sentence are done; the kernel closes the sockets.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_mode(args, modes, script, worker: bool) -> int:
    """The exit status of the mode run (or planned) with the config resolved and validated."""
    mode = modes[args.mode]
    ranks = _process_group(worker)
    try:
        with ranks.together() if ranks else contextlib.nullcontext():
            cfg = config.resolve(args.config, args.overrides)
            config.validate(cfg, mode.stages)
            if ranks and ranks.world() > 1 and not mode.many_processes:
                raise UserError(f"--mode {args.mode} runs in one process so far (docs/design.md §8); launch it with "
                                f"python, or torchrun --nproc_per_node=1")
        workers = launch.plan(cfg, _parts(args.mode, mode)) if script else {}
        if (ranks is None or ranks.is_main()) and not worker:
            print(f"[config] mode={args.mode} from {config.source_of(args.config)}\n{config.to_json(cfg)}", flush=True)
            said = launch.describe(cfg, workers)
            if said:
                print(said, flush=True)
        if args.dry_run:
            for line in (mode.plan(cfg) if mode.plan else [f"would run {args.mode}: {mode.help}"]):
                print(f"[dry-run] {line}")
            return 0
        _run(args, mode, modes, cfg, workers, script)
        if ranks:
            ranks.wait_for_all()
    except UserError as err:
        if not isinstance(err, AlreadySaid):  # rank 0 of the group says it once for every rank
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not worker:
            print("\ninterrupted: what was complete is kept (training saved a checkpoint); rerun the same command to "
                  "continue", file=sys.stderr)
        return 130
    return 0


def _parts(name, mode) -> tuple:
    """The modes a command runs in turn: the mode itself, or, for a mode without its own run, its stages."""
    return (name,) if mode.run else mode.stages


def _run(args, mode, modes, cfg, workers, script):
    """Each part in this process, or as worker processes where ``workers`` says more than one (each stage its own
    group, so a stage that gains nothing from them, eval_d, runs alone in between)."""
    if mode.before:
        mode.before(cfg)
    for part in _parts(args.mode, mode):
        if workers.get(part, 1) > 1:
            launch.run_workers(cfg, script, ["--mode", part, "--config", args.config, *args.overrides],
                               workers[part], part)
        else:
            modes[part].run(cfg)


def _process_group(worker: bool):
    """The distributed module with this process in its group when torchrun (or our launcher: ``worker``) started
    it, else None; torch is only imported then (a plain launch answers --help and a refused config without it)."""
    if not launch.torchrun_launched():
        return None
    from .core import distributed
    try:
        distributed.init()
    except Exception as err:  # gloo and the store raise RuntimeError, ValueError, TimeoutError...
        if not worker:
            raise
        launch.join_failed(err)
    return distributed
