"""``lfpl-bench``: how fast does training run, and where does the time go?

    lfpl-bench                                                   # the default model on whatever hardware is found
    lfpl-bench model=ref16m data.vocab_size=8192 hardware=cpu bench.batch_size=8 bench.seq_len=256
    lfpl-bench model=base hardware=rtx5060 compile=true
    lfpl-bench model=base compile=true bench.rounds=3             # medians of 3 rounds each, contenders in turn
    lfpl-bench model=base compile=true trainer=ddp trainer.devices=8  # all ranks' tokens/s, MFU against 8 devices
    lfpl-bench -m compile=true,false model.logits=full,chunked    # 4 jobs, then a table of their figures

Times, on the same model shape and the same data windows: (1) the project's Lightning training step, (2) a plain
PyTorch loop doing the same work (forward, cross-entropy, backward, clipping, AdamW) — so Lightning's overhead is a
number — and (3) litgpt's ``GPT`` of the same shape when litgpt is installed. For each: tokens/s, MFU (against the
matmul peak measured in this process on a CPU, the spec-sheet peak on a GPU), peak memory, and the share of each
step spent waiting for data. Prints a table, then one JSON line (``weights_finite`` false, and a warning, when the
timed steps left NaN or inf weights: figures of a training that diverged). With several devices (DDP, FSDP) only
the Lightning step is timed: its tokens/s counts every rank, and rank 0 reports. A multirun (``-m``) runs the jobs
in turn in one process, each measured afresh (``memory_meter``), and ends with a table of every job's figures.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from llmfoundry_pl import memory_meter
from llmfoundry_pl.allocator import keep_freed_memory
from llmfoundry_pl.callbacks import HALF_PRECISION, peak_matmul_flops, synchronize
from llmfoundry_pl.cli.common import (
    build_trainer,
    compile_training_step,
    fail_sweep_job_alone,
    prepare_data_and_model,
    seed_everything,
    to_dataclass,
)
from llmfoundry_pl.cli.ddp import end_distributed_job
from llmfoundry_pl.cli.sweep_summary import write_final_metrics
from llmfoundry_pl.config import BenchSettings, ConfigError, ModelConfig, OptimConfig
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.data.datamodule import IGNORE_INDEX
from llmfoundry_pl.lit_module import LitLlama, adamw_param_groups, check_adamw_eps, use_fused_adamw
from llmfoundry_pl.loss import next_token_loss, uses_chunked_loss
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.planner import fsdp_shards, plan_memory


class StepTimer(L.Callback):
    """When each micro-batch starts and ends, and how long the loop waited before it (fetching the batch, plus its
    own bookkeeping). The GPU is synchronised only after the first step (to time it: compilation) and at the end,
    so host-side work between steps overlaps with GPU work as in a real run."""

    def __init__(self, timed_from: int) -> None:
        self.timed_from = timed_from  # the first timed micro-batch starts on an idle GPU
        self.starts: list[float] = []
        self.waits: list[float] = []
        self.first_step = self.end = 0.0
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.timed_from:
            synchronize(pl_module.device)
        self.starts.append(time.perf_counter())
        if self._last_end is not None:
            self.waits.append(self.starts[-1] - self._last_end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            synchronize(pl_module.device)
            self.first_step = time.perf_counter() - self.starts[0]
        self._last_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self.end = time.perf_counter()

    def figures(self, row: Callable[..., dict[str, float]], peak_mem: int) -> dict[str, float]:
        """The timed micro-batches as ``row`` reports them. ``waits[i]`` is the gap before ``starts[i + 1]``."""
        skip = self.timed_from
        return row(self.end - self.starts[skip], len(self.starts) - skip, sum(self.waits[skip:]), self.first_step,
                   peak_mem)


def bench(cfg: DictConfig) -> dict[str, float]:
    settings = to_dataclass(cfg.bench, BenchSettings)
    keep_freed_memory(cfg.keep_freed_memory)  # false undoes an earlier sweep job's true
    with open_dict(cfg):  # bench.batch_size / bench.seq_len override the data settings (and the model's context)
        cfg.data.batch_size = settings.batch_size or cfg.data.batch_size
        cfg.data.seq_len = settings.seq_len or cfg.data.seq_len
    seed_everything(cfg.seed)
    check_adamw_eps(cfg.optim.eps, str(cfg.trainer.precision))
    datamodule, model_cfg, network = prepare_data_and_model(cfg)
    if not isinstance(datamodule, TextDataModule) or network is not None:
        raise ConfigError("lfpl-bench times pretraining from scratch: use data=text and no init_from")
    total = settings.warmup + settings.steps
    trainer, timer = _timed_trainer(cfg, settings.warmup, total)
    device, devices = trainer.strategy.root_device, trainer.world_size
    # The planner's estimate, reported beside the measured memory; first, so a precision it cannot model (64-true)
    # is refused before the minutes of timing, not after them.
    precision, accumulate = str(trainer.precision), cfg.trainer.accumulate_grad_batches or 1
    shards = fsdp_shards(str(cfg.trainer.strategy), devices)
    planned = plan_memory(model_cfg, cfg.data.batch_size, cfg.data.seq_len, precision, accumulate, shards,
                          compiled=cfg.compile, device_type=device.type)
    launching = trainer.strategy  # the first fit's strategy starts the other ranks, so it reaps them at the end
    floor = memory_meter.start(device)  # before the model exists: the training step's own memory is above it
    lit = LitLlama(model=model_cfg, optim=to_dataclass(cfg.optim, OptimConfig))
    if cfg.compile:
        compile_training_step(lit, trainer)
    # Under DDP every rank times the same steps (the gradients' all-reduce keeps them in step): the Lightning row
    # counts the tokens of all ranks, and MFU is against the peak of all devices.
    peak_flops = peak_matmul_flops(device, str(trainer.precision)) * devices
    # Counted before fitting: under FSDP with several ranks each rank then holds a slice of the weights.
    params, flops_per_token = lit.model.num_params(), lit.model.flops_per_token(cfg.data.seq_len)
    tokens_per_call = cfg.data.batch_size * cfg.data.seq_len * devices  # one micro-batch on every device
    figures = partial(_row, tokens_per_call=tokens_per_call, flops_per_token=flops_per_token, peak_flops=peak_flops)
    # The other contenders' models are built afresh in each round and dropped after it, so that the Lightning
    # step's peak memory never holds their weights.
    contenders: dict[str, Callable[[], torch.nn.Module]] = {}
    if devices > 1:
        if (settings.plain or settings.litgpt) and trainer.is_global_zero:
            print(f"the plain loop and litgpt's GPT run on one device: their rows are skipped with {devices} devices")
    else:
        if settings.plain:
            contenders["plain"] = partial(Transformer, model_cfg)
        if settings.litgpt and importlib.util.find_spec("litgpt") is None:
            print("litgpt is not installed: its row is skipped (pip install litgpt to add it)")
        elif settings.litgpt:
            contenders["litgpt"] = partial(_litgpt_twin, model_cfg)
    # The Lightning step's loss (full or chunked logits, as model.logits picks) for the plain loop, litgpt's own
    # model output for its row; compiled as LitLlama.compile_training compiles it: model and loss in one graph.
    losses = {"plain": partial(next_token_loss, chunked=uses_chunked_loss(model_cfg.logits, cfg.compile)),
              "litgpt": _litgpt_loss}
    loss_fns = {name: torch.compile(fn) if cfg.compile else fn for name, fn in losses.items()}

    # Rounds alternate the contenders, so that a machine drifting faster or slower over the minutes (a shared VM,
    # a GPU's clocks) shows as spread within each contender instead of as a gap between them.
    rounds: dict[str, list[dict[str, float]]] = {"lightning": [], **{name: [] for name in contenders}}
    failed = True
    try:
        for i in range(settings.rounds):
            if i:  # a Trainer fits once; the model, compiled or not, carries over
                trainer, timer = _timed_trainer(cfg, settings.warmup, total)
            memory_meter.start(device)
            trainer.fit(lit, datamodule=datamodule)
            rounds["lightning"].append(_own_memory(timer.figures(figures, memory_meter.peak(device)), floor))
            for name, build in contenders.items():
                torch.manual_seed(cfg.seed)
                before = memory_meter.start(device)  # the Lightning model is still there: count what comes on top
                row = _plain_loop(build().to(device), loss_fns[name], datamodule, cfg, precision, device, total,
                                  settings.warmup, figures)
                rounds[name].append(_own_memory(row, before))
        failed = False
    finally:
        end_distributed_job(launching, failed)
    rows = {name: _combine(figures_per_round) for name, figures_per_round in rounds.items()}
    # Speed says nothing about whether the steps trained: a step that makes NaN weights runs as fast (compiled
    # written-out attention in bf16 on a CPU did, and was benchmarked for a day as the faster choice).
    weights_finite = all(bool(torch.isfinite(p).all()) for p in lit.model.parameters())

    if not trainer.is_global_zero:
        return {}
    setup = {"params": params, "devices": devices, "precision": precision,
             "tokens_per_step": tokens_per_call * accumulate, "peak_flops": peak_flops,
             "attention": planned.attention, "logits": planned.logits,
             "planned_mem_bytes": planned.resident(model_cfg.activation_checkpointing, device.type),
             "weights_finite": weights_finite}
    return _report(rows, setup, cfg, device)


def _timed_trainer(cfg: DictConfig, warmup: int, total: int) -> tuple[L.Trainer, StepTimer]:
    """A Trainer for ``total`` optimizer steps of training only (no validation, logging or checkpoints), and the
    timer it reports to, which leaves the first ``warmup`` steps untimed."""
    timer = StepTimer(timed_from=warmup * (cfg.trainer.accumulate_grad_batches or 1))  # counted in micro-batches
    trainer = build_trainer(cfg.trainer, [timer], [], max_steps=total, limit_val_batches=0, num_sanity_val_steps=0,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer, timer


def _row(seconds: float, calls: int, wait: float, first_step: float, peak_mem: int, *, tokens_per_call: int,
         flops_per_token: int, peak_flops: float) -> dict[str, float]:
    """Figures of one contender in one round: ``calls`` micro-batches of ``tokens_per_call`` tokens in ``seconds``,
    ``wait`` of which went to fetching data."""
    tokens_per_s = calls * tokens_per_call / seconds
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak_flops,
            "data_wait_frac": wait / seconds, "first_step_s": first_step, "peak_mem_bytes": peak_mem}


def _own_memory(row: dict[str, float], floor: int) -> dict[str, float]:
    """The row with the memory its contender added: its peak above ``floor``, what was in use before its model was
    built (on a CPU that leaves out the interpreter, the libraries and the data; on a GPU, other models)."""
    return row | {"train_mem_bytes": row["peak_mem_bytes"] - floor}


def _combine(rounds: list[dict[str, float]]) -> dict[str, float]:
    """One contender's figures over its rounds: the median of each rate, the first round's first step (the one that
    compiles) and peak memory, and, with two rounds or more, the spread of tokens/s (max - min, as a share of the
    median). The first round's memory, because it is the one that is its own on every device: where the peak
    cannot be restarted (``memory_meter``: a CPU outside Linux), later rounds would count the other contenders'."""
    row = {key: statistics.median(r[key] for r in rounds) for key in ("tokens_per_s", "mfu", "data_wait_frac")}
    row |= {key: rounds[0][key] for key in ("first_step_s", "peak_mem_bytes", "train_mem_bytes")}
    if len(rounds) > 1:
        tokens_per_s = [r["tokens_per_s"] for r in rounds]
        row["tokens_per_s_spread"] = (max(tokens_per_s) - min(tokens_per_s)) / row["tokens_per_s"]
    return row


