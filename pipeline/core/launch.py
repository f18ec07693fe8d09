"""Worker processes started by a plain ``python Main_Distill.py`` launch (key ``procs``, docs/design.md §16).

On a 2-core CPU two single-thread processes run generate, train_d and binarize faster than one process with two
threads (on every CPU kind measured at full size: README, "Many processes"), so ``procs=0`` (auto, the default)
starts two on a CPU-only machine of two or more cores, and ``procs=N`` always starts N. A plain launch runs those
stages as workers of one torch.distributed group: the same code paths that torchrun runs, with the environment
torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS). This module
decides how many workers a stage gets, starts and watches them, and turns their exit statuses into what the user
reads: the sentence of a worker's ``UserError`` is printed by rank 0 alone (``distributed.together``), any other
failure becomes one sentence here.

The workers die with the launcher: each asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), so
even a SIGKILLed launcher leaves none behind; Ctrl-C and SIGTERM reach the launcher only, which passes SIGTERM on,
waits for the checkpoints the workers save, and prints the one "interrupted" line. Every stage resumes from what
it wrote, so rerunning the same command continues. torch is imported here only to ask whether CUDA is there.
"""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .config_keys import KEYS
from .errors import AlreadySaid, UserError

LAUNCHER_PID = "PIPELINE_LAUNCHER_PID"  # set in a worker's environment: the pid of the launcher it must die with
AUTO_STAGES = ("generate", "train_d", "binarize")  # eval_d measured almost no gain from two (issue 28)
AUTO_WORKERS = 2
JOIN_FAILED = 3  # a worker's exit status when it could not join the group (the launcher says why)
INTERRUPTED = 130
FAILURE_GRACE_S = 10  # after one worker fails, the time the others get to end on their own (they fail together)
STOP_GRACE_S = 60  # after SIGTERM, the time a worker gets to save its checkpoint before SIGKILL
POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def torchrun_launched() -> bool:
    """RANK and WORLD_SIZE set: torchrun (or our launcher) started this process, which then never launches."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which taskset and container cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity outside Linux
        return os.cpu_count() or 1


def gpu_in_use(cfg) -> bool:
    """Whether the stages would run on a GPU; torch is imported only when ``device=auto`` leaves it open."""
    if cfg["device"] != "auto":
        return cfg["device"].startswith("cuda")
    import torch
    return torch.cuda.is_available()


def plan(cfg, stages) -> dict:
    """How many worker processes each stage gets, in order; 1 means it runs in this process. ``procs=0`` (auto)
    gives AUTO_WORKERS to AUTO_STAGES on a CPU-only machine of at least that many cores; ``procs=N`` gives N to
    every stage that reads the key. Under torchrun nothing is launched: the ranks are already there."""
    single = {stage: 1 for stage in stages}
    if torchrun_launched() or cfg["procs"] == 1:
        return single
    chosen = [s for s in stages if s in KEYS["procs"].stages and (cfg["procs"] > 1 or s in AUTO_STAGES)]
    if not chosen:
        return single
    count = cfg["procs"] or (AUTO_WORKERS if _room_for_workers(cfg) else 1)
    return {stage: count if stage in chosen else 1 for stage in stages}


def _room_for_workers(cfg) -> bool:
    """A CPU-only machine of at least AUTO_WORKERS cores."""
    return usable_cores() >= AUTO_WORKERS and not gpu_in_use(cfg)


def threads_per_worker(cfg, count: int) -> int:
    """``num_threads`` where set, else the cores shared out: one thread each on a 2-core CPU."""
    return cfg["num_threads"] or max(1, usable_cores() // count)


def _names(stages) -> str:
    return stages[0] if len(stages) == 1 else f"{', '.join(stages[:-1])} and {stages[-1]}"


def describe(cfg, workers: dict):
    """The one line that says what runs how, or None when everything runs in this process as the user asked."""
    many = [stage for stage, count in workers.items() if count > 1]
    if not many:
        return None
    count = workers[many[0]]
    threads = threads_per_worker(cfg, count)
    alone = [stage for stage, n in workers.items() if n == 1]
    return (f"[procs] {_names(many)} {'runs' if len(many) == 1 else 'run'} as {count} worker processes of "
            f"{threads} thread{'s' if threads > 1 else ''} each (torch.distributed, {usable_cores()} cores)"
            + (f", {_names(alone)} in this process" if alone else "")
            + "; procs=1 runs every stage in this one process")


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now, for the group's rendezvous (rank 0 binds it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_environment(cfg, rank: int, count: int, port: int) -> dict:
    """What torchrun would give rank ``rank`` of ``count`` on this machine, and the launcher's pid."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count), LOCAL_WORLD_SIZE=str(count),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS=str(threads_per_worker(cfg, count)), PYTHONUNBUFFERED="1")
    env[LAUNCHER_PID] = str(os.getpid())
    if sys.platform.startswith("linux") and os.path.isdir("/sys/class/net/lo"):
        # all workers are on this machine: gloo then needs no resolvable hostname
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def run_workers(cfg, script, argv, count: int, stage: str) -> None:
    """Run ``script argv`` as ``count`` workers of one group and wait for them; raise what the user must read:
    AlreadySaid after a worker's UserError (rank 0 printed it), KeyboardInterrupt when a worker was interrupted,
    UserError for any other failure."""
    port = free_port()
    workers = []
    try:
        for rank in range(count):
            workers.append(subprocess.Popen([sys.executable, str(script), *argv],
                                            env=worker_environment(cfg, rank, count, port)))
        first_failure = wait_for(workers)
    except OSError as err:
        raise UserError(f"could not start {count} worker processes for {stage} ({err}); set procs=1 to run it in "
                        f"this one process") from None
    finally:
        stop(workers)
    if first_failure is not None:
        raise failure(*first_failure, count=count, stage=stage, port=port)


