"""``lfpl-bench``: how fast does training run, and where does the time go?

    lfpl-bench                                                   # the default model on whatever hardware is found
    lfpl-bench model=ref16m data.vocab_size=8192 hardware=cpu bench.batch_size=8 bench.seq_len=256
    lfpl-bench model=base hardware=rtx5060 compile=true

Times, on the same model shape and the same data windows: (1) the project's Lightning training step, (2) a plain
PyTorch loop doing the same work (forward, cross-entropy, backward, clipping, AdamW) — so Lightning's overhead is a
number — and (3) litgpt's ``GPT`` of the same shape when litgpt is installed. For each: tokens/s, MFU (against the
matmul peak measured in this process on a CPU, the spec-sheet peak on a GPU), peak memory, and the share of each
step spent waiting for data. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import nullcontext

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from llmfoundry_pl.allocator import keep_freed_memory
from llmfoundry_pl.callbacks import HALF_PRECISION, peak_matmul_flops, synchronize
from llmfoundry_pl.cli.common import CONFIG_PATH, prepare_data_and_model, require_compiler, to_dataclass, user_errors
from llmfoundry_pl.config import BenchSettings, ConfigError, ModelConfig, OptimConfig, register_configs
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.lit_module import LitLlama, use_fused_adamw
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.planner import plan_memory


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


def bench(cfg: DictConfig) -> dict[str, float]:
    settings = to_dataclass(cfg.bench, BenchSettings)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    with open_dict(cfg):  # bench.batch_size / bench.seq_len override the data settings (and the model's context)
        cfg.data.batch_size = settings.batch_size or cfg.data.batch_size
        cfg.data.seq_len = settings.seq_len or cfg.data.seq_len
    L.seed_everything(cfg.seed)
    datamodule, model_cfg, network = prepare_data_and_model(cfg)
    if not isinstance(datamodule, TextDataModule) or network is not None:
        raise ConfigError("lfpl-bench times pretraining from scratch: use data=text and no init_from")
    total = settings.warmup + settings.steps
    skip = settings.warmup * (cfg.trainer.accumulate_grad_batches or 1)  # untimed micro-batches
    timer = StepTimer(timed_from=skip)
    trainer = instantiate(
        cfg.trainer, max_steps=total, limit_val_batches=0, num_sanity_val_steps=0, logger=False, callbacks=[timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    device = trainer.strategy.root_device
    floor = _resident_memory(device)  # before the model exists: the training step's own memory is above it
    lit = LitLlama(model=model_cfg, optim=to_dataclass(cfg.optim, OptimConfig))
    if cfg.compile:
        require_compiler(device)
        lit.compile_training()
    tokens_per_call = cfg.data.batch_size * cfg.data.seq_len  # one micro-batch
    peak_flops = peak_matmul_flops(device, str(trainer.precision))
    flops_per_token = lit.model.flops_per_token(cfg.data.seq_len)
    _reset_peak_memory(device)
    trainer.fit(lit, datamodule=datamodule)
    # The timer sees micro-batches; waits[i] is the gap before starts[i + 1].
    rows = {"lightning": _row(timer.end - timer.starts[skip], len(timer.starts) - skip, sum(timer.waits[skip:]),
                              timer.first_step, tokens_per_call, flops_per_token, peak_flops, _peak_memory(device))}
    precision, accumulate = str(trainer.precision), cfg.trainer.accumulate_grad_batches or 1
    planned = plan_memory(model_cfg, cfg.data.batch_size, cfg.data.seq_len, precision, accumulate,
                          compiled=cfg.compile)
    memory = {"train_mem_bytes": rows["lightning"]["peak_mem_bytes"] - floor,
              "planned_mem_bytes": planned.resident(model_cfg.activation_checkpointing, device.type)}

    if settings.plain:
        torch.manual_seed(cfg.seed)
        plain = Transformer(model_cfg).to(device)
        rows["plain"] = _plain_loop(plain, datamodule, cfg, device, total, settings.warmup, flops_per_token, peak_flops)
    if settings.litgpt:
        litgpt_model = _litgpt_twin(model_cfg)
        if litgpt_model is None:
            print("litgpt is not installed: its row is skipped (pip install litgpt to add it)")
        else:
            rows["litgpt"] = _plain_loop(litgpt_model.to(device), datamodule, cfg, device, total, settings.warmup,
                                         flops_per_token, peak_flops)
    return _report(rows, memory, cfg, lit.model, device, peak_flops)


def _row(seconds: float, calls: int, wait: float, first_step: float, tokens_per_call: int, flops_per_token: int,
         peak_flops: float, peak_mem: int) -> dict[str, float]:
    """Figures of one contender: ``calls`` micro-batches of ``tokens_per_call`` tokens in ``seconds``, ``wait`` of
    which went to fetching data."""
    tokens_per_s = calls * tokens_per_call / seconds
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak_flops,
            "data_wait_frac": wait / seconds, "first_step_s": first_step, "peak_mem_bytes": peak_mem}


def _plain_loop(model: torch.nn.Module, datamodule: TextDataModule, cfg: DictConfig, device: torch.device,
                total: int, warmup: int, flops_per_token: int, peak_flops: float) -> dict[str, float]:
    """The same work as the Lightning step, written out: what a hand-rolled PyTorch script would do."""
    precision, accumulate = str(cfg.trainer.precision), cfg.trainer.accumulate_grad_batches or 1
    optim = cfg.optim
    fused = use_fused_adamw(optim.fused, device.type, precision, cfg.trainer.gradient_clip_val)  # as LitLlama does
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=fused)
    autocast = (torch.autocast(device.type, dtype=HALF_PRECISION[precision]) if precision.endswith("-mixed")
                else nullcontext())
    # The same compiled unit as LitLlama.compile_training: model and loss in one graph.
    loss_fn = torch.compile(_next_token_loss) if cfg.compile else _next_token_loss
    batches: Iterator = iter(datamodule.train_batches(0, total * accumulate))
    _reset_peak_memory(device)
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
            loss.backward()
        if cfg.trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            synchronize(device)
            first_step = time.perf_counter() - t0
    synchronize(device)
    seconds = time.perf_counter() - start
    return _row(seconds, (total - warmup) * accumulate, wait, first_step, cfg.data.batch_size * cfg.data.seq_len,
                flops_per_token, peak_flops, _peak_memory(device))


def _next_token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out  # litgpt's GPT returns logits, HF-style models an output
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


def _litgpt_twin(cfg: ModelConfig) -> torch.nn.Module | None:
    """litgpt's GPT with our shape (Llama flavour: RMSNorm, SwiGLU, RoPE, GQA), or None without litgpt."""
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError:
        return None
    return GPT(Config(
        block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_query_groups=cfg.n_kv_heads, n_embd=cfg.dim, intermediate_size=cfg.hidden_dim,
        rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=cfg.norm_eps,
        mlp_class_name="LLaMAMLP", rope_base=int(cfg.rope_theta),
    ))


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _resident_memory(device: torch.device) -> int:
    """Bytes in use now: 0 on a GPU (its peak counter starts from the reset), the resident memory elsewhere."""
    if device.type == "cuda":
        return 0
    with open("/proc/self/statm") as f:  # Linux: pages resident is the second field
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA memory allocated on a GPU; the process's peak resident memory elsewhere (which only grows,
    so on a CPU later rows include earlier ones)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _report(rows: dict[str, dict[str, float]], memory: dict[str, int], cfg: DictConfig, model: Transformer,
            device: torch.device, peak_flops: float) -> dict[str, float]:
    print(f"\n{model.num_params() / 1e6:.1f}M parameters, batch {cfg.data.batch_size} × {cfg.data.seq_len} tokens, "
          f"precision {cfg.trainer.precision}, {device}, compile={cfg.compile}; peak {peak_flops / 1e12:.3f} TFLOP/s")
    print(f"{'':<10} {'tokens/s':>10} {'MFU':>6} {'data wait':>10} {'first step':>11} {'peak memory':>12}")
    for name, r in rows.items():
        print(f"{name:<10} {r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%} {r['data_wait_frac']:>10.1%} "
              f"{r['first_step_s']:>10.2f}s {r['peak_mem_bytes'] / 2**20:>9,.0f} MiB")
    result = {**rows["lightning"], "peak_flops": peak_flops, **memory,
              "plan_error": memory["planned_mem_bytes"] / memory["train_mem_bytes"] - 1}
    above = "" if device.type == "cuda" else ", above the resident memory before the model was built"
    print(f"memory of the Lightning step (peak{above}): {memory['train_mem_bytes'] / 2**20:,.0f} MiB; lfpl-plan's "
          f"estimate {memory['planned_mem_bytes'] / 2**20:,.0f} MiB ({result['plan_error']:+.0%})")
    for name in ("plain", "litgpt"):
        if name in rows:
            result[f"{name}_tokens_per_s"] = rows[name]["tokens_per_s"]
            result[f"{name}_mfu"] = rows[name]["mfu"]
    if "plain" in rows:
        result["lightning_overhead"] = 1 - result["tokens_per_s"] / result["plain_tokens_per_s"]
        print(f"Lightning step vs plain loop: {result['lightning_overhead']:+.1%} overhead")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        bench(cfg)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
