"""Predicted peak memory of one DRSL / DRSL+ training step, before running it.

The training step of the pipeline (``drsl_fast.train.loop``: forward of 1+1
images through DeepLab-v2 and the MMDL-FR head, segmentation losses, the DRSL
loss, backward, an SGD step with momentum) is simulated in two parts:

1. the network (forward, segmentation losses, backward, optimiser step; two
   steps, so that momentum buffers and the previous step's gradients are live
   as they are in training) runs on fake tensors (``FakeTensorMode``: shapes
   and dtypes, no data, no compute) under a dispatch mode that counts the
   bytes of every live tensor storage, exactly as the pipeline runs it,
   checkpointing and autocast included. The DRSL loss is replaced there by a
   stand-in that gives the embeddings a dense gradient, and the live bytes at
   the moment the loss runs are recorded;
2. the DRSL loss itself (sampling, Eq. 4/5 on source and target, Eq. 6,
   forward and backward) runs on real CPU tensors of the embedding size, with
   the reference ops or the fused ones, under the same counter: its peak
   above its inputs is the loss's extra memory.

predicted peak = max(network peak, live bytes at the loss + loss extra)
                 + a workspace allowance (cuDNN/cuBLAS workspaces; CUDA only).

This is the quantity ``torch.cuda.max_memory_allocated`` reports. The CUDA
context and the caching allocator's slack come on top:
:func:`fits_1080ti` keeps a stated reserve for them.

Autocast is simulated with the CPU autocast policy, which runs bilinear
upsampling in fp32 where CUDA keeps fp16; the difference is a few MiB of
embeddings (the prediction errs high).

    python -m drsl_fast.memory_model                         # the GTX 1080 Ti table
    python -m drsl_fast.memory_model --crop 512x1024 --amp fp16 --ops fast --checkpointing
"""
import argparse
import contextlib
import functools
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20
GIB = 2**30
# cuDNN convolution and cuBLAS workspaces on a GPU, allocated through the
# caching allocator (so counted by max_memory_allocated) but invisible to the
# tensor-level simulation. On an H100 (ResNet-101, 512x512 and 512x1024) the
# simulation without it fell 40-70 MiB short of the measured peak; 128 MiB
# keeps the prediction on the high side.
CUDA_WORKSPACE_BYTES = 128 * MIB
GTX_1080TI_BYTES = 11 * GIB
# Kept free on the 1080 Ti for the CUDA context is outside max_memory_allocated
# (about 0.3-0.4 GiB with cuDNN loaded) and for the caching allocator's
# fragmentation above the allocated peak.
GTX_1080TI_RESERVE_BYTES = GIB // 2


