"""The chunked training loss (model.logits) against the full logits' cross-entropy, in every way a step runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from llmfoundry_pl import loss as loss_module
from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.data.datamodule import IGNORE_INDEX
from llmfoundry_pl.inference.quantize import quantize
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.loss import chunk_tokens, linear_cross_entropy, next_token_loss, uses_chunked_loss
from llmfoundry_pl.model import Transformer
from tests.helpers.gloo import InRootForward, run_on_gloo_ranks, shard_by_block

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, N = 300, 24, 70


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 tokens: several per batch, the last one short."""
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS_BYTES", 4 * V * 16)
    assert chunk_tokens(V) == 16


@pytest.fixture
def chunk_calls(monkeypatch) -> list[int]:
    """One entry per call of :func:`linear_cross_entropy` through the loss module: whether the chunks ran."""
    calls = []
    monkeypatch.setattr(loss_module, "linear_cross_entropy", lambda *a: calls.append(1) or linear_cross_entropy(*a))
    return calls


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, D, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = IGNORE_INDEX  # prompts and padding are not learnt
    return hidden, weight, targets


# fp32; bf16-mixed (autocast: half matmuls, fp32 weights); bf16-true (half weights, no autocast)
CASES = {"32-true": (torch.float32, False), "bf16-mixed": (torch.float32, True), "bf16-true": (torch.bfloat16, False)}


