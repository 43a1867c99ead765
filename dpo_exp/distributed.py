"""Data-parallel training on PyTorch's own engine: FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

One process per device. torchrun (or SLURM through the submitit launcher, dpo_exp.launch) sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` joins the process group (NCCL on GPUs,
gloo on CPUs). A single process never creates a group and every function here is then a no-op, so
the single-device path is the code path of every run, not a special case.

The rules that keep N ranks equal to one process:

- Algorithms see GLOBAL data: the same batch plan, the same rollout, the same evaluation set on every
  rank. Where models run on that data, `map_shared` gives each rank an equal share of the rows (the
  last share padded with copies, so every rank makes the same number of forward passes and FSDP's
  all-gathers line up), and gathers the results back in order: every rank then holds the whole
  result, exactly as one process would.
- The loop gives each rank its slice of every optimizer step and divides the summed loss by the
  normaliser of the WHOLE step (summed over ranks); FSDP then sums the gradients (divide factor 1),
  so a step's gradient is the single-process gradient of the same global batch.
- Generation under FSDP: each rank samples its share of the prompts with `generate(synced_gpus=True)`
  (a rank whose sequences have all ended keeps joining the forward passes until every rank is done),
  so no rank ever gathers the full weights for itself and nothing hangs.
- Decisions that must agree (skip a step, stop on SIGTERM, resume from which checkpoint) are made from
  reduced values, from files every rank reads after a barrier, or by rank 0 and broadcast (which checkpoint is
  intact). Only rank 0 writes files and logs, except each rank's checkpoint shards; a write the machine refuses
  on one rank stops every rank (`together`).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dpo_exp.errors import WriteFailed, writing
from dpo_exp.metrics import MetricSums

_alone = 0  # > 0 inside `alone()`: this rank works as a single process


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() and not _alone else 1


def rank() -> int:
    if _alone:
        return 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this rank works as a single process (no collectives, nothing sharded): for work only
    rank 0 does while the others wait at a barrier, such as building a cache entry from files."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def is_main() -> bool:
    """Whether this process writes files, prints, logs and builds cache entries (rank 0)."""
    return rank() == 0


def adopt_submitit_environment() -> None:
    """Inside a job that hydra/launcher=slurm (or slurm_local) started as several tasks, set the variables
    torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR: the job's first node,
    MASTER_PORT: drawn from the job id), with submitit's own TorchDistributedEnvironment. Nothing elsewhere."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(on_gpu: bool, timeout_minutes: float = 60.0) -> None:
    """Join the process group torchrun (or the SLURM launcher) describes: NCCL with one GPU per rank when the
    run trains on GPUs, else gloo. Nothing for a single process."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    atexit.register(_shutdown)


def init_single_process(on_gpu: bool) -> None:
    """A process group of this process alone (NCCL on its GPU, else gloo), for FSDP2 on one device
    (shard(single_process=True)): the sharded path's mixed precision and code on one GPU."""
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as probe:  # a free local port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    atexit.register(_shutdown)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """This rank's device: its own GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ---- reductions and gathers ----------------------------------------------------------------------

def reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (returned on the tensor's device); the tensor itself for one process."""
    if world_size() == 1:
        return value
    out = value.detach().to(device(), torch.float64).clone()
    dist.all_reduce(out)
    return out.to(value.device, value.dtype)


def reduce_floats(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks of a list of numbers."""
    if world_size() == 1:
        return list(values)
    out = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(out)
    return out.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a signal that reached one rank first)."""
    return reduce_floats([float(flag)])[0] > 0


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank (pickled: for lists of ids and small tensors)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def together(work: Callable[[], Any], path, intact: str = "",
             cleanup: Optional[Callable[[], None]] = None) -> list:
    """work() on every rank, then every rank's result in rank order (on every rank: a synchronisation point, like a
    barrier). A write the machine refused (errors.writing, naming `path` and `intact`) on any rank raises WriteFailed
    on every rank, after `cleanup` ran on rank 0 (removing what was half written): a rank that went on alone would
    wait at the next collective until it timed out."""
    error, result = None, None
    try:
        with writing(path, intact):
            result = work()
    except WriteFailed as err:
        error = err
    if world_size() == 1:
        reports: list = [(result, None)]
    else:
        report = None if error is None else (error.path, error.cause.errno, error.cause.strerror, error.intact)
        reports = gather_objects((result, report))
    failed = next((report for _, report in reports if report is not None), None)
    if error is not None or failed is not None:
        if cleanup is not None and is_main():
            cleanup()
        if error is not None:
            raise error
        where, code, reason, what = failed
        raise WriteFailed(where, OSError(code, reason), what)
    return [value for value, _ in reports]


def step_slice(n: int) -> np.ndarray:
    """Positions 0..n-1 of this rank's slice of an optimizer step: contiguous, sizes differ by at most one."""
    return np.array_split(np.arange(n), world_size())[rank()]


def share(n: int) -> tuple[list[int], list[bool]]:
    """This rank's share of rows 0..n-1 for `map_shared`: ceil(n / world) positions on every rank, contiguous
    in rank order; positions past n repeat the last row and are marked False (computed, then dropped)."""
    size = math.ceil(n / world_size())
    start = rank() * size
    rows = [min(i, n - 1) for i in range(start, start + size)]
    return rows, [i < n for i in range(start, start + size)]


def map_shared(items: Sequence, fn: Callable[[list], list]) -> list:
    """fn(list of items) -> one result per item, run on this rank's share of `items` and gathered in order.

    Every rank must call it with the same items; each then gets fn's results for all of them. With one
    process this is fn(list(items)).
    """
    items = list(items)
    if world_size() == 1:
        return list(fn(items))
    if not items:
        return []
    rows, real = share(len(items))
    mine = list(fn([items[i] for i in rows]))
    if len(mine) != len(rows):
        raise RuntimeError(f"map_shared: fn returned {len(mine)} results for {len(rows)} items")
    parts = gather_objects([result for result, keep in zip(mine, real) if keep])
    return [result for part in parts for result in part]


def shared_batches(n: int, batch_size: int) -> list[tuple[list[int], bool]]:
    """This rank's rows of 0..n-1 in batches of at most `batch_size`, as many batches on every rank; a batch
    marked False is a stand-in (row 0) for a rank that has run out of rows: run it, add nothing. For sums
    over rows (held-out metrics) that must count every row once."""
    rows, real = share(n)
    mine = [r for r, keep in zip(rows, real) if keep]
    count = max(1, math.ceil(len(rows) / batch_size)) if n else 0
    out = [(mine[i * batch_size:(i + 1) * batch_size], True) for i in range(count)]
    return [(batch, True) if batch else ([0], False) for batch, _ in out]


def reduce_metrics(sums: MetricSums) -> MetricSums:
    """Every rank's (sum, count) metrics added up in rank order, on every rank; `sums` itself for one process."""
    if world_size() == 1:
        return sums
    return MetricSums.total(gather_objects(sums))


def sampling_seed() -> Optional[int]:
    """A seed for this rank's share of a sampling call, so that ranks draw independent noise: one draw from
    the (forked) global generator, offset by the rank. None for a single process (it samples as always)."""
    if world_size() == 1:
        return None
    return int(torch.randint(0, 2**31 - 1, ()).item()) + 7919 * rank()


# ---- sharding ------------------------------------------------------------------------------------

def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: nn.Module) -> None:
    """Free a sharded model's gathered weights (a no-op unsharded): after a forward no backward follows."""
    if is_sharded(module):
        module.reshard()


def shard(model: nn.Module, block_class: Optional[str], fsdp_cfg, precision: str,
          single_process: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2 across all ranks: each transformer block (model.block_class, or the
    model's _no_split_modules) is one unit, the root holds the rest (embeddings, final norm, heads).

    On GPU with trainer.precision=bf16 (and trainer.fsdp.mixed_precision) parameters are gathered and
    computed in bfloat16 while gradients are reduced in float32; trainer.fsdp.cpu_offload keeps the
    shards, gradients and optimizer state in CPU memory. Gradients are summed over ranks (the loop
    divides by the global normaliser). One process: the model unchanged, unless `single_process` (a group of one,
    init_single_process).
    """
    if world_size() == 1 and not (single_process and dist.is_initialized()):
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs: dict = {"reshard_after_forward": fsdp_cfg.reshard_after_forward}
    if precision == "bf16" and fsdp_cfg.mixed_precision and torch.cuda.is_available():
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs["offload_policy"] = CPUOffloadPolicy() if fsdp_cfg.cpu_offload else OffloadPolicy()
    for block in find_blocks(model, block_class):
        fully_shard(block, **kwargs)
    # The root (embeddings, final norm, LM head) stays gathered from its forward to its backward, as FSDP2 does
    # by default: the chunked LM head (models.logps) reads the head's weight after the model's forward returns.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    if hasattr(model, "get_base_model"):  # peft: generate runs the wrapped model's forward, not the root's
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)       # gradients summed over ranks, not averaged
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def shard_as_configured(model: nn.Module, cfg) -> nn.Module:
    """`shard` with the run's settings: model.block_class, trainer.fsdp and trainer.precision."""
    precision = getattr(cfg.trainer.precision, "value", cfg.trainer.precision)
    return shard(model, cfg.model.block_class, cfg.trainer.fsdp, str(precision))


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Reduce gradients on this backward (the last micro-batch of a step) or only accumulate them locally."""
    if world_size() > 1 and is_sharded(module):
        module.set_requires_gradient_sync(enabled)


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the full value of a DTensor (e.g. clip_grad_norm_'s total norm of sharded grads)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state_dict(model: nn.Module) -> Optional[dict]:
    """The model's whole state dict on CPU, on rank 0 (None elsewhere); every rank must call it. None for a
    single process (save_pretrained then reads the model itself)."""
    if world_size() == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    # a tied weight (lm_head = embeddings) is one parameter under two names: keep the first, as save_pretrained does
    unique = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {k: v for k, v in state.items() if k not in tied}


def save_pretrained(model: nn.Module, folder, **kwargs) -> None:
    """model.save_pretrained(folder) in Hugging Face format, from any number of ranks (every rank calls it): a
    sharded model's full weights are gathered to rank 0's CPU, which writes them."""
    state = full_state_dict(model)
    if not is_main():
        return
    model.save_pretrained(folder, **kwargs, **({} if state is None else {"state_dict": state}))
    config = Path(folder) / "config.json"
    if state is not None and config.exists():  # FSDP renames the class it shards (FSDPLlamaForCausalLM)
        data = json.loads(config.read_text())
        data["architectures"] = [a.removeprefix("FSDP") for a in data.get("architectures") or []]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun (or the SLURM launcher) set it, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def find_blocks(model: nn.Module, block_class: str | None) -> list[nn.Module]:
    """The transformer blocks of `model`: modules of class `block_class` (model.block_class), or of
    the model's own `_no_split_modules` when it is null. These are the units FSDP shards.

    Raises ValueError naming the classes the model does have when none match, so a misspelt
    block_class fails when the model is built, not when sharding starts.
    """
    inner = getattr(model, "get_base_model", lambda: model)()  # a peft model: the wrapped transformer
    names = {block_class} if block_class else set(getattr(inner, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        classes = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__
                          or "Block" in type(m).__name__})
        raise ValueError(f"model.block_class={block_class!r} matches no module of {type(inner).__name__}; "
                         f"its layer classes are {classes or 'unknown'} (null: use the model's _no_split_modules)")
    return blocks
