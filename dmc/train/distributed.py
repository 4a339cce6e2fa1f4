"""Process group, device and FSDP2 setup for torchrun (and plain single-process runs)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch.distributed.checkpoint warns at every save and load without a process group that it assumes a single
# process: what a single-process run of ours means. Only that notice is silenced (torch attributes it to its
# own checkpoint module, so the filter cannot name our callers).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning, module=r"torch\.distributed\.checkpoint")


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_runtime() -> Runtime:
    """Read torchrun's environment; start NCCL (GPU) or gloo (CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=device)


def shard_model(model: torch.nn.Module, runtime: Runtime, bf16: bool) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # Layers get bf16 activations from the root already; leaving their inputs uncast keeps the
    # Gumbel noise in fp32 (spec §4).
    layer_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                        cast_forward_inputs=False)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=layer_policy)
    fully_shard(model, mp_policy=policy)
    return model


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
