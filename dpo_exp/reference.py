"""π_ref as the training loop sees it: log-probs of pairs, from a model or a precomputed table.

Three ways to hold it, chosen by config and by what the algorithm declares:
- resident: a frozen model kept in memory (the DPO paper's setting);
- precomputed: log-probs of every training pair computed once before training, after
  which the model is freed (saves a forward pass per step and a model's memory); the
  tables (training and held-out pairs) are kept in the cache, keyed by π_ref, its dtype,
  the precision and the pairs' token ids, so the jobs of a β sweep and a resumed run
  compute them once;
- on demand: a loss that needs no reference never holds one while training; the model is
  loaded only for evaluation (KL(π‖π_ref) on policy samples) and freed afterwards.
"""
from __future__ import annotations

import contextlib
import gc
import os
import weakref
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers import PreTrainedModel

from dpo_exp import distributed
from dpo_exp.data import PADDED, Batch, PairLayout, TokenizedPair, collate_pairs
from dpo_exp.models import PairLogps, SequenceLogps, autocast, sequence_logps


Table = tuple[torch.Tensor, torch.Tensor]                     # (chosen, rejected) summed log-probs by pair index
Store = Callable[[Sequence[TokenizedPair], Callable[[], Table]], Table]  # (pairs, compute) -> their table


# Batches per kept chunk of a precomputed table (Reference.logps_of_pairs(keep=...)): what an interruption can lose.
KEPT_CHUNK_BATCHES = 64


class Reference:
    def __init__(self, load: Callable[[], PreTrainedModel], resident: bool, precision: str = "fp32",
                 layout: PairLayout = PADDED, store: Optional[Store] = None):
        self._load = load
        self.layout = layout  # how its own batches of pairs are laid out (precompute, logps_of_pairs)
        self.store = store    # where precomputed tables are kept between runs (train.reference_store: the cache)
        self._model: Optional[PreTrainedModel] = load() if resident else None
        self._last: Optional[weakref.ref] = None  # the last model loaded for a block (model())
        self.resident = resident
        self.precision = precision
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (chosen, rejected) logps

    @contextlib.contextmanager
    def model(self) -> Iterator[PreTrainedModel]:
        """The reference model, loaded for the duration of the block if it is not resident."""
        if self._model is not None:
            yield self._model
            return
        if self._last is not None and self._last() is not None:
            gc.collect()  # the previous one is still alive: a reference cycle holds it (a wrapped model can)
        model = self._load()
        self._last = weakref.ref(model)  # freed by its reference count once the caller lets go of it
        yield model

    def release(self) -> None:
        """Free a resident model (after precomputing, or at the end of training)."""
        alive = weakref.ref(self._model) if self._model is not None else None
        self._model = None
        self.resident = False
        if alive is not None and alive() is not None:
            gc.collect()  # a reference cycle holds it

    def has_table(self, name: str) -> bool:
        return name in self._tables

    @torch.no_grad()
    def precompute(self, name: str, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int) -> None:
        """Store reference log-probs of `pairs` (by TokenizedPair.index) under `name`: computed here, or read
        from `store` where an earlier run (another job of a sweep, the run before a resume) computed them."""
        def compute(keep: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
            size = max(p.index for p in pairs) + 1
            chosen, rejected = torch.zeros(size), torch.zeros(size)
            pair_chosen, pair_rejected = self.logps_of_pairs(pairs, pad_id, batch_size, keep)
            index = torch.tensor([p.index for p in pairs])
            chosen[index], rejected[index] = pair_chosen, pair_rejected
            return chosen, rejected

        self._tables[name] = compute() if self.store is None else self.store(pairs, compute)

    @torch.no_grad()
    def logps_of_pairs(self, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int,
                       keep: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) summed log π_ref of each pair, in order, on the CPU. Under torchrun each rank
        computes its share (the reference is sharded too) and every rank gets all of them.

        keep: a folder (a cache entry's build folder) where each finished chunk of KEPT_CHUNK_BATCHES batches is
        kept, so that a computation interrupted and run again continues after its finished chunks. Chunks start
        at whole batches, so one process computes the same batches as without `keep`."""
        pairs = list(pairs)
        if keep is not None:
            return self._kept_chunks(pairs, pad_id, batch_size, keep)

        def forward(rows: list[int]) -> list[tuple[float, float]]:
            out = []
            with self.model() as model:
                for start in range(0, len(rows), batch_size):
                    batch = collate_pairs([pairs[i] for i in rows[start:start + batch_size]], pad_id,
                                          layout=self.layout)
                    logps = self._forward(model, batch)
                    out.extend(zip(logps.chosen.cpu().tolist(), logps.rejected.cpu().tolist()))
            return out

        values = distributed.map_shared(range(len(pairs)), forward)
        return torch.tensor([c for c, _ in values]), torch.tensor([r for _, r in values])

    def _kept_chunks(self, pairs: list, pad_id: int, batch_size: int, keep: Path
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        size = batch_size * KEPT_CHUNK_BATCHES
        chosen, rejected = [], []
        held = self._model
        with contextlib.ExitStack() as stack:
            stack.callback(setattr, self, "_model", held)
            for number, start in enumerate(range(0, len(pairs), size)):
                path = keep / f"reference_chunk_{number}.pt"
                if distributed.broadcast_object(path.is_file() if distributed.is_main() else None):
                    part = torch.load(path, weights_only=True)
                else:
                    if self._model is None:  # loaded once for every chunk still to compute, none if all are kept
                        self._model = stack.enter_context(self.model())
                    c, r = self.logps_of_pairs(pairs[start:start + size], pad_id, batch_size)
                    part = {"chosen": c, "rejected": r}
                    if distributed.is_main():  # whole or not at all: written beside it, then renamed
                        path.parent.mkdir(parents=True, exist_ok=True)
                        torch.save(part, path.with_suffix(".tmp"))
                        os.replace(path.with_suffix(".tmp"), path)
                chosen.append(part["chosen"])
                rejected.append(part["rejected"])
        return torch.cat(chosen), torch.cat(rejected)

    @torch.no_grad()
    def pair_logps(self, batch: Batch, with_rejected: bool, table: Optional[str] = None) -> PairLogps:
        """Reference log-probs of a collated batch: from the table `table` if precomputed, else a forward pass."""
        if table in self._tables:
            chosen, rejected = self._tables[table]
            idx, b, lengths = batch.index, batch.pairs, batch.lengths
            return PairLogps(chosen[idx], rejected[idx] if with_rejected else None, lengths[:b],
                             lengths[b:] if with_rejected else None)
        with self.model() as model:
            return self._forward(model, batch, with_rejected)

    def _forward(self, model: PreTrainedModel, batch: Batch, with_rejected: bool = True) -> PairLogps:
        device = next(model.parameters()).device
        with autocast(device, self.precision):
            seq: SequenceLogps = sequence_logps(model, batch)
        return PairLogps.split(SequenceLogps(seq.logps.float(), seq.lengths), with_rejected)
