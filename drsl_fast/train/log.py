"""What a run reports: console lines (rank 0), ``metrics.jsonl`` (every logged
point, machine-readable), TensorBoard scalars and images when the
``tensorboard`` package is installed, and progress bars."""
import json
import os
import sys
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

    def bar(self, total: int, initial: int, description: str):
        """:func:`progress` through this log (silent when progress is off)."""
        return progress(total, description, self.info if self.progress_bars else None, initial)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class PlainProgress:
    """The calls of a tqdm bar, reported as whole lines through ``write``
    (None: silent), so a log that is not a terminal holds no carriage returns."""

    def __init__(self, total: int, initial: int, description: str, write):
        self.total, self.done, self.description, self.write = total, initial, description, write
        self.every = max(1, total // 4)
        self.began, self.postfix = time.perf_counter(), ""

    def say(self, line: str) -> None:
        if self.write is not None:
            self.write(line)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def update(self, count: int = 1) -> None:
        before, self.done = self.done, self.done + count
        if self.done // self.every > before // self.every and self.done < self.total:
            self.say(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.began
        return f"{self.description}: {self.done}/{self.total} in {elapsed:.0f} s" + \
            (f" ({self.postfix})" if self.postfix else "")

    def close(self) -> None:
        self.say(self.line())


def progress(total: int, description: str, write=None, initial: int = 0):
    """A tqdm bar on a terminal; elsewhere (a log file, CI) a plain line every
    quarter of the way and at the end, through ``write`` (e.g. :func:`to_stderr`).
    ``write`` None is silent everywhere."""
    if write is not None and sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=description, dynamic_ncols=True, leave=False)
    return PlainProgress(total, initial, description, write)


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def quiet_log() -> RunLog:
    return RunLog("", enabled=False)