@dataclass(frozen=True)
class StepSetting:
    """What decides a training step's memory.

    crop (H, W); batch: source images per step (as many target images when
    ``adaptation``); amp: None (fp32), "fp16" or "bf16"; ops: "fast" or
    "reference" (the DRSL loss's ops); mmdl False is plain DeepLab-v2 with the
    segmentation loss only; consistency: Eq. 10 (DRSL+) rather than Eq. 9;
    shared_convs: the MMDL-FR embedding block run with the classifier
    (:class:`~drsl_fast.train.network.DRSLNetwork`, the default) or apart;
    head_as_gemm: the classifiers (the layer4 one with the embedding block
    when shared) as one matrix product and a shifted sum of its taps each
    (:func:`~drsl_fast.models.tap_gemm.summed_dilated_convs_as_gemm`).
    """

    depth: int = 101
    width: float = 1.0
    crop: Tuple[int, int] = (512, 512)
    batch: int = 1
    adaptation: bool = True
    num_classes: int = 19
    num_modes: int = 3
    embedding_dim: int = 64
    samples_per_class: int = 300
    amp: Optional[str] = None
    checkpointing: bool = False
    ops: str = "fast"
    mmdl: bool = True
    consistency: bool = True
    aux_head: bool = False
    shared_convs: bool = True
    head_as_gemm: bool = False

    def config(self) -> Dict:
        """The pipeline config (``gta5`` with this setting's overrides)."""
        from .train.config import load_config

        overrides = [
            f"model.depth={self.depth}", f"model.width={self.width}", f"model.checkpointing={str(self.checkpointing).lower()}",
            f"model.head_as_gemm={str(self.head_as_gemm).lower()}",
            f"model.mmdl={str(self.mmdl).lower()}", f"model.num_modes={self.num_modes}",
            f"model.embedding_dim={self.embedding_dim}", f"data.num_classes={self.num_classes}",
            f"loss.samples_per_class={self.samples_per_class}", f"data.crop=[{self.crop[0]}, {self.crop[1]}]",
            f"adaptation.batch_size={self.batch}", f"source.batch_size={self.batch}", "model.init_weights=null",
        ]
        return load_config("gta5", overrides)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages alive, op by op, and their peak.

    Every output of every op is registered by its storage; a storage leaves
    the count once it is freed (seen at the next op). Tensors that exist
    before the mode (parameters, inputs) are added with :meth:`add`.
    """

    def __init__(self):
        super().__init__()
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata not in self.live:
            self.live[ref.cdata] = (ref, storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)

    def sweep(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def reset_peak(self) -> None:
        self.sweep()
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sweep()
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.add(value)
        self.peak = max(self.peak, self.current)
        return out


class LossStandIn:
    """Takes the DRSL loss's place in the simulated step: a dense gradient
    for both embedding maps and the modes, and the live bytes at the call."""

    def __init__(self, counter: LiveBytes):
        self.counter = counter
        self.live_at_loss = 0

    def __call__(self, modes, source_emb, source_labels, seg_source, target_emb=None, target_labels=None,
                 seg_target=None, generator=None):
        from .losses.drsl_loss import DRSLLossOutput

        self.counter.sweep()
        self.live_at_loss = max(self.live_at_loss, self.counter.current)
        total = seg_source + source_emb.float().square().mean() + modes.square().mean()
        if target_emb is not None:
            total = total + seg_target + target_emb.float().square().mean()
        return DRSLLossOutput(total, {})


def amp_dtype(amp: Optional[str]) -> Optional[torch.dtype]:
    return {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def embedding_size(crop: Tuple[int, int]) -> Tuple[int, int]:
    """Labels reduced by 2 (ceil), the embedding map's size (docs/method.md §2)."""
    return -(-crop[0] // 2), -(-crop[1] // 2)


def simulated_batch(setting: StepSetting, device: str = "cpu") -> Tuple[Dict, Optional[Dict]]:
    """Random images and labels shaped as the pipeline's batches."""
    height, width = setting.crop

    def batch():
        labels = torch.randint(0, setting.num_classes, (setting.batch, height, width), device=device)
        return {"image": torch.randn(setting.batch, 3, height, width, device=device), "label": labels,
                "embedding_label": labels[:, ::2, ::2].contiguous()}

    source = batch()
    return source, (batch() if setting.adaptation else None)


def step_network(setting: StepSetting):
    """The network a setting's step trains, in training mode (built from
    :meth:`StepSetting.config`, the head's convolutions shared or apart as
    ``setting.shared_convs`` says), and the run settings it was built from."""
    from .train.network import build_network
    from .train.settings import Settings

    settings = Settings.of(setting.config())
    network = build_network(settings.model, settings.data.num_classes, log=lambda *_: None).train()
    network.shared_convs = setting.shared_convs
    return network, settings


@dataclass
class NetworkMemory:
    static_bytes: int      # parameters, gradients and momentum buffers
    peak_bytes: int        # peak of the simulated steps
    live_at_loss_bytes: int


def network_memory(setting: StepSetting) -> NetworkMemory:
    """Part 1 of the module docstring: the step on fake tensors (the same
    for both kinds of ops, which only the loss uses)."""
    return _network_memory(replace(setting, ops="fast"))


@functools.lru_cache(maxsize=None)
def _network_memory(setting: StepSetting) -> NetworkMemory:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .train.loop import step_loss

    dtype = amp_dtype(setting.amp)
    counter = LiveBytes()
    stand_in = LossStandIn(counter)
    with FakeTensorMode(allow_non_fake_inputs=True):
        network, settings = step_network(setting)
        optimizer = torch.optim.SGD(network.parameter_groups(1e-4), lr=1e-4, momentum=0.9, weight_decay=5e-4,
                                    foreach=False)
        source, target = simulated_batch(setting)
        for tensor in list(network.parameters()) + list(network.buffers()):
            counter.add(tensor)
        with counter:
            for _ in range(2):
                autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
                with autocast:
                    total, _ = step_loss(network, network, stand_in, source, target, None)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                del total
            counter.sweep()
            static = counter.current
    return NetworkMemory(static, counter.peak, stand_in.live_at_loss)


@functools.lru_cache(maxsize=None)
def loss_extra_bytes(ops: str, emb_shape: Tuple[int, int, int, int], num_classes: int, num_modes: int,
                     samples_per_class: int, emb_dtype: torch.dtype, consistency: bool) -> int:
    """Part 2 of the module docstring: the DRSL loss's peak above its inputs
    (source and target embeddings, labels, modes), forward and backward."""
    from .losses import DRSLLoss

    backend = "reference" if ops == "reference" else None
    batch, dim, height, width = emb_shape
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    source = torch.randn(emb_shape).to(emb_dtype).requires_grad_()
    target = torch.randn(emb_shape).to(emb_dtype).requires_grad_()
    modes = torch.randn(num_classes, num_modes, dim, requires_grad=True)
    source_labels = torch.randint(0, num_classes, (batch, height, width))
    target_labels = torch.randint(0, num_classes, (batch, height, width))
    seg = torch.zeros((), requires_grad=True)
    loss_fn = DRSLLoss(num_classes, samples_per_class=samples_per_class, consistency=consistency, backend=backend)
    counter = LiveBytes()
    for tensor in (source, target, modes, source_labels, target_labels, seg):
        counter.add(tensor)
    start = counter.current
    with counter:
        out = loss_fn(modes, source, source_labels, seg, target, target_labels, seg, generator=generator)
        out.total.backward()
    return counter.peak - start


@dataclass
class Prediction:
    setting: StepSetting
    device: str
    static_bytes: int
    network_peak_bytes: int
    live_at_loss_bytes: int
    loss_extra_bytes: int
    workspace_bytes: int
    peak_bytes: int

    def as_dict(self) -> Dict:
        row = asdict(self)
        row.update(asdict(self.setting))
        del row["setting"]
        row["peak_mib"] = self.peak_bytes / MIB
        return row


def predict_step_peak(setting: StepSetting, device: str = "cuda", workspace_bytes: Optional[int] = None) -> Prediction:
    """The predicted ``max_memory_allocated`` of a training step (see the
    module docstring). ``device`` only sets the workspace allowance (0 on the
    CPU, :data:`CUDA_WORKSPACE_BYTES` on a GPU) unless it is given."""
    net = network_memory(setting)
    extra = 0
    if setting.mmdl:
        h, w = embedding_size(setting.crop)
        dtype = amp_dtype(setting.amp) or torch.float32
        extra = loss_extra_bytes(setting.ops, (setting.batch, setting.embedding_dim, h, w), setting.num_classes,
                                 setting.num_modes, setting.samples_per_class, dtype,
                                 setting.consistency and setting.adaptation)
    if workspace_bytes is None:
        workspace_bytes = CUDA_WORKSPACE_BYTES if device.startswith("cuda") else 0
    peak = max(net.peak_bytes, net.live_at_loss_bytes + extra) + workspace_bytes
    return Prediction(setting, device, net.static_bytes, net.peak_bytes, net.live_at_loss_bytes, extra,
                      workspace_bytes, peak)


def gta5_1080ti_settings() -> List[StepSetting]:
    """GTA5 -> Cityscapes DRSL+ on a GTX 1080 Ti: ResNet-101, 1+1 images,
    fp32 or fp16 (with a gradient scaler; Pascal has no bf16), fused or
    reference ops, checkpointing off/on, 512x512 and 512x1024 crops."""
    base = StepSetting()
    settings = []
    for crop in ((512, 512), (512, 1024)):
        for amp in (None, "fp16"):
            for ops in ("reference", "fast"):
                for checkpointing in (False, True):
                    settings.append(replace(base, crop=crop, amp=amp, ops=ops, checkpointing=checkpointing))
    return settings


def fits_1080ti(prediction: Prediction, reserve_bytes: int = GTX_1080TI_RESERVE_BYTES) -> bool:
    return prediction.peak_bytes <= GTX_1080TI_BYTES - reserve_bytes


def verdict_table(predictions: List[Prediction], reserve_bytes: int = GTX_1080TI_RESERVE_BYTES) -> str:
    """Markdown table: predicted peak against 11 GiB minus the reserve."""
    budget = (GTX_1080TI_BYTES - reserve_bytes) / GIB
    lines = [f"GTX 1080 Ti: 11 GiB, {reserve_bytes / GIB:.1f} GiB kept for the CUDA context and allocator slack: "
             f"a step fits when its predicted peak is at most {budget:.1f} GiB.", "",
             "| crop | precision | ops | head | checkpointing | predicted peak GiB | headroom GiB | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for p in predictions:
        s = p.setting
        headroom = budget - p.peak_bytes / GIB
        lines.append(f"| {s.crop[0]}x{s.crop[1]} | {s.amp or 'fp32'}{' + scaler' if s.amp == 'fp16' else ''} | "
                     f"{s.ops} | {'GEMM' if s.head_as_gemm else 'convs'} | {'on' if s.checkpointing else 'off'} | {p.peak_bytes / GIB:.2f} | {headroom:+.2f} | "
                     f"{'yes' if fits_1080ti(p, reserve_bytes) else '**no**'} |")
    return "\n".join(lines)


def crop_size(text: str) -> Tuple[int, int]:
    """'512x1024' -> (512, 1024), height first."""
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drsl_fast.memory_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=crop_size, default=None, metavar="HxW",
                        help="predict one setting at this crop (default: the GTX 1080 Ti table)")
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=1, help="source images per step (as many target images)")
    parser.add_argument("--amp", choices=("fp16", "bf16"), default=None)
    parser.add_argument("--ops", choices=("fast", "reference"), default="fast")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--no-mmdl", action="store_true", help="plain DeepLab-v2, segmentation loss only")
    parser.add_argument("--head-as-gemm", action="store_true",
                        help="the classifiers as one matrix product and a shifted sum each (model.head_as_gemm)")
    parser.add_argument("--device", default="cuda", help="cuda (adds the workspace allowance) or cpu")
    parser.add_argument("--reserve-gib", type=float, default=GTX_1080TI_RESERVE_BYTES / GIB)
    parser.add_argument("--out", default=None, help="also write the GTX 1080 Ti table (markdown) to this file")
    args = parser.parse_args(argv)
    reserve = int(args.reserve_gib * GIB)
    if args.crop is None:
        table = verdict_table([predict_step_peak(s) for s in gta5_1080ti_settings()], reserve)
        print(table)
        if args.out:
            with open(args.out, "w") as handle:
                handle.write(f"# GTX 1080 Ti: does a GTA5 DRSL+ step fit?\n\nPredicted by `python -m "
                             f"drsl_fast.memory_model` (ResNet-101, 1 source + 1 target image, Eq. 10 losses, "
                             f"SGD with momentum; workspace allowance {CUDA_WORKSPACE_BYTES / MIB:.0f} MiB).\n\n"
                             f"{table}\n")
        return 0
    setting = StepSetting(depth=args.depth, width=args.width, crop=args.crop, batch=args.batch, amp=args.amp,
                          checkpointing=args.checkpointing, ops=args.ops, mmdl=not args.no_mmdl,
                          head_as_gemm=args.head_as_gemm)
    p = predict_step_peak(setting, args.device)
    print(f"predicted peak {p.peak_bytes / MIB:.0f} MiB: parameters+gradients+momentum {p.static_bytes / MIB:.0f}, "
          f"network peak {p.network_peak_bytes / MIB:.0f}, live at the loss {p.live_at_loss_bytes / MIB:.0f}, "
          f"loss extra {p.loss_extra_bytes / MIB:.0f}, workspace {p.workspace_bytes / MIB:.0f} MiB")
    print(verdict_table([p], reserve))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
