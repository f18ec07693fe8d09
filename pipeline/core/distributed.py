"""Several processes launched by ``torchrun`` (docs/design.md §16): one torch.distributed process group,
rank 0 the only writer of manifests, checkpoints and reports. A plain ``python`` launch is one process
and every function here is then a no-op that answers as rank 0 of 1.

Errors must stop every rank, or the others wait in their next collective until it times out: a stage
runs its fallible set-up and each round of work inside ``together``, which swaps the outcome of every
rank, so that all ranks raise together and only rank 0 prints the sentence.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .errors import AlreadySaid, UserError

TIMEOUT = datetime.timedelta(minutes=30)  # a collective longer than this means a rank hangs


def launched() -> bool:
    """True under torchrun (which sets RANK and WORLD_SIZE), even with one process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def init() -> None:
    """Join the process group once: nccl where CUDA is available (each rank on GPU LOCAL_RANK), else gloo."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def gather(obj) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    if not active():
        return [obj]
    objects = [None] * world()
    dist.all_gather_object(objects, obj)
    return objects


def everywhere(flag: bool) -> bool:
    """True when ``flag`` is true on every rank: before a step that is a collective unless skipped (a cache that
    only some ranks could read), every rank must take the same branch."""
    return all(gather(bool(flag)))


def share_range(count: int) -> tuple:
    """This rank's contiguous share [lo, hi) of ``count`` items (the last ranks' may be shorter or empty)."""
    per = -(-count // world())
    return min(count, rank() * per), min(count, (rank() + 1) * per)


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model, device, unused_parameters=False):
    """``model`` in DistributedDataParallel over the ranks (rank 0's weights broadcast to all); the model itself
    in one process. Only the training forward pass goes through the wrapper."""
    if not active() or world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused_parameters)


def broadcast_module(model) -> None:
    """Give every rank rank 0's parameters and buffers (after a rank-local change such as a fitted start)."""
    if not active() or world() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def mean_over_ranks(record: dict) -> dict:
    """``record`` with every number (and list of numbers) averaged over the ranks."""
    if not active() or world() == 1:
        return record
    records = gather(record)

    def mean(values):
        if all(v == values[0] for v in values):  # the step, the learning rate: kept as they are
            return values[0]
        if isinstance(values[0], list):
            return [sum(column) / len(column) for column in zip(*values)]
        return sum(values) / len(values) if isinstance(values[0], (int, float)) else values[0]
    return {key: mean([r[key] for r in records]) for key in record}


class RankFailed(AlreadySaid):
    """Another rank failed; that rank's sentence is printed by rank 0, so this one stays silent."""


@contextlib.contextmanager
def together():
    """Run a block on every rank; when it raises UserError on any rank, raise it on all of them (rank 0
    with the first failing rank's sentence, the others with a silent RankFailed)."""
    error = None
    try:
        yield
    except UserError as err:
        if not active():
            raise
        error = str(err)
    errors = gather(error)
    failed = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
    if failed is None:
        return
    same_everywhere = all(e == failed[1] for e in errors)
    where = "" if same_everywhere else f"rank {failed[0]}: "
    if is_main():
        raise UserError(f"{where}{failed[1]}")
    raise RankFailed(f"{where}{failed[1]}")


def wait_for_all() -> None:
    """Block until every rank gets here: after a stage ends well, so that no rank leaves the group while rank 0
    still writes the stage's results (a rank leaving early can abort the others' collectives)."""
    if active():
        dist.barrier()


def finish() -> None:
    """Leave the group (for code that runs its own ranks, as the tests do; the entry points end with os._exit
    instead, docs/design.md §16)."""
    if active():
        dist.destroy_process_group()


def average_gradients(module) -> None:
    """Average ``module``'s gradients over the ranks (for a network trained beside DistributedDataParallel's)."""
    if not active() or world() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world()