def wait_for(workers) -> tuple:
    """Wait until every worker ended; return (rank, exit status) of the first that failed, or None. Once one
    failed the others get FAILURE_GRACE_S to end by themselves (an error raised through ``together`` ends every
    rank at once), then they are stopped."""
    first_failure, failed_at = None, None
    while True:
        codes = [worker.poll() for worker in workers]
        if first_failure is None:  # before the check below: often every worker fails between two polls
            first_failure = next(((rank, code) for rank, code in enumerate(codes) if code not in (None, 0)), None)
            failed_at = time.monotonic() if first_failure else None
        if None not in codes:
            return first_failure
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
            stop(workers)
            return first_failure
        time.sleep(POLL_S)


def stop(workers) -> None:
    """SIGTERM to the workers still running (they save a checkpoint and end), SIGKILL to those that outlast
    STOP_GRACE_S or a second Ctrl-C; return once none runs."""
    running = [worker for worker in workers if worker.poll() is None]
    for worker in running:
        worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        while any(worker.poll() is None for worker in running) and time.monotonic() < deadline:
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: the user wants it over now
    finally:
        for worker in running:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def failure(rank: int, code: int, count: int, stage: str, port: int) -> BaseException:
    """What a worker's exit status means to the user."""
    if code == 2:
        return AlreadySaid(f"worker {rank} of {stage} refused its work")
    if code in (INTERRUPTED, -signal.SIGTERM, -signal.SIGINT):
        return KeyboardInterrupt()
    if code == JOIN_FAILED:
        return UserError(f"the {count} worker processes of {stage} could not join one torch.distributed group on "
                         f"127.0.0.1:{port} (the reason is above); rerun, or set procs=1 to run it in this one process")
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return UserError(f"worker process {rank} of {count} ({stage}) ended with {how} (its messages are above); rerun "
                     f"the same command to resume, or set procs=1 to run it in this one process")


def become_worker() -> bool:
    """In a process this launcher started: die with the launcher, leave Ctrl-C to it, and return True."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not torchrun_launched():
        return False
    die_with(int(launcher))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches the launcher, which sends SIGTERM
    return True


def die_with(launcher_pid: int) -> None:
    """SIGKILL this process when the launcher dies, however it dies: the kernel does it (PR_SET_PDEATHSIG) on
    Linux, a watching thread elsewhere. A launcher that died before this call is noticed by its pid."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl outside Linux
        armed = False
    if not armed:
        threading.Thread(target=_watch, args=(launcher_pid,), daemon=True).start()
    if os.getppid() != launcher_pid:
        os._exit(INTERRUPTED)


def _watch(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


def join_failed(err: Exception) -> None:
    """End a worker that could not join the group: the reason on one line, the launcher's sentence after it."""
    print(f"[procs] worker {os.environ.get('RANK')} could not join the group: {err}".splitlines()[0], file=sys.stderr,
          flush=True)
    sys.exit(JOIN_FAILED)
