"""Shared command-line front end: ``--mode``, ``--config``, ``key=value`` overrides, ``--dry-run``.

Bad input reaches the user as one sentence and exit status 2, never as a traceback; Ctrl-C and
SIGTERM stop after saving what can be saved, with exit status 130.
"""
import argparse
import signal
import sys

from . import config
from .errors import UserError


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def build_parser(prog, description, modes, default_mode):
    lines = "\n".join(f"  {name:<10} {text}" for name, (text, _) in modes.items())
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"modes:\n{lines}\n\npresets: {', '.join(config.preset_names())}\n"
               f"keys: every key of pipeline/config.py DEFAULTS, as key=value")
    parser.add_argument("--mode", choices=list(modes), default=default_mode, help=f"stage to run (default {default_mode})")
    parser.add_argument("--config", default="fashion_mnist", help="preset name or path to a .toml/.json config")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and plan, then exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(prog, description, modes, default_mode="generate", argv=None):
    """Parse, resolve the config, print it, and run the mode's function ``fn(cfg, dry_run)``."""
    parser = build_parser(prog, description, modes, default_mode)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        cfg = config.resolve(args.config, args.overrides)
        print(f"[config] mode={args.mode} from {config.source_of(args.config)}\n{config.to_json(cfg)}", flush=True)
        modes[args.mode][1](cfg, args.dry_run)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: progress so far is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
