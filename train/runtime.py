"""Where and how a run executes: device, threads, mixed precision, DDP ranks
(torchrun, gloo on the CPU and NCCL on GPUs) and NVTX ranges."""
import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: Optional[torch.dtype] = None   # None: fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def needs_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def amp_dtype_for(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """train.amp: 'auto' is bf16 on GPUs that have it, fp16 (with a gradient
    scaler) on older ones (Pascal), and fp32 on the CPU."""
    if setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"train.amp must be auto, off, fp16 or bf16, got {setting!r}")
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def start(config) -> Runtime:
    """Device and process group from the config and torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    wanted = config["device"]
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no GPU")
    if wanted == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if config["train"]["threads"]:
        torch.set_num_threads(int(config["train"]["threads"]))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, amp_dtype_for(config["train"]["amp"], device))


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range around a stage or step on a GPU (shows in Nsight); no-op on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield
