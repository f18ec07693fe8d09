"""Ctrl-C and SIGTERM in a training loop of several processes: every rank stops at the same step boundary.

One process stops where the signal finds it (cli turns SIGTERM into KeyboardInterrupt) and saves its last
complete step. Ranks of a group cannot: a rank that stops between two collectives leaves the others blocked in
one that now fails, and rank 0, the one that writes checkpoints, may be among them (docs/design.md §16). So
inside ``step_boundaries()`` of a group of more than one rank the signals only note the request; at every step
boundary ``check()`` asks all ranks at once (one small gather) and, when any rank was asked to stop, every
rank raises KeyboardInterrupt there, after the same step, and the loop's usual save-on-interrupt runs.
"""
import contextlib
import signal

from . import distributed

_requested = False


def _note(signum, frame):
    global _requested
    _requested = True


@contextlib.contextmanager
def step_boundaries():
    """Around a loop that calls ``check()`` after each step: SIGTERM and SIGINT (unless ignored, as the
    launcher's workers ignore it) are deferred to the next boundary when several ranks train together."""
    global _requested
    if distributed.world() <= 1:
        yield
        return
    _requested = False
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig, handler in kept.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _note)
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def check() -> None:
    """At a step boundary, on every rank: raise KeyboardInterrupt on all of them when any was asked to stop."""
    if distributed.world() <= 1:
        return
    if any(distributed.gather(_requested)):  # an object gather: works on gloo and NCCL alike
        raise KeyboardInterrupt
