import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from llmfoundry_pl import callbacks
from llmfoundry_pl.callbacks import TokenThroughputMonitor
from llmfoundry_pl.config import DataConfig, ModelConfig
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.lit_module import LitLlama

# What each training step, each validation and what follows it (the sample text, checkpoints) "take" on the clock
STEP_S, VALIDATION_S, AFTER_VALIDATION_S = 0.25, 30.0, 7.0


class FakeClock(L.Callback):
    """time.perf_counter for the run: each training batch takes STEP_S, each validation VALIDATION_S. Listed before
    the monitor, so a batch's time has passed when the monitor reads the clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_end(self, *args) -> None:
        self.now += STEP_S

    def on_validation_batch_end(self, *args) -> None:
        self.now += VALIDATION_S


class AfterValidation(L.Callback):
    """Another callback's work after each validation (listed after the monitor, as the sample text is; Lightning
    runs ModelCheckpoint after every callback)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_validation_end(self, *args) -> None:
        self.clock.now += AFTER_VALIDATION_S


def test_throughput_reads_the_clock_only_on_logging_steps_and_leaves_validation_out(cache_dir, monkeypatch):
    # Lightning's ThroughputMonitor reads the clock (on a GPU: a sync) after every batch; ours only on the steps the
    # loggers write, and once as training goes on after a validation. Rates between two readings must still be
    # exact, and a validation inside the window, or the sample and checkpoints after it, must not lower them.
    datamodule = TextDataModule(DataConfig(vocab_size=512, seq_len=32, batch_size=4, cache_dir=str(cache_dir)))
    lit = LitLlama(ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32))
    clock, monitor = FakeClock(), TokenThroughputMonitor(window_size=8, measure_cpu_peak=False)
    read_at = []
    read_clock = monitor._read_clock
    def counted_read(module):
        read_at.append((trainer.global_step, trainer.validating))
        return read_clock(module)

    monkeypatch.setattr(monitor, "_read_clock", counted_read)
    logged = []

    class Logged(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if "train/device/items_per_sec" in trainer.callback_metrics:
                logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    trainer = L.Trainer(max_steps=16, log_every_n_steps=4, val_check_interval=10, limit_val_batches=1,
                        accumulate_grad_batches=2, callbacks=[clock, monitor, AfterValidation(clock), Logged()],
                        logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                        enable_model_summary=False)
    monkeypatch.setattr(time, "perf_counter", clock)
    trainer.fit(lit, datamodule=datamodule)
    monkeypatch.undo()

    tokens_per_step = 2 * 4 * 32  # 2 micro-batches of 4 × 32 tokens
    first = logged[0]
    # The first rates come at step 12, from the readings at steps 4, 8 and 12 (window_size=8): 16 micro-batches of
    # STEP_S each, the validations at steps 5 and 10 left out.
    assert first["train/device/items_per_sec"] == pytest.approx(tokens_per_step / (2 * STEP_S))
    assert first["train/device/batches_per_sec"] == pytest.approx(1 / STEP_S)
    flops_per_batch = lit.model.flops_per_token(32) * 4 * 32  # 4 windows of 32 tokens
    assert first["train/device/flops_per_sec"] == pytest.approx(flops_per_batch / STEP_S)
    assert logged[-1]["train/lengths"] == 16 * tokens_per_step
    # start, logging steps, training going on after the validations at steps 5, 10 and 15, and its end
    assert [step for step, validating in read_at if not validating] == [0, 4, 5, 8, 10, 12, 15, 16, 16]
    assert [step for step, validating in read_at if validating] == [5, 10, 15]  # each validation's start


def test_throughput_totals_count_on_after_a_resume(cache_dir, tmp_path, monkeypatch):
    # train/time, train/batches, train/samples and train/lengths restarted at 0 in a resumed run's part of
    # metrics.csv, while train/tokens went on
    datamodule = TextDataModule(DataConfig(vocab_size=512, seq_len=32, batch_size=4, cache_dir=str(cache_dir)))
    config = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)

    def fit(max_steps: int, clock: FakeClock, ckpt_path: Path | None = None) -> dict[str, float]:
        logged = {}

        class Logged(L.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                logged.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

        trainer = L.Trainer(max_steps=max_steps, log_every_n_steps=4, limit_val_batches=0, accumulate_grad_batches=2,
                            callbacks=[clock, TokenThroughputMonitor(window_size=8, measure_cpu_peak=False), Logged()],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            use_distributed_sampler=False, enable_model_summary=False)
        with monkeypatch.context() as patched:
            patched.setattr(time, "perf_counter", clock)
            trainer.fit(LitLlama(config), datamodule=datamodule, ckpt_path=ckpt_path)
            clock.now += 100.0  # what comes after training (a final validation, saving) is not training time
            trainer.save_checkpoint(tmp_path / "last.ckpt")
        return logged

    fit(8, FakeClock())
    later = FakeClock()
    later.now = 5000.0  # another process's clock
    resumed = fit(16, later, tmp_path / "last.ckpt")
    micro_batches = 16 * 2
    assert resumed["train/batches"] == micro_batches and resumed["train/samples"] == micro_batches * 4
    assert resumed["train/lengths"] == micro_batches * 4 * 32
    assert resumed["train/time"] == pytest.approx(micro_batches * STEP_S)


@pytest.mark.parametrize(("precision", "dtype"), [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_cpu_mfu_is_measured_against_the_matmul_peak_of_the_precision(monkeypatch, precision, dtype):
    # bf16-mixed multiplies in bf16, which a CPU with native bf16 (AVX512-BF16, AMX) runs about twice as fast as
    # fp32: MFU against the fp32 peak would read above 100%.
    timed = []
    monkeypatch.setattr(callbacks, "measure_matmul_flops", lambda device, dtype: timed.append(dtype) or 1e11)
    assert callbacks.peak_matmul_flops(torch.device("cpu"), precision) == 1e11  # lfpl-bench's and lfpl-plan's peak
    trainer = L.Trainer(precision=precision, logger=False, enable_progress_bar=False, enable_model_summary=False)
    monitor = TokenThroughputMonitor()
    monitor.setup(trainer, None, "fit")
    assert timed == [dtype, dtype] and monitor.throughput.available_flops == 1e11


@pytest.mark.parametrize(("name", "precision", "matmul_precision", "expected"), [
    ("NVIDIA H200", "bf16-mixed", "highest", 989.4e12),  # what an SXM H200 calls itself: not in Lightning's table
    ("NVIDIA H200 NVL", "16-mixed", "highest", 835.5e12),  # Lightning lists its with-sparsity figure
    ("NVIDIA H200", "32-true", "highest", 66.9e12),
    ("NVIDIA H200", "32-true", "high", 494.7e12),  # fp32 matmuls as TF32
    ("NVIDIA H100 NVL", "bf16-mixed", "highest", 835.5e12),  # Lightning's 1978.8e12 read MFU 2.4x low
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", "highest", 989.4e12),  # the SXM part: Lightning's figure is right
])
def test_hopper_mfu_is_measured_against_its_dense_spec(monkeypatch, name, precision, matmul_precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: matmul_precision)
    monkeypatch.setattr(callbacks, "measure_matmul_flops", lambda *a, **k: pytest.fail("timed a matmul"))
    assert callbacks.peak_matmul_flops(torch.device("cuda", 0), precision) == expected


def test_progress_bar_total_counts_micro_batches_under_accumulation():
    # Lightning counts the steps left as batches: 3 steps of 4 micro-batches read 3/3 100%, then 4/? ... 12/?
    bar = callbacks.LossProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=5, global_step=2, accumulate_grad_batches=4,
                                   num_training_batches=1000)
    assert bar.total_train_batches == 12
    bar._trainer.num_training_batches = 10  # an epoch ends first
    assert bar.total_train_batches == 10


def test_sample_text_is_drawn_once_per_step(cache_dir, monkeypatch):
    # A trainer.validate after fitting, on a step fit validated already, would print that validation's sample again.
    datamodule = TextDataModule(DataConfig(vocab_size=512, seq_len=32, batch_size=4, cache_dir=str(cache_dir)))
    datamodule.prepare_data()
    lit = LitLlama(ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32))
    lit.set_tokenizer(datamodule.tokenizer)
    sampled_at = []
    monkeypatch.setattr(callbacks, "generate_text", lambda *a, **k: sampled_at.append(trainer.global_step) or "")
    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False,
                        callbacks=[callbacks.SampleTextCallback(max_new_tokens=2)], enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, enable_model_summary=False)
    trainer.validate(lit, datamodule=datamodule, verbose=False)  # lfpl-train's initial_validation
    lit.val_metrics.reset()  # (as lfpl-train does: fit cannot update sums made under inference mode)
    trainer.fit(lit, datamodule=datamodule)
    trainer.validate(lit, datamodule=datamodule, verbose=False)
    assert sampled_at == [0, 2, 4]


