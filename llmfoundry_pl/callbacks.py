"""The callbacks Lightning does not ship as we need them; everything else in conf/callbacks is Lightning's.
Also the peak FLOP/s that MFU is measured against (used by the throughput callback, lfpl-bench and lfpl-plan)."""

from __future__ import annotations

import functools
import math
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
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
        self._sampled_at: int | None = None  # the step of the last sample

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once per step: a trainer.validate after fitting, on a step fit validated already, has the same weights and
        # seed, and so would print the same sample again.
        if trainer.sanity_checking or pl_module.tokenizer is None or trainer.global_step == self._sampled_at:
            return
        self._sampled_at = trainer.global_step
        model = pl_module.sampling_model()  # on every rank: under FSDP the ranks gather the weights together
        if model is None:  # not global rank 0
            return
        text = generate_text(
            model, pl_module.tokenizer, self.prompt, self.max_new_tokens,
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

    @property
    def total_train_batches(self) -> int | float:
        """The micro-batches left to train. Lightning 2.6 counts the optimizer steps left as batches: under gradient
        accumulation (4 micro-batches a step) the bar read 100% a quarter of the way in, then counted on without a
        total."""
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:  # as Lightning's
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, left)
        return super().total_train_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        """A resume restarts inside the epoch, where Lightning skips on_train_epoch_start: the bar had no total
        (``160/?``, no time left). Set at the first batch: the epoch's micro-batches, of which ``batch_idx`` were
        trained before the resume (Lightning counts the bar on from them)."""
        bar = self.train_progress_bar
        if bar is not None and bar.total is None and not trainer.sanity_checking:
            steps = trainer.max_steps * trainer.accumulate_grad_batches if trainer.max_steps > 0 else math.inf
            bar.reset(total=convert_inf(min(trainer.num_training_batches, steps)))
            bar.initial = batch_idx
            bar.set_description(f"Epoch {trainer.current_epoch}")
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class StepLearningRateMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor, logging once per optimizer step. It decides by the optimizer steps taken,
    which stand still while micro-batches accumulate: under gradient accumulation each logged step had its rate
    written once per micro-batch (2 identical rows at steps 9, 19, ... with 2 micro-batches a step)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the step's first micro-batch
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


class LastAndBestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``save_last=True`` writing last.ckpt at every validation again.

    Lightning 2.6 writes it only when a top-k checkpoint is saved at the same step: with ``save_top_k=1`` and
    ``monitor=val/loss``, only when the loss improved. A run whose last validation was not its best then printed a
    last.ckpt of an earlier step (6 steps trained, last.ckpt at step 3): generate, eval and export used older
    weights, and ``ckpt_path=last`` trained steps again. The private methods used here are the ones Lightning's own
    ``on_validation_end`` calls (2.4-2.6, the versions pyproject.toml allows); the test of last.ckpt guards them."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Skipped when a checkpoint was saved at this step already (the best, and then last.ckpt with it).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer) and \
                not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def save_after_validation(self, trainer: L.Trainer) -> None:
        """What a validation during fit saves, for one run after it (``trainer.validate``: lfpl-train's final one,
        when fit's last validation came before its last step): the best checkpoint, if the weights are, and
        last.ckpt. Only last.ckpt was saved there, so the best of a run of 10 steps validated at 4 and 8 stayed
        step 8's though the final validation's loss was lower."""
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:  # a training metric (train/loss) is gone by now
            self._save_topk_checkpoint(trainer, candidates)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)


