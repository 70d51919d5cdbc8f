"""``lfpl-plan``: will this run fit, and how long will it take? Answered from the config alone, in a second.

    lfpl-plan model=base hardware=rtx5060
    lfpl-plan model=small hardware=cpu plan.tokens=1e9 plan.tokens_per_s=3000   # a throughput lfpl-bench measured
    lfpl-plan model=base trainer=fsdp trainer.devices=4 machine.memory_gb=24

Prints the parameters, training FLOPs per token, memory per device for weights / gradients / optimizer state /
activations at the configured micro-batch and precision (with and without activation checkpointing), the largest
micro-batch that fits the hardware profile's memory, and the time to train the run's tokens; then one JSON line.
The memory model is in llmfoundry_pl/planner.py; ``lfpl-bench`` prints it next to the measured peak.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from omegaconf import DictConfig, OmegaConf

from llmfoundry_pl.callbacks import HALF_PRECISION, peak_matmul_flops
from llmfoundry_pl.cli.common import check_seq_len, pick_device, to_dataclass
from llmfoundry_pl.cli.ddp import device_count
from llmfoundry_pl.config import ConfigError, MachineConfig, ModelConfig, PlanSettings
from llmfoundry_pl.data.datamodule import check_accumulate
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.planner import CPU_RESIDENT_FACTOR, MemoryPlan, fsdp_shards, largest_batch, plan_memory
from llmfoundry_pl.precision import precision_run_on

HEADROOM = 0.9  # a plan "fits" in 90% of the memory: allocator caching and fragmentation take the rest
GB = 1e9


def plan(cfg: DictConfig) -> dict[str, float]:
    """Print the plan of the composed training config; returns the JSON line's figures."""
    settings, machine = to_dataclass(cfg.plan, PlanSettings), to_dataclass(cfg.machine, MachineConfig)
    data = OmegaConf.to_object(cfg.data)  # the data group's own checks (a positive seq_len and batch_size, ...)
    model_cfg = to_dataclass(cfg.model, ModelConfig)
    if model_cfg.vocab_size is None:  # the tokenizer decides it at training time: its configured size
        vocab_size = cfg.data.get("vocab_size")
        if vocab_size is None:
            raise ConfigError("the vocabulary size is unknown here (the init_from model's): give model.vocab_size=")
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    check_seq_len(data.seq_len, model_cfg)  # lfpl-train refuses these windows: no plan for them either
    with torch.device("meta"):  # shapes only: no memory, instant even for a large model
        network = Transformer(model_cfg)

    trainer, seq_len, batch = cfg.trainer, data.seq_len, data.batch_size
    checkpointing, device_type = model_cfg.activation_checkpointing, _device_type(str(trainer.accelerator))
    # 16-mixed on a CPU: timed at the fp16 peak, planned 6.8x slower than the bf16 Lightning runs it in
    precision, accumulate = precision_run_on(device_type, str(trainer.precision)), trainer.accumulate_grad_batches
    check_accumulate(accumulate)  # (the schema makes it an int)
    if trainer.num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={trainer.num_nodes} must be 1 or more")
    devices = (device_count(trainer.devices) or 1) * trainer.num_nodes  # [0,1,2,3] is 4, as 4 is
    shards = fsdp_shards(str(trainer.strategy), devices)
    memory = plan_memory(model_cfg, batch, seq_len, precision, accumulate, shards, cfg.compile, device_type=device_type)
    budget = _memory_bytes(machine, device_type) * HEADROOM
    fits = {ckpt: largest_batch(model_cfg, seq_len, precision, budget, ckpt, device_type, accumulate, shards,
                                cfg.compile) for ckpt in (False, True)}

    flops_per_token = network.flops_per_token(seq_len)
    tokens = settings.tokens or _run_tokens(cfg, devices)
    per_device, source = _throughput(settings, machine, precision, flops_per_token, device_type)
    tokens_per_s = per_device * devices if per_device else None
    # Checkpointing re-runs each block's forward in the backward pass: 8N instead of 6N FLOPs per token. A measured
    # throughput (lfpl-bench with the same settings) has the recomputation in it already.
    recompute = 4 / 3 if checkpointing and not settings.tokens_per_s else 1.0

    result = {
        "params": network.num_params(), "flops_per_token": flops_per_token,
        "tensor_peak_bytes": memory.peak(checkpointing), "peak_mem_bytes": memory.resident(checkpointing, device_type),
        "peak_mem_bytes_plain": memory.resident(False, device_type),
        "peak_mem_bytes_checkpointed": memory.resident(True, device_type), "memory_bytes": budget / HEADROOM,
        "fits": memory.resident(checkpointing, device_type) <= budget, "largest_batch": fits[False],
        "largest_batch_checkpointed": fits[True], "tokens": tokens, "tokens_per_s": tokens_per_s,
        "hours": tokens / tokens_per_s * recompute / 3600 if tokens and tokens_per_s else None,
        "attention": memory.attention, "logits": memory.logits, "precision": precision,
    }
    _print(cfg, machine, network, memory, result, source, devices, shards, device_type)
    print(json.dumps(result), flush=True)
    return result