def _plain_loop(model: torch.nn.Module, loss_fn: Callable, datamodule: TextDataModule, cfg: DictConfig,
                precision: str, device: torch.device, total: int, warmup: int,
                figures: Callable[..., dict[str, float]]) -> dict[str, float]:
    """The same work as the Lightning step, written out: what a hand-rolled PyTorch script would do. ``precision``
    is the one the Trainer runs (``trainer.precision``, not the setting: Lightning reads 16-mixed on a CPU as
    bf16-mixed, and the aliases bf16 and 16 as -mixed), in the same way: autocast for -mixed (with a gradient
    scaler for fp16), the weights cast for -true. Taken from the setting, bf16-true ran the plain loop in fp32."""
    accumulate = cfg.trainer.accumulate_grad_batches or 1
    if precision.endswith("-true") and precision in HALF_PRECISION:
        model = model.to(HALF_PRECISION[precision])
    optim = cfg.optim
    fused = use_fused_adamw(optim.fused, device.type, precision, cfg.trainer.gradient_clip_val)  # as LitLlama does
    optimizer = torch.optim.AdamW(adamw_param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                                  eps=optim.eps, fused=fused)
    autocast = (torch.autocast(device.type, dtype=HALF_PRECISION[precision]) if precision.endswith("-mixed")
                else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")  # off: each call passes through
    batches: Iterator = iter(datamodule.train_batches(0, total * accumulate))
    wait = first_step = 0.0
    for step in range(total):
        if step == warmup:  # the timed steps start here, on an idle GPU
            synchronize(device)
            start, wait = time.perf_counter(), 0.0
        t0 = time.perf_counter()
        for _ in range(accumulate):
            fetch_start = time.perf_counter()
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            wait += time.perf_counter() - fetch_start
            with autocast:
                loss = loss_fn(model, x, y) / accumulate
            scaler.scale(loss).backward()
        if cfg.trainer.gradient_clip_val:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            synchronize(device)
            first_step = time.perf_counter() - t0
    synchronize(device)
    seconds = time.perf_counter() - start
    return figures(seconds, (total - warmup) * accumulate, wait, first_step, memory_meter.peak(device))


def _litgpt_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)