class TokenThroughputMonitor(L.Callback):
    """Training tokens/s and MFU, computed by Lightning's ``Throughput`` over about the last ``window_size``
    optimizer steps and logged under the names Lightning's ThroughputMonitor uses (``train/device/items_per_sec``
    — items are tokens — ``train/device/flops_per_sec``, ``train/device/mfu``, ...). The time from a validation's
    start until training goes on is left out: the validation, and what other callbacks do after it (the sample
    text, saving checkpoints), which counted as training time and lowered the rate of the window holding it.

    Why not Lightning's ThroughputMonitor: it synchronises the GPU after every batch to read the clock, which stops
    the CPU from queueing the next step's kernels while the GPU runs this one. Here the clock is read only on the
    steps the loggers write (every ``trainer.log_every_n_steps``), as litgpt's pretraining loop does: one wait per
    logging interval, and the time between two readings is still exact.

    Lightning knows the peak FLOP/s of GPUs from their spec sheets but not of CPUs; there we measure the peak once
    (a large matmul on this machine, in the dtype the precision multiplies in), so a CPU run reports MFU too.

    The totals (``train/time``, ``train/batches``, ``train/samples``, ``train/lengths``) are saved in checkpoints, so
    that a resumed run counts on from them, as ``train/tokens`` does.
    """

    def __init__(self, window_size: int = 20, measure_cpu_peak: bool = True) -> None:
        self.window_size, self.measure_cpu_peak = window_size, measure_cpu_peak
        self.throughput: Throughput | None = None
        self._totals = {"time": 0.0, "batches": 0, "samples": 0, "tokens": 0}  # before this fit: a checkpoint's

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device, precision = trainer.strategy.root_device, str(trainer.precision)
        timed_cpu = device.type == "cpu" and self.measure_cpu_peak
        # lfpl-bench's peak: a GPU's spec sheet, a CPU's timed matmul; none on MPS (no spec sheet, no timing)
        peak = int(peak_matmul_flops(device, precision)) if device.type == "cuda" or timed_cpu else None
        if timed_cpu:
            rank_zero_info(f"MFU is measured against this CPU's matmul peak in {precision}, {peak / 1e9:.0f} GFLOP/s "
                           f"with {torch.get_num_threads()} threads")
        # Readings come every log_every_n_steps steps: keep enough of them to span window_size steps.
        readings = max(2, math.ceil(self.window_size / trainer.log_every_n_steps) + 1)
        self.throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=readings)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.throughput.reset()
        self._start, self._paused_at = self._read_clock(pl_module) - self._totals["time"], None
        self._batches, self._samples, self._tokens = (self._totals[k] for k in ("batches", "samples", "tokens"))
        self._flops = 0
        self._last_read_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_at = self._read_clock(pl_module)  # what comes after (a final validation, its checkpoint) is not

    def state_dict(self) -> dict[str, float]:
        if not hasattr(self, "_start"):  # saved before training started
            return dict(self._totals)
        # Checkpoints are saved in pauses (after a validation, after training); the clock stopped at the pause's start
        now = self._paused_at if self._paused_at is not None else time.perf_counter()
        return {"time": now - self._start, "batches": self._batches, "samples": self._samples, "tokens": self._tokens}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self._totals = dict(state_dict)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._batches += 1
        self._samples += batch[0].size(0)
        self._tokens += batch[0].numel()
        self._flops += pl_module.flops_per_batch(batch)
        step = trainer.global_step  # optimizer steps so far; unchanged while gradients accumulate
        if step == self._last_read_step or step % trainer.log_every_n_steps:
            return
        self._last_read_step = step
        self.throughput.update(time=self._read_clock(pl_module) - self._start, batches=self._batches,
                               samples=self._samples, lengths=self._tokens, flops=self._flops)
        self._flops = 0  # Throughput takes the FLOPs done since its previous reading
        metrics = {f"train/{name}": float(value) for name, value in self.throughput.compute().items()}
        pl_module.log_dict(metrics, rank_zero_only=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._paused_at = self._read_clock(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        # Training goes on after a validation: as if the pause took no time. Read here rather than at the
        # validation's end, which other callbacks' work follows (Lightning saves the checkpoints last).
        if self._paused_at is not None:
            self._start += self._read_clock(pl_module) - self._paused_at
            self._paused_at = None

    @staticmethod
    def _read_clock(pl_module: L.LightningModule) -> float:
        """Seconds, once the device has finished the work queued so far (a GPU runs behind the CPU)."""
        synchronize(pl_module.device)
        return time.perf_counter()


def synchronize(device: torch.device) -> None:
    """Wait until a GPU has finished the work queued on it (its kernels run behind the CPU); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)  # a GPU runs behind the CPU: time the product, not its launch
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# Dense tensor-core FLOP/s where Lightning 2.6's table is wrong, first match wins. The SXM H200 names itself plainly
# "NVIDIA H200", which the table misses, and its H200 entries (and the H100 NVL's, 1978.8 TFLOP/s in bf16) are
# with-sparsity figures or another part's. The SXM H200 computes as the H100 SXM does (only its memory is larger and
# faster): the H100 SXM's dense figures. The NVL parts, H100 and H200 alike: half their datasheets' with-sparsity
# figures (1,671 TFLOP/s bf16 and fp16, 835 tf32), and fp32 as printed (60).
_NVL_DENSE = {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tf32": 417.5e12, torch.float32: 60e12}
_DENSE_SPEC_FLOPS = {
    "h100 nvl": _NVL_DENSE,
    "h200 nvl": _NVL_DENSE,
    "h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tf32": 494.7e12, torch.float32: 66.9e12},
}


def peak_matmul_flops(device: torch.device, precision: str) -> float:
    """The FLOP/s MFU is measured against: the dense spec-sheet figure on a GPU that Lightning (or
    ``_DENSE_SPEC_FLOPS``) knows, else a matmul timed here, in the dtype the precision multiplies in (a CPU with
    native bf16 multiplies bf16 about twice as fast as fp32)."""
    dtype = HALF_PRECISION.get(precision, torch.float32)
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device).lower()
        spec = next((flops for name, flops in _DENSE_SPEC_FLOPS.items() if name in chip), None)
        if spec is not None:  # fp32 matmuls run as TF32 unless their precision is "highest", as Lightning reads it
            tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
            return spec["tf32" if tf32 else dtype]
        flops = get_available_flops(device, dtype)
        if flops:
            return float(flops)
    return measure_matmul_flops(device, dtype=dtype)
