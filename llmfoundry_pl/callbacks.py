"""The callbacks Lightning does not ship as we need them; everything else in conf/callbacks is Lightning's.
Also the peak FLOP/s that MFU is measured against (used by the throughput callback, lfpl-bench and lfpl-plan)."""

from __future__ import annotations

import functools
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from llmfoundry_pl.inference import generate_text

HALF_PRECISION = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                  "16-true": torch.float16}


class SampleTextCallback(L.Callback):
    """Print a short generated continuation after every validation, to watch the model learn to write."""

    def __init__(
        self, prompt: str = "", max_new_tokens: int = 48, temperature: float = 0.8, top_k: int | None = 50,
        seed: int = 1337,
    ) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or pl_module.tokenizer is None:
            return
        text = generate_text(
            pl_module.model, pl_module.tokenizer, self.prompt, self.max_new_tokens,
            temperature=self.temperature, top_k=self.top_k, seed=self.seed,
        )
        message = f"[step {trainer.global_step}] sample: {self.prompt}{text}"
        bar = trainer.progress_bar_callback
        bar.print(message) if bar is not None else rank_zero_info(message)


class LossProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, with the training loss read when the bar refreshes (every ``refresh_rate`` batches).

    Why not ``self.log("train/loss", ..., prog_bar=True)``: Lightning turns every prog_bar metric into a Python
    number after every batch, whether a bar shows it or not (Lightning issue #21232). On a GPU, reading a number
    waits for the GPU to finish the step, so the CPU cannot queue the next step's kernels ahead of it. Read here, the
    loss crosses to the host once per refresh instead of once per batch."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")  # the tensor logged by the last training step
        return items if loss is None else {"train/loss": loss.item(), **items}


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor set up for (inputs, targets) token batches: logs tokens/s (``items_per_sec``)
    and, with the module's ``flops_per_batch``, MFU.

    Lightning knows the peak FLOP/s of GPUs from their spec sheets but not of CPUs; there it returns no peak and
    logs no MFU. We then measure the peak once (a large fp32 matmul on this machine), so a CPU run reports MFU too.
    """

    def __init__(self, window_size: int = 50, measure_cpu_peak: bool = True) -> None:
        super().__init__(batch_size_fn=lambda batch: batch[0].size(0), length_fn=lambda batch: batch[0].numel(),
                         window_size=window_size)
        self.measure_cpu_peak = measure_cpu_peak

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        if self.available_flops is None and self.measure_cpu_peak and device.type == "cpu":
            self.available_flops = int(measure_matmul_flops(device))
            if stage == "fit":
                rank_zero_info(f"MFU is measured against this CPU's fp32 matmul peak, {self.available_flops / 1e9:.0f} "
                               f"GFLOP/s with {torch.get_num_threads()} threads")
            for throughput in self._throughputs.values():  # created by super().setup() with no peak
                throughput.available_flops = self.available_flops


@functools.cache
def measure_matmul_flops(device: torch.device, n: int = 2048, dtype: torch.dtype = torch.float32, repeat: int = 10,
                         warmup_s: float = 0.5) -> float:
    """FLOP/s of an n×n @ n×n matmul on ``device`` with the threads this process has: the practical peak that
    MFU is measured against where no spec sheet applies; measured once per process. Half a second of warm-up
    first: a CPU coming out of idle runs its first matmuls at a lower clock (a cold measurement gave half the peak).
    On this shared 2-core VM the figure still varies by ±20% from run to run, and MFU with it."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:  # thread pool, caches, clock
        a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_matmul_flops(device: torch.device, precision: str) -> float:
    """The FLOP/s MFU is measured against: the spec sheet on a GPU Lightning knows, else a matmul timed here."""
    if device.type == "cuda":
        flops = get_available_flops(device, HALF_PRECISION.get(precision, torch.float32))
        if flops:
            return float(flops)
    return measure_matmul_flops(device)