def _litgpt_twin(cfg: ModelConfig) -> torch.nn.Module:
    """litgpt's GPT with our shape (Llama flavour: RMSNorm, SwiGLU, RoPE, GQA); litgpt is not a dependency."""
    from litgpt.config import Config
    from litgpt.model import GPT

    return GPT(Config(
        block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_query_groups=cfg.n_kv_heads, n_embd=cfg.dim, intermediate_size=cfg.hidden_dim,
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=cfg.norm_eps,
        mlp_class_name="LLaMAMLP", rope_base=int(cfg.rope_theta),
    ))


def _report(rows: dict[str, dict[str, float]], setup: dict[str, float | str | bool], cfg: DictConfig,
            device: torch.device) -> dict[str, float]:
    devices = setup["devices"]
    on = f"{devices} × {device.type}" if devices > 1 else str(device)
    print(f"\n{setup['params'] / 1e6:.1f}M parameters, batch {cfg.data.batch_size} × {cfg.data.seq_len} tokens "
          f"per device, precision {setup['precision']}, {on}, compile={cfg.compile}, "
          f"attention={setup['attention']}, logits={setup['logits']}; peak "
          f"{setup['peak_flops'] / 1e12:.3f} TFLOP/s")
    n_rounds = cfg.bench.rounds
    if n_rounds > 1:
        print(f"medians of {n_rounds} rounds, contenders alternating; spread: (max - min) / median of tokens/s")
    spread = f" {'spread':>7}" if n_rounds > 1 else ""
    print(f"{'':<10} {'tokens/s':>10}{spread} {'MFU':>6} {'data wait':>10} {'first step':>11} {'peak memory':>12} "
          f"{'own memory':>11}")
    for name, r in rows.items():
        spread = f" {r['tokens_per_s_spread']:>7.1%}" if n_rounds > 1 else ""
        print(f"{name:<10} {r['tokens_per_s']:>10,.0f}{spread} {r['mfu']:>6.1%} {r['data_wait_frac']:>10.1%} "
              f"{r['first_step_s']:>10.2f}s {r['peak_mem_bytes'] / 2**20:>8,.0f} MiB "
              f"{r['train_mem_bytes'] / 2**20:>7,.0f} MiB")
    own, planned = rows["lightning"]["train_mem_bytes"], setup["planned_mem_bytes"]
    result = {**rows["lightning"], **setup, "plan_error": planned / own - 1}
    print(f"own memory: the peak above what was in use before the contender's model was built "
          f"({memory_meter.counted(device)}); lfpl-plan's estimate for the Lightning step: {planned / 2**20:,.0f} MiB "
          f"({result['plan_error']:+.0%})")
    for name in ("plain", "litgpt"):
        if name in rows:
            result[f"{name}_tokens_per_s"] = rows[name]["tokens_per_s"]
            result[f"{name}_mfu"] = rows[name]["mfu"]
            result[f"{name}_train_mem_bytes"] = rows[name]["train_mem_bytes"]
            if n_rounds > 1:
                result[f"{name}_tokens_per_s_spread"] = rows[name]["tokens_per_s_spread"]
    if "plain" in rows:
        result["lightning_overhead"] = 1 - result["tokens_per_s"] / result["plain_tokens_per_s"]
        print(f"Lightning step vs plain loop: {result['lightning_overhead']:+.1%} overhead")
    if not setup["weights_finite"]:
        print("warning: the weights are NaN or inf after the timed steps, so these figures time a training that "
              "diverged; lfpl-train with the same settings shows from which step")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    return result


def run(cfg: DictConfig) -> None:
    """lfpl-bench's task (see :func:`~llmfoundry_pl.cli.app.hydra_command`): :func:`bench`; in a sweep, a job that
    cannot run (a batch too large) fails alone, and each job's figures go to the sweep's table."""
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        result = bench(cfg)
    except (ConfigError, RuntimeError) as e:
        if not fail_sweep_job_alone(e, output_dir, {}):
            raise
        return
    if result and HydraConfig.get().mode == RunMode.MULTIRUN:  # rank 0 of a sweep's job: figures for its table
        write_final_metrics(output_dir, result)