def _device_type(accelerator: str) -> str:
    """cuda, mps or cpu: the profile's accelerator (Lightning's "gpu" is CUDA), or for ``auto`` what this machine
    has. A plan may be for another machine, so the device need not be here."""
    if accelerator == "auto":
        return pick_device("auto").type
    if accelerator not in ("cpu", "gpu", "cuda", "mps"):
        raise ConfigError(f"trainer.accelerator={accelerator} cannot be planned: use cpu, gpu (cuda), mps or auto")
    return "cuda" if accelerator == "gpu" else accelerator


def _memory_bytes(machine: MachineConfig, device_type: str) -> float:
    """The profile's memory, or that of this machine's device of the planned type: CUDA device memory, MPS's
    recommended working set, RAM. A CPU plan on a GPU machine was given the GPU's memory, a GPU plan on a CPU
    machine its RAM."""
    if machine.memory_gb is not None:
        return machine.memory_gb * GB
    if device_type == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    if device_type == "mps" and torch.backends.mps.is_available():
        return float(torch.mps.recommended_max_memory())
    if device_type == "cpu":
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    raise ConfigError(f"this machine has no {device_type} device to read the memory of: give machine.memory_gb= "
                      "(and machine.peak_tflops= for a time), or plan with a hardware= profile of that device")


def _throughput(settings: PlanSettings, machine: MachineConfig, precision: str, flops_per_token: float,
                device_type: str) -> tuple[float | None, str]:
    """Tokens/s per device and where the figure comes from: measured (plan.tokens_per_s) or estimated from the
    device's peak FLOP/s × the expected MFU."""
    if settings.tokens_per_s:
        return settings.tokens_per_s, "measured (plan.tokens_per_s)"
    run_dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(HALF_PRECISION.get(precision), "fp32")
    if machine.peak_tflops and machine.peak_dtype not in (None, run_dtype):
        # A GPU's bf16 tensor-core peak is 2x or more its fp32 one: planning 32-true at it would halve the time.
        return None, (f"unknown: machine.peak_tflops={machine.peak_tflops:g} is a {machine.peak_dtype} peak and "
                      f"{precision} multiplies in {run_dtype}; give machine.peak_tflops=<its {run_dtype} peak> "
                      f"machine.peak_dtype={run_dtype}, or plan.tokens_per_s= (from lfpl-bench)")
    peak = machine.peak_tflops * 1e12 if machine.peak_tflops else _this_machines_peak(precision, device_type)
    if peak is None:
        return None, "unknown: give machine.peak_tflops= or plan.tokens_per_s= (from lfpl-bench)"
    where = "machine.peak_tflops" if machine.peak_tflops else "this machine's"
    # The profile's MFU was measured on one model in one precision: a smaller model, or bf16 on a CPU's AMX, runs
    # at a fraction of it (the tiny default on a 2-core AMX CPU: 0.11, against the cpu profile's 0.72)
    return (peak * machine.mfu / flops_per_token,
            f"estimated: {peak / 1e12:.3g} TFLOP/s ({where}) × MFU {machine.mfu} (machine.mfu; lfpl-bench with "
            f"the same settings measures it: then plan.tokens_per_s=)")


