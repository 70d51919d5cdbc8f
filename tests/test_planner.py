"""The memory planner against what PyTorch really allocates, and lfpl-plan as users run it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from llmfoundry_pl import loss as loss_module
from llmfoundry_pl import model as model_module
from llmfoundry_pl.cli.plan import plan
from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.loss import next_token_loss
from llmfoundry_pl.model import MATH_ATTENTION_MAX_KEYS, Transformer
from llmfoundry_pl.planner import CPU_RESIDENT_FACTOR, largest_batch, plan_memory
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# Dimensions that differ from each other and from the batch's token count, so no tensor is mistaken for another.
# The full logits in the loss, as the steps below compute it (the chunked loss has tests of its own at the end).
SHAPE = ModelConfig(vocab_size=1000, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=320, max_seq_len=64,
                    logits="full")
B, T = 3, 50
plan_cpu = functools.partial(plan_memory, device_type="cpu")  # what these tests measure runs on the CPU


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (B, T), generator=g), torch.randint(0, 1000, (B, T), generator=g)


def _recorder(model: torch.nn.Module) -> tuple[dict[int, int], Callable[[torch.Tensor], torch.Tensor]]:
    """Bytes per storage that autograd saves for the backward pass, activations only, and the pack hook (for
    ``torch.autograd.graph.saved_tensors_hooks``) that records them."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    half_weight_sizes = {2 * p.numel() for p in model.parameters() if p.dim() == 2}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # Weights and autocast's half copies of them are the plan's "weights", not activations.
        if storage.data_ptr() not in weights and not (t.dtype == torch.bfloat16 and storage.nbytes() in
                                                      half_weight_sizes and t.dim() == 2 and t.shape[0] != B * T):
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    return saved, pack


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()


