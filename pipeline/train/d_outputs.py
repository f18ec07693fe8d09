"""What D computes for B, computed once (docs/design.md §13).

D is frozen while B trains and B's input for a record is always that record's x_T, so D's predictions
and tapped block features for a record are the same at every step. ``DOutputs.build`` computes them
for every training record before step 1 (one D call per record instead of one per record and epoch)
and ``lookup`` serves a batch by record index. They are kept in the dtype D produced them in (bf16
under bf16 autocast), so B's losses see what D would have computed in the step, to float rounding: D's kernels
may sum in another order for another batch (fp32 on AVX2 does), which no loss can tell apart. A store
larger than ``b_cache_d_mb`` is not built: D then runs in every step, as without the store.
"""
import torch
from tqdm import tqdm

from ..core import distributed, runtime
from ..data import teacher_data

MB = 2 ** 20


def _training_x_T(manifest, lo, hi):
    """(record indices, x_T) of the records [lo, hi), one shard at a time, as training decodes them."""
    for entry in teacher_data.shards_overlapping(manifest, lo, hi):
        arrays = manifest.read_shard(entry)
        keep = (arrays["index"] >= lo) & (arrays["index"] < hi)
        tensors = teacher_data.to_tensors(arrays, keep)
        yield tensors["index"], tensors["x_T"]


class DOutputs:
    def __init__(self, lo: int, records: int):
        self.lo, self.records = lo, records
        self.pred, self.feats = {}, {}

    def _store(self, rows, pred: dict, feats: dict):
        for store, values in ((self.pred, pred), (self.feats, feats)):
            for name, value in values.items():
                if name not in store:
                    store[name] = torch.empty((self.records, *value.shape[1:]), dtype=value.dtype)
                store[name][rows] = value.detach().cpu()

    @staticmethod
    def bytes_per_record(pred: dict, feats: dict) -> int:
        return sum(v[0].numel() * v.element_size() for v in (*pred.values(), *feats.values()))

    @classmethod
    def build(cls, d, taps, manifest, lo, hi, cfg, amp, device):
        """D's outputs on records [lo, hi), or None (said once) when they would not fit ``b_cache_d_mb``."""
        budget, store = cfg["b_cache_d_mb"] * MB, cls(lo, hi - lo)
        batch_size = cfg["b_batch_size"]
        with tqdm(total=hi - lo, desc="binarize: D on the training records", unit="record",
                  dynamic_ncols=True, disable=not distributed.is_main()) as bar:
            for index, x_T in _training_x_T(manifest, lo, hi):
                for start in range(0, len(index), batch_size):
                    x = x_T[start:start + batch_size].to(device)
                    with torch.no_grad(), runtime.autocast(amp, device):
                        pred = d(x)
                    feats = taps.take()
                    if not store.pred:  # the first batch tells the size of the whole store
                        need = cls.bytes_per_record(pred, feats) * (hi - lo)
                        if need > budget:
                            bar.write(f"[binarize] D's outputs on {hi - lo} records need {need / MB:,.0f} MiB, more "
                                      f"than b_cache_d_mb={cfg['b_cache_d_mb']}: D runs in every step instead")
                            return None
                    store._store(index[start:start + batch_size] - lo, pred, feats)
                    bar.update(len(x))
        if distributed.is_main():
            size = store.bytes_per_record(store.pred, store.feats) * (hi - lo) / MB
            print(f"[binarize] D's outputs on {hi - lo} records kept in memory ({size:,.0f} MiB): D is not run in the "
                  f"steps")
        return store

    def lookup(self, index: torch.Tensor, device):
        """(D's predictions, D's block features) for the records ``index``, as D would compute them."""
        rows = index.cpu() - self.lo

        def pick(store):
            return {name: t.index_select(0, rows).to(device, non_blocking=True) for name, t in store.items()}

        return pick(self.pred), pick(self.feats)
