"""What a run reports: console lines (rank 0), ``metrics.jsonl`` (every logged
point, machine-readable), TensorBoard scalars and images when the
``tensorboard`` package is installed, and progress bars."""
import json
import os
import time
from typing import Dict

import numpy as np
from tqdm import tqdm


class RunLog:
    def __init__(self, directory: str, enabled: bool = True, tensorboard: bool = True, progress: bool = True):
        self.directory, self.enabled, self.progress_bars = directory, enabled, progress and enabled
        self.writer = None
        if enabled:
            os.makedirs(directory, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    pass
                else:
                    self.writer = SummaryWriter(os.path.join(directory, "tensorboard"))

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def scalars(self, tag: str, values: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.directory, "metrics.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"tag": tag, "step": step, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{tag}/{name}", value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def bar(self, total: int, initial: int, description: str) -> tqdm:
        return tqdm(total=total, initial=initial, desc=description, disable=not self.progress_bars,
                    dynamic_ncols=True, leave=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def quiet_log() -> RunLog:
    return RunLog("", enabled=False)