def _full_logits_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("precision", CASES)
def test_chunked_loss_and_gradients_are_the_full_logits(precision, reduction):
    dtype, autocast = CASES[precision]
    hidden, weight, targets = _inputs(dtype)
    results = []
    for loss_fn in (_full_logits_loss, linear_cross_entropy):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = loss_fn(hidden, weight, targets, reduction)
        # an incoming gradient other than 1 (as gradient accumulation divides the loss)
        grads = torch.autograd.grad(0.25 * loss, (hidden, weight))
        results.append((loss, *grads))
    (full, *full_grads), (chunked, *chunked_grads) = results
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)  # the softmax is in fp32 either way
    for got, expected in zip(chunked_grads, full_grads, strict=True):
        assert got.dtype == expected.dtype == dtype
        if dtype == torch.float32 and not autocast:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        else:  # products rounded to bf16 on both sides, per chunk on one of them
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max())


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("precision", CASES)
def test_without_gradients_only_the_loss_is_computed(precision, monkeypatch):
    # Validation (no_grad): the same sum, and none of the gradient work or buffers.
    monkeypatch.setattr(loss_module._LinearCrossEntropy, "forward", None)  # would fail if called
    dtype, autocast = CASES[precision]
    hidden, weight, targets = _inputs(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        chunked = linear_cross_entropy(hidden, weight, targets, "sum")
        full = _full_logits_loss(hidden, weight, targets, "sum")
        # each token's nats (validation's bits per byte leave out those of tokens without bytes), 0 where ignored
        each, each_full = (f(hidden, weight, targets, "none") for f in (linear_cross_entropy, _full_logits_loss))
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(each, each_full, rtol=1e-5, atol=1e-5)
    assert (targets == IGNORE_INDEX).any() and not each[targets == IGNORE_INDEX].any()


def test_a_batch_with_nothing_to_learn_gives_zero_not_nan():
    hidden, weight, targets = _inputs(torch.float32)
    loss = linear_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


class _OutputShapes(TorchDispatchMode):
    """The shapes of the tensors the ops run inside it return."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@pytest.mark.usefixtures("small_chunks")
def test_a_frozen_head_gets_no_weight_gradient_work():
    # LoRA freezes the head: its (V, D) gradient was still computed, a matmul per chunk (~30% of the loss's time)
    hidden, weight, targets = _inputs(torch.float32)
    weight.requires_grad_(False)
    with _OutputShapes() as ops:
        loss = linear_cross_entropy(hidden, weight, targets)
        (grad,) = torch.autograd.grad(0.5 * loss, hidden)
    assert (V, D) not in ops.shapes and (N, D) in ops.shapes  # the hidden states' gradient is still made
    (expected,) = torch.autograd.grad(0.5 * _full_logits_loss(hidden, weight, targets), hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_a_second_backward_fails_instead_of_scaling_twice():
    hidden, weight, targets = _inputs(torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(AttributeError):
        loss.backward()


def test_auto_chunks_unless_the_step_is_compiled():
    assert uses_chunked_loss("auto", compiled=False) and not uses_chunked_loss("auto", compiled=True)
    assert uses_chunked_loss("chunked", compiled=False) and uses_chunked_loss("chunked", compiled=True)
    assert not uses_chunked_loss("full", compiled=False) and not uses_chunked_loss("full", compiled=True)
    with pytest.raises(ConfigError, match="model.logits='fused' is not one of auto, full, chunked"):
        ModelConfig(vocab_size=V, logits="fused")


def _model_config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=V, dim=D, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32), **kw})


def _packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, each two examples packed side by side, the prompt part of each ignored (a fine-tuning batch)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (2, 20), generator=g), torch.randint(0, V, (2, 20), generator=g)
    segment_ids = torch.tensor([[0] * 12 + [1] * 8, [0] * 5 + [1] * 15])
    y[:, :3] = IGNORE_INDEX
    y[0, 12:14] = IGNORE_INDEX
    return x, y, segment_ids


def _under_each_logits_setting(run: Callable[[LitLlama], Any]) -> dict[str, Any]:
    """``run(lit)`` for a fresh, identically initialised LitLlama under each ``model.logits`` setting."""
    results = {}
    for logits in ("full", "chunked", "auto"):
        torch.manual_seed(0)
        results[logits] = run(LitLlama(_model_config(logits=logits)))
    return results


@pytest.mark.usefixtures("small_chunks")
def test_training_step_loss_and_gradients_do_not_depend_on_model_logits(chunk_calls):
    def step(lit: LitLlama) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = lit.train_forward(_packed_batch())["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in lit.model.named_parameters()}

    results = _under_each_logits_setting(step)
    assert len(chunk_calls) == 2  # chunked, and auto in an eager step
    full_loss, full_grads = results["full"]
    for logits in ("chunked", "auto"):
        loss, grads = results[logits]
        torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.usefixtures("small_chunks")
def test_validation_totals_do_not_depend_on_model_logits(chunk_calls):
    # Validation runs eagerly, so under auto it takes the chunks even where the training step is compiled: its full
    # logits, copied to fp32 twice, would outgrow a chunked training step.
    def validate(lit: LitLlama) -> dict[str, torch.Tensor]:
        lit.compile_training()  # compiles on the first training step only, which never comes here
        with torch.no_grad():
            lit.validation_step(_packed_batch(), 0)
        return lit.val_metrics.compute()

    totals = _under_each_logits_setting(validate)
    assert len(chunk_calls) == 2  # chunked, and auto
    for logits in ("chunked", "auto"):
        assert totals[logits].keys() == totals["full"].keys()
        for name, value in totals[logits].items():
            torch.testing.assert_close(value, totals["full"][name], rtol=1e-6, atol=1e-6, msg=name)


def test_a_quantized_head_is_run_whole(chunk_calls):
    # lfpl-eval quantize=int8: the head is torch.ao's int8 Linear, its weight packed for its own kernels (a method,
    # not a matrix the chunks could multiply by), so the loss takes its logits whole.
    torch.manual_seed(0)
    model = quantize(Transformer(_model_config()), "int8")
    x, y, segment_ids = _packed_batch()
    with torch.no_grad():
        nats = next_token_loss(model, x, y, segment_ids, chunked=True, reduction="sum")
        logits = model(x, segment_ids=segment_ids)
    assert chunk_calls == []
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(nats, expected)


def test_compiled_step_keeps_the_full_logits_under_auto_and_chunks_when_asked(chunk_calls):
    batch = _packed_batch()
    torch.manual_seed(0)
    reference = LitLlama(_model_config(logits="full")).train_forward(batch)["loss"]
    for logits, chunked in (("auto", False), ("chunked", True)):
        torch.manual_seed(0)
        lit = LitLlama(_model_config(logits=logits))
        lit.compile_training()
        loss = lit.train_forward(batch)["loss"]
        assert len(chunk_calls) == chunked, logits
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def _fsdp_gradients(rank: int) -> None:
    """One of two ranks: the same batch's chunked loss on the same model, unsharded and then with FSDP splitting the
    weights between the ranks; rank 0 compares the gradients, gathered whole."""
    loss_module.CHUNK_LOGITS_BYTES = 4 * V * 16  # several chunks, as the small_chunks fixture sets
    chunk_calls, chunked_loss = [], loss_module.linear_cross_entropy  # (a spawned process: patched for this rank only)
    loss_module.linear_cross_entropy = lambda *a: chunk_calls.append(1) or chunked_loss(*a)
    batch = _packed_batch()
    torch.manual_seed(0)
    plain = InRootForward(LitLlama(_model_config(logits="chunked")), "train_forward")
    plain(batch)["loss"].backward()
    expected = {n: p.grad for n, p in plain.named_parameters()}
    torch.manual_seed(0)
    sharded = shard_by_block(InRootForward(LitLlama(_model_config(logits="chunked")), "train_forward"),
                             use_orig_params=True)
    sharded(batch)["loss"].backward()  # both ranks see the same batch: the averaged gradient is the plain one
    with FullyShardedDataParallel.summon_full_params(sharded, with_grads=True):
        got = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in sharded.named_parameters()}
    assert len(chunk_calls) == 2  # FSDP's unsharded head weight is still one the chunks multiply by
    if rank == 0:
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_under_fsdp_gives_the_unsharded_gradients(tmp_path):
    # trainer=fsdp: the head's weight belongs to the root unit, sharded between the ranks and gathered for its
    # forward, where the training step runs (Lightning's wrapper, as InRootForward here). Real FSDP on the CPU.
    run_on_gloo_ranks(_fsdp_gradients, tmp_path)
