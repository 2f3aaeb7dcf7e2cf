"""Where and how a run executes: device, threads, mixed precision, DDP ranks
(torchrun, gloo on the CPU and NCCL on GPUs) and NVTX ranges."""
import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .schema import ConfigError, shown
from .settings import Train


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


def device_for(wanted: str, local_rank: int, world: int) -> torch.device:
    """The device of ``device: auto | cpu | cuda | cuda:N``, checked against
    the GPUs torch sees (raises ConfigError): ``cuda`` is the GPU of this
    rank (LOCAL_RANK under torchrun), ``cuda:N`` one GPU of a single process."""
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: expected cpu or auto (torch sees no GPU), got {shown(wanted)}")
    _, _, index = wanted.partition(":")
    if index and world > 1:
        raise ConfigError(f"device: expected cuda under torchrun (each rank takes GPU LOCAL_RANK), got {shown(wanted)}")
    device = torch.device("cuda", int(index) if index else local_rank)
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: expected a GPU index below {torch.cuda.device_count()}, got {shown(wanted)}")
    return device


def start(device_setting: str, train: Train) -> Runtime:
    """Device (the config's ``device``) and process group from the settings
    and torchrun's environment; threads and mixed precision of ``train``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = device_for(device_setting, int(os.environ.get("LOCAL_RANK", "0")), world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if train.threads:
        torch.set_num_threads(int(train.threads))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world, amp_dtype_for(train.amp, device))


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
