"""Shared command-line front end: ``--mode``, ``--config``, ``key=value`` overrides, ``--dry-run``.

A mode names the stages it runs; every key those stages read is validated before the first one starts
(docs/design.md §9), so a bad value of a late stage never costs the early stages' time. Bad input
reaches the user as one sentence and exit status 2, never as a traceback; Ctrl-C and SIGTERM stop
after saving what can be saved, with exit status 130.
"""
import argparse
import contextlib
import dataclasses
import os
import signal
import sys
from typing import Callable, Optional

from . import config
from .config_keys import KEYS, accepted_text
from .errors import UserError


@dataclasses.dataclass(frozen=True)
class Mode:
    help: str
    stages: tuple
    run: Callable  # run(cfg)
    plan: Optional[Callable] = None  # plan(cfg) -> lines that --dry-run prints
    many_processes: bool = False  # the stages share their work between torchrun's processes (docs/design.md §16)


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


def main(prog, description, modes, default_mode="generate", argv=None):
    """Parse, resolve and validate the config, print it, and run (or, with --dry-run, plan) the mode."""
    parser = build_parser(prog, description, modes, default_mode)
    args = parser.parse_intermixed_args(argv)  # key=value may follow --dry-run or --mode
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    mode = modes[args.mode]
    ranks = _process_group()
    try:
        with ranks.together() if ranks else contextlib.nullcontext():
            cfg = config.resolve(args.config, args.overrides)
            config.validate(cfg, mode.stages)
            if ranks and ranks.world() > 1 and not mode.many_processes:
                raise UserError(f"--mode {args.mode} runs in one process so far (docs/design.md §8); launch it with "
                                f"python, or torchrun --nproc_per_node=1")
        if ranks is None or ranks.is_main():
            print(f"[config] mode={args.mode} from {config.source_of(args.config)}\n{config.to_json(cfg)}", flush=True)
        if args.dry_run:
            for line in (mode.plan(cfg) if mode.plan else [f"would run {args.mode}: {mode.help}"]):
                print(f"[dry-run] {line}")
            return 0
        mode.run(cfg)
        if ranks:
            ranks.wait_for_all()
    except UserError as err:
        if not (ranks and isinstance(err, ranks.RankFailed)):  # rank 0 says it once for every rank
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: what was complete is kept (training saved a checkpoint); rerun the same command to "
              "continue", file=sys.stderr)
        return 130
    finally:
        if ranks:
            ranks.finish()
    return 0


def _process_group():
    """The distributed module with this process in its group when torchrun launched it, else None; torch is only
    imported then (a plain launch answers --help and a refused config without it)."""
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return None
    from . import distributed
    distributed.init()
    return distributed