def _this_machines_peak(precision: str, device_type: str) -> float | None:
    """The peak of this machine's device of the planned type (None where it has none: a CPU plan on a GPU machine
    was timed at the GPU's peak); none for MPS, which has no spec table, and where a timed matmul says little."""
    if device_type == "cuda" and torch.cuda.is_available():
        return peak_matmul_flops(torch.device("cuda"), precision)
    if device_type == "cpu":
        return peak_matmul_flops(torch.device("cpu"), precision)
    return None


def _run_tokens(cfg: DictConfig, devices: int) -> float | None:
    steps = cfg.trainer.max_steps
    if steps is None or steps <= 0:  # -1: Lightning's "no limit"; 0 trains nothing (its time was a traceback)
        return None
    return float(steps * cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate_grad_batches * devices)


def _print(cfg: DictConfig, machine: MachineConfig, network: Transformer, memory: MemoryPlan, result: dict,
           source: str, devices: int, shards: int, device_type: str) -> None:
    trainer, seq_len = cfg.trainer, cfg.data.seq_len
    ckpt = network.config.activation_checkpointing
    sharding = f", FSDP over {shards}" if shards > 1 else ""
    print(f"{network.num_params() / 1e6:.1f}M parameters ({network.num_params(non_embedding=True) / 1e6:.1f}M "
          f"outside the embeddings); {result['flops_per_token'] / 1e9:.3f} GFLOP per trained token at seq_len "
          f"{seq_len}")
    compiled = ", compiled" if cfg.compile else ""  # torch.compile saves fewer tensors for the backward pass
    print(f"{machine.name}: {result['memory_bytes'] / GB:.1f} GB per device; {result['precision']}{compiled}, "
          f"attention={memory.attention}, logits={memory.logits}, micro-batch {cfg.data.batch_size} × {seq_len}, "
          f"accumulate {trainer.accumulate_grad_batches}, {devices} device(s){sharding}")
    weights = "weights" + (" (+ half copies)" if memory.weights > memory.gradients else "")
    rows = [(weights, memory.weights, memory.weights),
            ("gradients" + (" (as activations go)" if memory.accumulate == 1 else ""), memory.gradients,
             memory.gradients),
            ("optimizer (AdamW)", memory.optimizer, memory.optimizer),
            ("activations", memory.activations, memory.activations_checkpointed),
            ("peak (tensors)", memory.peak(False), memory.peak(True))]
    if device_type == "cpu":
        rows.append((f"process (×{CPU_RESIDENT_FACTOR}, CPU)", result["peak_mem_bytes_plain"],
                     result["peak_mem_bytes_checkpointed"]))
    print(f"{'memory per device':<28}{'plain':>10}{'checkpointed':>14}")
    for name, plain, checkpointed in rows:
        print(f"  {name:<26}{plain / GB:>8.2f} GB{checkpointed / GB:>11.2f} GB")
    used = result["peak_mem_bytes"] / result["memory_bytes"]
    verdict = "fits" if result["fits"] else f"does NOT fit (over {HEADROOM:.0%})"
    print(f"this run ({'checkpointed' if ckpt else 'plain'}): {used:.0%} of the memory — {verdict}")
    print(f"largest micro-batch that fits in {HEADROOM:.0%}: {result['largest_batch']} plain, "
          f"{result['largest_batch_checkpointed']} with model.activation_checkpointing=true")
    recomputed = ckpt and not source.startswith("measured")  # a measured figure has the recomputation in it
    if result["tokens_per_s"] is None:
        print(f"time: {source}")
    elif result["tokens"] is None:
        print(f"throughput {result['tokens_per_s']:,.0f} tokens/s, {source}; give plan.tokens= for a time")
    else:
        print(f"time for {result['tokens']:.3g} tokens: {_duration(result['hours'])} at "
              f"{result['tokens_per_s']:,.0f} tokens/s{' (+1/3: recomputation)' if recomputed else ''}, {source}")


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"
