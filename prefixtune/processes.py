"""The processes of a run: accelerate's process state, FSDP sharding of the frozen base, and each
process's share of a batch's rows.

``prefixtune train`` and ``generate`` run unchanged as N processes under ``accelerate launch`` (or
``torchrun``), one per device, on one or many machines; see prefixtune/train.py ("Scale-out") for
how training uses them.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState

from . import attach


def process_state(cpu: bool | None = None) -> PartialState:
    """accelerate's view of this process (rank, world size, device), from the environment that
    ``accelerate launch`` or ``torchrun`` set up; one process (rank 0 of 1) otherwise.

    The first call in a process fixes it. ``cpu``: collectives on CPU tensors (gloo); default: when
    the machine has no accelerator (accelerate would otherwise treat CPU workers as unrelated
    single processes) or ``ACCELERATE_USE_CPU`` is set.
    """
    if cpu is None:
        cpu = not torch.accelerator.is_available()
    if _env_flag("ACCELERATE_USE_CPU"):
        cpu = True
    return PartialState(cpu=cpu)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """Whether accelerate was told to shard with FSDP (``accelerate launch --use_fsdp`` or an FSDP
    ``accelerate config``). Raises if it also asked for loading the weights in process 0 only (then
    the other processes would hold no weights to take the prefix shapes and fingerprint from)."""
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return False
    if _env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ValueError("FSDP with --fsdp_cpu_ram_efficient_loading true is not supported: pass "
                         "--fsdp_cpu_ram_efficient_loading false (each process reads the base, then keeps its shard)")
    return True


def shard_base(model, device):
    """Shard the frozen base model over the processes with FSDP (version 1), with the settings
    accelerate passes in the environment (sharding strategy, wrap policy, prefetching...).

    For base models too large for one device: each process keeps a 1/N slice of the weights on
    ``device`` and gathers one wrapped block at a time. The prefix is not sharded (it is tiny): it
    stays replicated and :class:`Trainer` all-reduces its gradients. Prefix shapes and the base
    model's fingerprint are taken first, from the full weights (``model`` on CPU is fine).
    """
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 1:
        raise ValueError("prefixtune shards the base model with FSDP version 1: use --fsdp_version 1")
    if plugin.cpu_offload is not None and getattr(plugin.cpu_offload, "offload_params", False):
        raise ValueError("FSDP parameter offloading to CPU is not supported (the prefix lives with the base's weights)")
    attach.enable(model)
    attach.model_identity(model, pin=True)  # from the full weights: after sharding each process has a slice
    plugin.set_auto_wrap_policy(model)
    return FullyShardedDataParallel(
        model, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward,
        auto_wrap_policy=plugin.auto_wrap_policy, backward_prefetch=plugin.backward_prefetch,
        forward_prefetch=plugin.forward_prefetch, limit_all_gathers=plugin.limit_all_gathers,
        use_orig_params=plugin.use_orig_params, sync_module_states=plugin.sync_module_states,
        device_id=torch.device("cpu") if torch.device(device).type == "cpu" else torch.device(device),
    )


def share(n: int, rank: int, world: int) -> slice:
    """Process ``rank``'s contiguous share of ``n`` rows (sizes differ by at most one, larger first)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))