# With dropout, the CPU's SDPA has no fused kernel: it falls back to PyTorch's own math, in fp32.
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_planned_activations_are_what_autograd_saves(precision, attention, dropout):
    shape = dataclasses.replace(SHAPE, attention=attention, dropout=dropout)
    model = Transformer(shape)
    x, y = _batch()
    saved, pack = _recorder(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(precision):
        F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    planned = plan_cpu(shape, B, T, precision).saved
    assert planned == pytest.approx(sum(saved.values()), rel=0.01)
    if attention == "math" and not dropout:  # the (T, T) scores per head: more than the fused kernel's log-sum-exp
        fused = plan_cpu(dataclasses.replace(shape, attention="sdpa"), B, T, precision)
        assert planned > 1.15 * fused.saved
    if dropout:  # what it dropped is kept too
        assert planned > 1.1 * plan_cpu(dataclasses.replace(shape, dropout=0.0), B, T, precision).saved


@pytest.mark.parametrize(("checkpointing", "attention"), [(False, "sdpa"), (True, "sdpa"), (False, "math")])
def test_planned_peak_is_the_allocators_peak_in_a_training_step(checkpointing, attention):
    """The peak of every allocation PyTorch's CPU allocator makes in a steady-state step (the profiler's memory
    events), plus the weights and AdamW state already held, against the plan."""
    cfg = dataclasses.replace(SHAPE, activation_checkpointing=checkpointing, attention=attention)
    model = Transformer(cfg)
    x, y = _batch()
    measured = _training_step_peak(model, lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    assert plan_cpu(cfg, B, T, "32-true").peak(checkpointing) == pytest.approx(measured, rel=0.05)


def test_planned_peak_counts_what_checkpointing_and_accumulation_keep():
    """Two terms too small to show at SHAPE's peak: a deep, narrow model (24 blocks of width 32) keeps every block's
    input with checkpointing (a fifth of the peak); accumulating over micro-batches keeps the gradients between
    them (a fifth of SHAPE's)."""
    deep = ModelConfig(vocab_size=64, dim=32, n_layers=24, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64,
                       logits="full", activation_checkpointing=True)
    torch.manual_seed(0)
    model = Transformer(deep)
    x, y = torch.randint(0, 64, (8, 64)), torch.randint(0, 64, (8, 64))
    measured = _training_step_peak(model, lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    assert plan_cpu(deep, 8, 64, "32-true").peak(checkpointing=True) == pytest.approx(measured, rel=0.05)

    model = Transformer(SHAPE)
    (x, y), optimizer = _batch(), torch.optim.AdamW(model.parameters(), fused=True)

    def accumulated_step() -> None:
        for _ in range(2):
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    accumulated_step()  # the optimizer's state is made
    measured = 3 * model.num_params() * 4 + _step_peak(accumulated_step)
    plan = plan_cpu(SHAPE, B, T, "32-true", accumulate=2)
    assert plan.peak(checkpointing=False) == pytest.approx(measured, rel=0.05)
    # the CPU holds more than its tensors (CPU_RESIDENT_FACTOR); a GPU holds its tensors
    assert plan.resident(False, "cuda") == plan.peak(False) < plan.resident(False, "cpu")

    # Without accumulation all the gradients are there at the end of the backward pass: with activations smaller than
    # them (a micro-batch of one), the plan without gradients was 21% under the peak
    x, y = x[:1, :8], y[:1, :8]
    measured = _training_step_peak(model, lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    small = plan_cpu(SHAPE, 1, 8, "32-true")
    assert small.activations < small.gradients and small.peak(checkpointing=False) == pytest.approx(measured, rel=0.05)


def _training_step_peak(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], precision: str = "32-true",
                        first_step: contextlib.AbstractContextManager | None = None) -> int:
    """What a steady-state training step of ``loss_fn`` (fused AdamW) holds at its peak: the fp32 weights and two
    AdamW moments, plus the highest level of the allocator's bytes during the step. ``first_step`` wraps the step
    run before (compiling, if ``loss_fn`` is compiled, and creating the optimizer state)."""
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

    def step() -> None:
        with _autocast(precision):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with first_step or contextlib.nullcontext():
        step()
    held = 3 * sum(p.numel() for p in model.parameters()) * 4
    return held + _step_peak(step)


def _step_peak(step) -> int:
    """The highest level of the CPU allocator's bytes during ``step()``, from the profiler's memory events."""
    with profile(profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


# The cpu profile's defaults: compiled, in fp32 (SDPA) or, on a CPU with native bf16, bf16-mixed (the math).
@pytest.mark.parametrize(("precision", "attention", "dropout"),
                         [("32-true", "sdpa", 0.0), ("bf16-mixed", "math", 0.0), ("32-true", "sdpa", 0.1)])
def test_planned_compiled_step_is_what_inductor_saves_and_allocates(precision, attention, dropout):
    # compile=true (the cpu profile's default) compiles model and loss as one graph, which saves fewer tensors.
    # One block: the count is per block, and compiling takes less time.
    shape = dataclasses.replace(SHAPE, n_layers=1, attention=attention, dropout=dropout)
    model = Transformer(shape)
    x, y = _batch()
    compiled = torch.compile(lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    saved, pack = _recorder(model)
    # the first step (compiling) records what autograd saves
    measured = _training_step_peak(model, lambda: compiled(x, y), precision,
                                   first_step=torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    planned = plan_cpu(shape, B, T, precision, compiled=True)
    assert planned.saved == pytest.approx(sum(saved.values()), rel=0.01)
    eager = plan_cpu(shape, B, T, precision)
    assert planned.saved < 0.85 * eager.saved  # it does save less than eager
    assert planned.peak(False) == pytest.approx(measured, rel=0.05)


# The chunked loss (model.logits=chunked; auto's choice in an eager step): one chunk of the batch (B·T = 150 tokens)
# as in the small models' steps, or several (the last one short) as with a large vocabulary.
@pytest.mark.parametrize("chunk", [None, 32])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_planned_peak_with_the_chunked_loss_is_the_allocators_peak(precision, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(loss_module, "CHUNK_LOGITS_BYTES", 4 * SHAPE.vocab_size * chunk)
    cfg = dataclasses.replace(SHAPE, logits="chunked")
    model = Transformer(cfg)
    x, y = _batch()
    measured = _training_step_peak(model, lambda: next_token_loss(model, x, y, chunked=True), precision)
    planned = plan_cpu(cfg, B, T, precision)
    assert planned.peak(False) == pytest.approx(measured, rel=0.05)
    if chunk:  # several chunks: only one chunk's logits at a time, not the batch's (and their two gradients)
        assert planned.activations < 0.85 * plan_cpu(SHAPE, B, T, precision).activations


def test_planned_compiled_step_with_the_chunked_loss_is_what_it_allocates():
    # model.logits=chunked with compile=true: the blocks compiled, the loss run eagerly after them.
    cfg = dataclasses.replace(SHAPE, n_layers=1, logits="chunked")
    model = Transformer(cfg)
    x, y = _batch()
    compiled = torch.compile(functools.partial(next_token_loss, chunked=True))
    measured = _training_step_peak(model, lambda: compiled(model, x, y))
    planned = plan_cpu(cfg, B, T, "32-true", compiled=True)
    assert planned.peak(False) == pytest.approx(measured, rel=0.05)
    assert planned.activations < plan_cpu(cfg, B, T, "32-true").activations  # Inductor keeps fewer block tensors


# Validation holds the weights and AdamW's moments (the gradients are freed) and runs a batch without gradients. A
# large vocabulary's full logits, copied to fp32 twice there, outgrew a chunked training step; validation chunks
# too (eager, so under auto as well), and the planned training peak stays the run's peak.
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_validation_stays_below_the_planned_training_peak(precision, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS_BYTES", 4 * 4000 * 32)  # several chunks per batch
    cfg = dataclasses.replace(SHAPE, vocab_size=4000, dim=48, n_heads=4, n_kv_heads=2, hidden_dim=128)
    batch = _batch()

    def validation_peak(logits: str) -> int:
        torch.manual_seed(0)
        lit = LitLlama(dataclasses.replace(cfg, logits=logits)).eval()
        held = 3 * sum(p.numel() for p in lit.parameters()) * 4

        def step() -> None:
            with torch.no_grad(), _autocast(precision):
                lit.validation_step(batch, 0)

        return held + _step_peak(step)

    # checkpointed: the smallest training step the planner counts
    planned = plan_cpu(dataclasses.replace(cfg, logits="auto"), B, T, precision).peak(checkpointing=True)
    assert validation_peak("auto") < planned < validation_peak("full")


def test_memory_grows_with_the_batch_and_shrinks_with_checkpointing_and_sharding():
    one, four = plan_cpu(SHAPE, 1, T, "32-true"), plan_cpu(SHAPE, 4, T, "32-true")
    assert four.activations > 3.9 * one.activations and four.weights == one.weights
    assert four.activations_checkpointed < four.activations
    sharded = plan_cpu(SHAPE, 4, T, "32-true", shards=4)
    assert sharded.optimizer < four.optimizer / 2 and sharded.activations == four.activations
    # AdamW's two moments stay sharded (only weights are gathered, a block at a time): they were counted with a
    # gathered block, 30-60% too many
    params = Transformer(SHAPE).num_params()
    assert sharded.optimizer == 2 * -(-params // 4) * 4 and sharded.weights > -(-params // 4) * 4
    mixed = plan_cpu(SHAPE, 4, T, "bf16-mixed")
    assert mixed.saved < four.saved and mixed.weights > four.weights  # half activations, + half weight copies
    with pytest.raises(ConfigError, match="trainer.precision=64-true has no memory model"):
        plan_cpu(SHAPE, 1, T, "64-true")


def test_plan_counts_the_attention_that_auto_picks_where_the_step_runs(monkeypatch):
    monkeypatch.setattr(model_module, "flash_attn_func", None)  # as without flash-attn installed
    math, fused = dataclasses.replace(SHAPE, attention="math"), dataclasses.replace(SHAPE, attention="sdpa")
    for seq_len, precision, device_type, compiled, picked in [
        (T, "bf16-mixed", "cpu", False, "math"),  # where the written-out math runs bf16 GEMMs
        (T, "bf16-mixed", "cpu", True, "sdpa"),  # compiled: SDPA (attention_kernel says why)
        (MATH_ATTENTION_MAX_KEYS + 1, "bf16-mixed", "cpu", False, "sdpa"),  # a sequence past the math's limit
        (T, "32-true", "cpu", False, "sdpa"),
        (T, "bf16-mixed", "cuda", False, "sdpa"),
    ]:
        auto = plan_memory(SHAPE, B, seq_len, precision, device_type=device_type, compiled=compiled)
        assert auto.attention == picked, (seq_len, precision, device_type, compiled)
        explicit = plan_memory(math if picked == "math" else fused, B, seq_len, precision, device_type=device_type,
                               compiled=compiled)
        assert auto == dataclasses.replace(explicit, attention=picked)


def test_largest_batch_is_the_last_that_fits():
    budget = 2e8
    n = largest_batch(SHAPE, T, "32-true", budget, checkpointing=False, device_type="cpu")
    resident = [plan_cpu(SHAPE, b, T, "32-true").resident(False, "cpu") for b in (n, n + 1)]
    assert resident[0] <= budget < resident[1]
    assert resident[0] == int(plan_cpu(SHAPE, n, T, "32-true").peak(False) * CPU_RESIDENT_FACTOR)
    assert largest_batch(SHAPE, T, "32-true", budget, checkpointing=True, device_type="cpu") > n


@pytest.mark.parametrize("checkpointing", [False, True])
def test_largest_batch_with_the_chunked_loss_is_the_last_that_fits(checkpointing):
    # The chunked loss's memory stops growing once a chunk is full: a line through batches 1 and 2 overshot the
    # per-sequence cost (ref16m, vocab 8192, 2 GB on a GPU: 30 where 44 fits; checkpointed, 58 where 164 fits).
    cfg = dataclasses.replace(SHAPE, vocab_size=8192, logits="chunked")

    def resident(b: int) -> int:
        return plan_memory(cfg, b, 256, "bf16-mixed", device_type="cuda").resident(checkpointing, "cuda")

    budget = resident(40)
    n = largest_batch(cfg, 256, "bf16-mixed", budget, checkpointing, "cuda")
    assert resident(n) <= budget < resident(n + 1) and n >= 40


@pytest.mark.parametrize("hardware, model", [("rtx5060", "base"), ("m4pro", "small"), ("cpu", "tiny")])
def test_each_hardware_profile_fits_the_model_it_is_meant_for(compose_train, hardware, model, capsys):
    result = plan(compose_train([f"hardware={hardware}", f"model={model}"], name="plan"))
    assert result["fits"], capsys.readouterr().out
    assert result["largest_batch"] >= compose_train([f"hardware={hardware}"], name="plan").data.batch_size


@pytest.mark.parametrize("max_steps", [0, -1])
def test_a_run_without_a_number_of_steps_is_planned_without_a_time(compose_train, capsys, max_steps):
    result = plan(compose_train([f"trainer.max_steps={max_steps}"], name="plan"))  # 0 was a TypeError traceback
    assert result["tokens"] is None and result["hours"] is None and "give plan.tokens= for a time" in \
        capsys.readouterr().out


def test_an_experiment_is_planned_and_benchmarked_as_lfpl_train_takes_it(compose_train, capsys):
    # experiment= as lfpl-train takes it: lfpl-plan and lfpl-bench said "Could not override 'experiment'"
    planned = compose_train(["experiment=shakespeare_small", "hardware=rtx5060"], name="plan")
    assert planned.data.seq_len == 512 and planned.data.vocab_size == 8192
    assert plan(planned)["fits"], capsys.readouterr().out  # "sized for an 8 GB GPU"
    assert compose_train(["experiment=shakespeare_small"], name="bench").optim.lr == 6e-4


def test_plan_cli_prints_memory_fit_and_time(tmp_path):
    out = run_cli("plan", "model=base", "hardware=rtx5060", "plan.tokens=1e9", cwd=tmp_path).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["params"] > 100e6 and result["fits"]
    assert result["largest_batch_checkpointed"] > result["largest_batch"] > 0
    assert result["memory_bytes"] == 7.5e9 and result["hours"] > 0
    assert f"attention={result['attention']}," in out  # the kernel whose saved tensors the plan counts
    assert f"logits={result['logits']}," in out and result["logits"] == "full"  # the rtx5060 profile compiles
    for line in ("optimizer (AdamW)", "activations", "largest micro-batch that fits", "time for 1e+09 tokens"):
        assert line in out
    assert list(tmp_path.iterdir()) == []  # a plan writes nothing
    # a list of devices is as many devices; a measured throughput has checkpointing's recomputation in it already
    out = run_cli("plan", "model=base", "hardware=rtx5060", "trainer=fsdp", "trainer.devices=[0,1,2,3]",
                  "plan.tokens=3.6e6", "plan.tokens_per_s=1000", "model.activation_checkpointing=true",
                  cwd=tmp_path).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert "4 device(s), FSDP over 4" in out and result["tokens_per_s"] == 4000
    assert result["hours"] == pytest.approx(0.25) and "recomputation" not in out


def test_a_peak_for_another_precision_gives_no_time_rather_than_a_wrong_one(compose_train, capsys):
    # The rtx5060 profile's peak is its bf16 tensor cores': a 32-true run was timed at it, twice too fast.
    fp32 = ["model=base", "hardware=rtx5060", "trainer.precision=32-true", "plan.tokens=1e9"]
    result = plan(compose_train(fp32, name="plan"))
    assert result["tokens_per_s"] is None and result["hours"] is None
    assert "38.4 is a bf16 peak and 32-true multiplies in fp32" in capsys.readouterr().out
    given = plan(compose_train([*fp32, "machine.peak_tflops=19.2", "machine.peak_dtype=fp32"], name="plan"))
    bf16 = plan(compose_train(["model=base", "hardware=rtx5060", "plan.tokens=1e9"], name="plan"))
    assert given["tokens_per_s"] == pytest.approx(bf16["tokens_per_s"] / 2)  # 19.2 against 38.4, same MFU


def test_16_mixed_on_a_cpu_is_planned_as_the_bf16_lightning_runs(compose_train, capsys):
    # Timed at the CPU's fp16 peak, the plan was 6.8x slower than the run (60-400x where fp16 is emulated)
    on_cpu = ["hardware=cpu", "trainer.precision=16-mixed", "machine.peak_tflops=1", "machine.peak_dtype=bf16"]
    result = plan(compose_train(on_cpu, name="plan"))
    assert result["precision"] == "bf16-mixed" and result["tokens_per_s"] is not None
    assert "per device; bf16-mixed" in capsys.readouterr().out
    assert plan(compose_train(["hardware=rtx5060", "trainer.precision=16-mixed"], name="plan"))["precision"] == \
        "16-mixed"  # a GPU runs it in fp16


def test_plan_says_when_a_run_does_not_fit(compose_train, capsys):
    cfg = compose_train(["model=base", "hardware=rtx5060", "data.batch_size=64", "data.seq_len=2048"], name="plan")
    assert plan(cfg)["fits"] is False and "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [("data.batch_size=-1", "data.batch_size=-1 must be positive"),  # planned negative memory and time before
     ("data=sft data.seq_len=0", "data.seq_len=0 must be positive"),  # the chosen data group's own checks
     ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be 1 or more"),
     ("plan.tokens=-5", r"plan.tokens=-5.0 must be positive \(or null\)"),
     ("machine.memory_gb=0", r"machine.memory_gb=0.0 must be positive \(or null\)"),
     ("machine.peak_dtype=fp8", "machine.peak_dtype=fp8 is not one of bf16, fp16, fp32"),
     ("data.seq_len=512 model.max_seq_len=128", "data.seq_len=512 exceeds model.max_seq_len=128"),  # as lfpl-train
     # tracebacks, or a plan for -5 devices (negative tokens/s), before: lfpl-train refuses each
     ("trainer.accelerator=foo", "trainer.accelerator=foo cannot be planned"),
     ("trainer.devices=-5", "trainer.devices=-5 names no device"), ("trainer.devices=abc", "trainer.devices=abc"),
     ("trainer.num_nodes=0", "trainer.num_nodes=0 must be 1 or more"),
     ("trainer.precision=64", "trainer.precision=64 has no memory model")],
)
def test_plan_refuses_settings_that_plan_nothing(compose_train, override, message):
    with pytest.raises(ConfigError, match=message):
        plan(compose_train(["model=base", *override.split()], name="plan"))


def test_a_plan_reads_memory_and_peak_of_the_planned_device_only(compose_train, monkeypatch):
    # On a GPU machine, a CPU plan got the GPU's memory and was timed at its peak; on a CPU machine, a GPU plan got
    # the RAM and the CPU's peak
    import os
    from types import SimpleNamespace

    from llmfoundry_pl.cli import plan as plan_module

    monkeypatch.setattr(plan_module, "peak_matmul_flops", lambda device, precision: {"cuda": 1e15, "cpu": 1e11}[
        device.type])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80e9))
    cpu = plan(compose_train(["hardware=cpu", "trainer.precision=32-true", "compile=false"], name="plan"))
    assert cpu["memory_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cpu["tokens_per_s"] == pytest.approx(1e11 * 0.72 / cpu["flops_per_token"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine planning a GPU run
    with pytest.raises(ConfigError, match=r"^this machine has no cuda device to read the memory of: give "
                                          r"machine.memory_gb="):
        plan(compose_train(["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"], name="plan"))
    gpu = plan(compose_train(["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "machine.memory_gb=24"],
                             name="plan"))
    assert gpu["memory_bytes"] == 24e9 and gpu["tokens_per_s"] is None  # no CUDA peak here: no time