class ScriptedValidation(L.LightningModule):
    """One weight, trained on ones; each validation logs the next of ``losses`` as val/loss."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.losses = iter(losses)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return (self.weight * batch).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", next(self.losses))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.ones(100, 1))

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.ones(1, 1))


def test_last_checkpoint_is_saved_at_every_validation_not_only_at_the_best(tmp_path):
    # Lightning 2.6's ModelCheckpoint saves last.ckpt only with a new best: here the last validation is worse than
    # the one before, and last.ckpt stayed at step 4 of 6.
    checkpoint = callbacks.LastAndBestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/loss",
                                                 save_top_k=1, save_last=True)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, callbacks=[checkpoint], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ScriptedValidation(losses=[2.0, 1.0, 1.5]))
    saved = {p.name: torch.load(p, weights_only=False)["global_step"] for p in tmp_path.iterdir()}
    assert saved == {"best.ckpt": 4, "last.ckpt": 6}
    assert checkpoint.last_model_path == str(tmp_path / "last.ckpt")


def test_a_resume_into_the_run_folder_keeps_the_curve_on_disk_at_once(tmp_path):
    # Lightning's CSV logger deletes metrics.csv when its writer is made; the rows kept were in memory only, and a
    # resume that failed before its first log (a refused setting, a kill) left no metrics.csv at all
    from lightning.pytorch.loggers import CSVLogger

    from llmfoundry_pl.cli.train import _keep_the_curve_before

    logger = CSVLogger(tmp_path, name="", version="")
    path = Path(logger.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,step,train/loss,val/loss\n0,1,5.0,\n0,2,4.5,\n0,2,,4.7\n0,3,4.2,\n")
    _keep_the_curve_before(2, [logger])
    assert path.read_text().splitlines() == ["epoch,step,train/loss,val/loss", "0,1,5.0,", "0,2,,4.7"]


def test_a_run_resumed_inside_its_epoch_has_a_progress_bar_total(monkeypatch):
    # Lightning skips on_train_epoch_start when it restarts inside the epoch (every resume from a validation's
    # checkpoint): "Training: 160/? ... 400/?", no total and no time left
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end", lambda *args: None)  # Lightning's own update
    bar = callbacks.LossProgressBar()
    trainer = SimpleNamespace(max_steps=8, accumulate_grad_batches=2, num_training_batches=16, current_epoch=0,
                              sanity_checking=False)
    bar._trainer = trainer
    bar.on_train_start(trainer, None)
    assert bar.train_progress_bar.total is None  # as Lightning leaves it
    bar.on_train_batch_end(trainer, None, None, None, 8)  # the first batch after a resume at step 4
    assert (bar.train_progress_bar.total, bar.train_progress_bar.initial) == (16, 8)
    bar.train_progress_bar.total = 12  # set by on_train_epoch_start, as in a run that did not resume: kept
    bar.on_train_batch_end(trainer, None, None, None, 9)
    assert bar.train_progress_bar.total == 12
    bar.train_progress_bar.close()


def test_the_learning_rate_is_logged_once_per_optimizer_step(monkeypatch):
    # Lightning decides by the optimizer steps taken, which stand still while micro-batches accumulate: each logged
    # step had its rate written once per micro-batch
    from lightning.pytorch.callbacks import LearningRateMonitor

    logged = []
    monkeypatch.setattr(LearningRateMonitor, "on_train_batch_start", lambda self, t, m, b, i: logged.append(i))
    monitor = callbacks.StepLearningRateMonitor(logging_interval="step")
    trainer = SimpleNamespace(accumulate_grad_batches=2)
    for batch_idx in range(6):
        monitor.on_train_batch_start(trainer, None, None, batch_idx)
    assert logged == [0, 2, 4]
