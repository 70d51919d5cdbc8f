import csv
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from torch.utils.data import DataLoader

from llmfoundry_pl.callbacks import LossProgressBar
from llmfoundry_pl.config import ConfigError, DataConfig, ModelConfig, OptimConfig, SchedulerConfig
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.data.datamodule import RankShare, unscored_window
from llmfoundry_pl.lit_module import (
    FP16_ADAMW_MIN_EPS,
    LitDPO,
    LitLlama,
    TrainingDiverged,
    WarmupDecay,
    adamw_param_groups,
    check_adamw_eps,
    use_fused_adamw,
)
from llmfoundry_pl.metrics import LanguageModelMetrics, PreferenceMetrics
from llmfoundry_pl.model import Transformer
from tests.helpers.gloo import InRootForward, run_on_gloo_ranks, shard_by_block


def tiny_model(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32), **kw})


def test_schedule_warms_up_then_decays_to_the_floor():
    f = WarmupDecay(SchedulerConfig(decay="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] > 0 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    linear = WarmupDecay(SchedulerConfig(decay="linear", warmup_steps=0, min_lr_ratio=0.0), total_steps=100)
    assert linear(25) == pytest.approx(0.75)
    assert WarmupDecay(SchedulerConfig(decay="constant", warmup_steps=0), 100)(99) == 1.0


@pytest.mark.parametrize(
    ("schema", "setting", "message"),
    [(SchedulerConfig, {"decay": "step"}, "scheduler.decay='step' is not one of"),
     (SchedulerConfig, {"warmup_steps": -1}, "scheduler.warmup_steps=-1 must be 0 or more"),
     (SchedulerConfig, {"min_lr_ratio": 1.5}, r"scheduler.min_lr_ratio=1.5 must be in \[0, 1\]"),
     (OptimConfig, {"lr": -1.0}, "optim.lr=-1.0 must be a finite number, 0 or more"),
     (OptimConfig, {"lr": float("nan")}, "optim.lr=nan must be a finite number, 0 or more"),
     # trained in NaN, then blamed the rate (or the clipping) at the first validation
     (OptimConfig, {"weight_decay": float("inf")}, "optim.weight_decay=inf must be a finite number, 0 or more"),
     (OptimConfig, {"betas": [0.9, 1.0]}, r"optim.betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"),
     (OptimConfig, {"betas": [0.9]}, "must be two numbers")],
)
def test_optimizer_and_schedule_settings_are_checked(schema, setting, message):
    with pytest.raises(ConfigError, match=message):
        schema(**setting)


def test_adamw_eps_that_fp16_weights_cannot_hold_is_refused():
    # 16-true keeps AdamW's state in fp16, where the default eps=1e-8 is 0: the tiny preset's loss went 6.3 → 57
    with pytest.raises(ConfigError, match=r"optim.eps=1e-08 is too small .*precision=16-mixed .* or bf16-true"):
        check_adamw_eps(OptimConfig().eps, "16-true")
    check_adamw_eps(FP16_ADAMW_MIN_EPS, "16-true")  # enough: trained as fp32 did
    for precision in ("bf16-true", "16-mixed", "bf16-mixed", "32-true"):  # fp32 state, or bf16 with fp32's range
        check_adamw_eps(OptimConfig().eps, precision)


def test_weight_decay_skips_norms_and_embeddings():
    lit = LitLlama(tiny_model())
    # configure_optimizers reads the schedule length, and precision and clipping for the fused-AdamW choice
    lit.trainer = type("T", (), {"max_steps": 10, "precision": "32-true", "gradient_clip_val": 1.0})()
    optimizer = lit.configure_optimizers()["optimizer"]
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in lit.model.named_parameters()}
    assert decayed["weight_decay"] > 0 and plain["weight_decay"] == 0
    assert all(names[id(p)].endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight",
                                      "w3.weight", "output.weight")) for p in decayed["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"tok_embeddings.weight", "norm.weight"}
    assert optimizer.defaults["fused"]  # CPU, full precision: the fused kernel measured faster


def test_weight_decay_finds_embeddings_by_type_whatever_their_name():
    # a tied output head is the embedding table: listed once, and not decayed
    tied = Transformer(tiny_model(tie_embeddings=True))
    decayed, plain = adamw_param_groups(tied, 0.1)
    assert not any(p is tied.tok_embeddings.weight for p in decayed["params"])
    assert sum(p is tied.output.weight for p in plain["params"]) == 1
    assert len(decayed["params"]) + len(plain["params"]) == len(list(tied.parameters()))
    # litgpt's names (lfpl-bench's plain loop groups its GPT's weights with the same rule)
    other = nn.ModuleDict({"wte": nn.Embedding(16, 4), "lm_head": nn.Linear(4, 16, bias=False),
                           "ln_f": nn.LayerNorm(4)})
    other.lm_head.requires_grad_(False)
    decayed, plain = adamw_param_groups(other, 0.1)
    assert decayed["params"] == [] and plain["params"] == [other.wte.weight, other.ln_f.weight, other.ln_f.bias]
    other.lm_head.requires_grad_(True)
    assert adamw_param_groups(other, 0.1)[0]["params"] == [other.lm_head.weight]


def test_fused_adamw_auto_steps_aside_only_where_gradients_are_loss_scaled():
    assert use_fused_adamw(None, "cuda", "32-true", 1.0)
    assert use_fused_adamw(None, "cuda", "bf16-mixed", 1.0)  # no loss scale: LitLlama clips it (Lightning would not)
    assert not use_fused_adamw(None, "cuda", "16-mixed", 1.0)  # scaled gradients at clipping time
    assert use_fused_adamw(None, "cuda", "16-mixed", None)
    assert use_fused_adamw(None, "cpu", "32-true", 1.0)
    assert not use_fused_adamw(None, "mps", "32-true", None)
    assert not use_fused_adamw(False, "cuda", "bf16-mixed", None)
    with pytest.raises(ConfigError, match="optim.fused=true cannot clip gradients under precision=16-mixed"):
        use_fused_adamw(True, "cuda", "16-mixed", 1.0)


def test_metrics_sum_exactly_across_unequal_batches():
    m = LanguageModelMetrics()
    m.update(torch.tensor(10.0), torch.tensor(4), torch.tensor(16))
    m.update(torch.tensor(2.0), torch.tensor(1), torch.tensor(4))
    out = m.compute()
    assert out["loss"].item() == pytest.approx(12 / 5)
    assert out["ppl"].item() == pytest.approx(math.exp(12 / 5), rel=1e-5)
    assert out["bpb"].item() == pytest.approx(12 / math.log(2) / 20)


def test_metrics_keep_summing_in_float64_when_the_module_is_cast_to_bf16():
    # Lightning's bf16-true casts the LightningModule, metric states included, with .to(torch.bfloat16).
    nats = [16584.98, 16603.36, 16590.01]  # a validation batch of 4096 tokens at ~4 nats each
    m = LanguageModelMetrics().to(torch.bfloat16)
    for value in nats:
        m.update(torch.tensor(value), torch.tensor(4096), torch.tensor(12566))
    assert m.compute()["loss"].item() == pytest.approx(sum(nats) / (3 * 4096), rel=1e-6)
    pairs = PreferenceMetrics().to(torch.bfloat16)
    for _ in range(2):
        pairs.update(torch.tensor([0.1]), torch.tensor([300.3]))
    assert pairs.compute()["reward_margin"].item() == pytest.approx(300.3, rel=1e-6)


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    dm = TextDataModule(DataConfig(vocab_size=512, seq_len=32, batch_size=4, cache_dir=str(cache)))
    dm.prepare_data()
    return dm


def test_checkpoint_carries_tokenizer_and_config(datamodule, tmp_path):
    torch.manual_seed(0)
    lit = LitLlama(tiny_model(), run_config={"data": {"seq_len": 32}})
    lit.set_tokenizer(datamodule.tokenizer)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=1, use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(lit, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    loaded = LitLlama.load_from_checkpoint(tmp_path / "a.ckpt", map_location="cpu")
    assert loaded.tokenizer.sha256 == datamodule.tokenizer.sha256
    assert loaded.model.config == lit.model.config and loaded.hparams.run_config == {"data": {"seq_len": 32}}
    x = torch.randint(0, 512, (1, 16))
    torch.testing.assert_close(loaded(x), lit(x))

    other = LitLlama(tiny_model(dim=64))
    with pytest.raises(ConfigError, match="model.dim: 32 → 64"):
        other.on_load_checkpoint(torch.load(tmp_path / "a.ckpt", weights_only=False))
    shorter = LitLlama(tiny_model(max_seq_len=16))  # a resume with data.seq_len=16: the presets follow it
    with pytest.raises(ConfigError, match=r"model.max_seq_len: 32 → 16 \(the model presets take it from data.seq_len"):
        shorter.on_load_checkpoint(torch.load(tmp_path / "a.ckpt", weights_only=False))
    # How the model runs may change on resume: same weights, other attention kernel, checkpointing on.
    resumed = LitLlama(tiny_model(attention="math", activation_checkpointing=True))
    resumed.on_load_checkpoint(torch.load(tmp_path / "a.ckpt", weights_only=False))


def test_training_reads_numbers_back_only_when_it_logs_or_refreshes_the_bar(datamodule, tmp_path, monkeypatch):
    # On a GPU each tensor read back to the host (.item()) waits for the GPU: a sync. The loss is shown and
    # logged, but read only on the steps the logger writes and the bar refreshes (here every 4th), not every step.
    class BatchIndex(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.current = batch_idx

    where, reads = BatchIndex(), []
    item = torch.Tensor.item

    def counted_item(tensor):
        reads.append(getattr(where, "current", None))
        return item(tensor)

    bar = LossProgressBar(refresh_rate=4)
    trainer = L.Trainer(max_steps=12, log_every_n_steps=4, limit_val_batches=0, callbacks=[where, bar],
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        use_distributed_sampler=False, enable_model_summary=False)
    lit = LitLlama(tiny_model())
    lit.set_tokenizer(datamodule.tokenizer)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    trainer.fit(lit, datamodule=datamodule)
    monkeypatch.undo()
    during_training = {i for i in reads if i is not None}
    assert during_training and during_training <= {3, 7, 11}, sorted(during_training)
    assert "train/loss" in bar.train_progress_bar.postfix  # the bar still shows the loss


def test_the_logged_training_loss_is_the_whole_steps_under_accumulation(datamodule, tmp_path):
    # One step of 8 windows, whole or in 2 micro-batches of 4: Lightning kept the last micro-batch's loss.
    def logged(batch_size: int, accumulate: int) -> tuple[list[float], list[float]]:
        data = TextDataModule(dataclasses.replace(datamodule.cfg, batch_size=batch_size))
        torch.manual_seed(0)
        lit = LitLlama(tiny_model())
        lit.set_tokenizer(datamodule.tokenizer)
        logger = L.pytorch.loggers.CSVLogger(tmp_path, name=f"b{batch_size}")
        trainer = L.Trainer(max_steps=3, accumulate_grad_batches=accumulate, log_every_n_steps=1, logger=logger,
                            limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                            use_distributed_sampler=False, enable_model_summary=False)
        trainer.fit(lit, datamodule=data)
        rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
        return ([float(r["train/loss"]) for r in rows if r.get("train/loss")],
                [float(r["train/tokens"]) for r in rows if r.get("train/tokens")])

    (whole, tokens), (accumulated, accumulated_tokens) = logged(8, 1), logged(4, 2)
    assert len(whole) == len(accumulated) == 3
    assert accumulated == pytest.approx(whole, rel=1e-5)
    # the tokens trained on, the x axis of the curves: each step's 8 windows, however they were split
    windows = 8 * datamodule.cfg.seq_len
    assert tokens == accumulated_tokens == [windows, 2 * windows, 3 * windows]


def test_a_diverged_run_stops_at_its_next_validation_and_validate_alone_reports_nan(datamodule):
    # lr=1e4 without clipping: NaN weights within 10 steps. The run went on to the end in NaN, saving NaN
    # checkpoints, and crashed drawing its first sample ("probability tensor contains either inf, nan ...").
    torch.manual_seed(0)
    lit = LitLlama(tiny_model(), optim=OptimConfig(lr=1e4))
    lit.set_tokenizer(datamodule.tokenizer)
    trainer = L.Trainer(max_steps=30, val_check_interval=10, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                        enable_model_summary=False)
    with pytest.raises(ConfigError, match=r"training diverged: val/loss is nan at step 10; lower optim.lr \(it is "
                                          r"10000\)"):
        trainer.fit(lit, datamodule=datamodule)
    # lfpl-eval measures what there is, NaN included
    assert math.isnan(trainer.validate(lit, datamodule=datamodule, verbose=False)[0]["val/loss"])


def test_a_run_that_diverges_after_its_last_validation_stops_before_saving(datamodule):
    # lfpl-train validates the final weights when fit's last validation came before the last step: NaN there was
    # saved as last.ckpt and the best checkpoint, then the final sample crashed (a sweep's "failed", not "diverged")
    from llmfoundry_pl.cli.train import _final_metrics

    torch.manual_seed(0)
    lit = LitLlama(tiny_model(), optim=OptimConfig(lr=1e4))
    lit.set_tokenizer(datamodule.tokenizer)
    trainer = L.Trainer(max_steps=12, val_check_interval=1000, check_val_every_n_epoch=None, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        use_distributed_sampler=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(lit, datamodule=datamodule)  # no validation while fitting
    with pytest.raises(TrainingDiverged, match="training diverged: val/loss is nan at step 12"):
        _final_metrics(trainer, lit, datamodule)  # (before it saves the checkpoints again)


def test_validation_bits_per_byte_use_the_tokenizer_bytes(datamodule):
    lit = LitLlama(tiny_model())
    lit.set_tokenizer(datamodule.tokenizer)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=3, use_distributed_sampler=False,
                        enable_model_summary=False)
    metrics = trainer.validate(lit, datamodule=datamodule, verbose=False)[0]
    # an untrained model is near-uniform: loss ≈ ln(V); bpb = loss·tokens / (ln2·bytes) with ~2-4 bytes per token
    assert metrics["val/loss"] == pytest.approx(math.log(512), rel=0.05)
    assert 1.5 < metrics["val/loss"] / math.log(2) / metrics["val/bpb"] < 5
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)


def test_bits_per_byte_are_the_texts_nats_over_its_bytes_not_the_document_ends(datamodule):
    # </s> and <s> have no bytes, and their nats were counted: 300 one-line documents read 31% above the same lines
    # as one document. The loss per token still counts them.
    tokenizer, texts = datamodule.tokenizer, ["ROMEO: what light", "JULIET: ay me"]
    lit = LitLlama(tiny_model())
    lit.set_tokenizer(tokenizer)
    ids = torch.tensor([i for t in texts for i in tokenizer.encode(t, bos=True, eos=True)])
    x, y = ids[None, :-1], ids[None, 1:]
    with torch.no_grad():
        lit.validation_step((x, y), 0)
        nats = F.cross_entropy(lit.model(x)[0], y[0], reduction="none")
    metrics = lit.val_metrics.compute()
    text = ~torch.isin(y[0], torch.tensor([tokenizer.bos_id, tokenizer.eos_id]))
    assert 0 < text.sum() < len(y[0]) - 2  # two </s> and a <s> among the targets
    text_bytes = sum(len(t.encode()) for t in texts)
    assert metrics["bpb"].item() == pytest.approx(nats[text].sum().item() / math.log(2) / text_bytes, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(nats.mean().item(), rel=1e-5)
    # A document's first token counts the bytes of Tokenizer.first_token_bytes (a dummy-prefix tokenizer's "▁the"
    # has no space in the text there): here, as if each first token stood for 1 byte
    first = x[0] == tokenizer.bos_id
    lit.first_token_bytes = torch.ones_like(lit.token_bytes)
    lit.val_metrics.reset()
    with torch.no_grad():
        lit.validation_step((x, y), 0)
    fewer = int(lit.token_bytes[y[0][first]].sum()) - int(first.sum())
    assert fewer > 0 and lit.val_metrics.compute()["bpb"].item() == pytest.approx(
        nats[text].sum().item() / math.log(2) / (text_bytes - fewer), rel=1e-5)


def test_compiled_training_takes_the_steps_eager_training_takes_and_repeats_them(compose_train, cache_dir):
    # compile=true (the cpu profile's default): the model and its loss compiled as one graph must train the same
    # weights as eager, and the same ones again in a second run: Inductor's embedding backward adds rows with
    # atomics in whatever order the threads meet, unless the profile's trainer.deterministic=true tells it not to.
    # Validation stays eager and still runs. The batch is large enough for both threads to hit the same rows.
    deterministic = compose_train(["hardware=cpu"]).trainer.deterministic
    datamodule = TextDataModule(DataConfig(vocab_size=512, seq_len=64, batch_size=8, cache_dir=str(cache_dir)))
    datamodule.prepare_data()
    weights = []
    try:
        for compiled in (False, True, True):
            torch.manual_seed(0)
            lit = LitLlama(tiny_model(max_seq_len=64))
            lit.set_tokenizer(datamodule.tokenizer)
            initial = lit.model.output.weight.detach().clone()
            if compiled:
                lit.compile_training()
            trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                limit_val_batches=1, val_check_interval=3, use_distributed_sampler=False,
                                enable_model_summary=False, deterministic=deterministic)
            trainer.fit(lit, datamodule=datamodule)
            weights.append({k: v.clone() for k, v in lit.model.state_dict().items()})
    finally:
        torch.use_deterministic_algorithms(False)  # Lightning set it process-wide; later tests expect the default
    eager, compiled, again = weights
    assert compiled.keys() == eager.keys()  # checkpoint names unchanged by compiling
    for name, w in eager.items():
        torch.testing.assert_close(compiled[name], w, rtol=1e-4, atol=1e-5, msg=name)
        assert torch.equal(again[name], compiled[name]), f"{name}: a second compiled run trained other weights"
    assert not torch.allclose(compiled["output.weight"], initial)  # it did train


def test_fused_adamw_clips_under_bf16_mixed(datamodule):
    # Lightning refuses to clip for any fused optimizer under mixed precision (its issue #21435); LitLlama clips
    # under bf16-mixed, which has no loss scale. The fused run must train what the foreach run, clipped by Lightning
    # itself, trains, and clipping must have changed the result (the threshold is far below the gradient norm).
    weights = {}
    for name, fused, clip in (("fused", None, 1e-3), ("foreach", False, 1e-3), ("unclipped", None, None)):
        torch.manual_seed(0)
        lit = LitLlama(tiny_model(), optim=OptimConfig(fused=fused))
        lit.set_tokenizer(datamodule.tokenizer)
        trainer = L.Trainer(max_steps=3, precision="bf16-mixed", gradient_clip_val=clip, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                            use_distributed_sampler=False, enable_model_summary=False)
        trainer.fit(lit, datamodule=datamodule)
        assert trainer.optimizers[0].defaults["fused"] == (fused is None), name
        weights[name] = {k: v.clone() for k, v in lit.model.state_dict().items()}
    for key, w in weights["foreach"].items():
        torch.testing.assert_close(weights["fused"][key], w, rtol=1e-4, atol=1e-6, msg=key)
    assert not torch.allclose(weights["fused"]["output.weight"], weights["unclipped"]["output.weight"])


def _shard_with_fsdp(lit: LitLlama, tokens: torch.Tensor) -> FSDPStrategy:
    """``lit`` wrapped as trainer=fsdp wraps it (bf16-mixed, a shard unit per block), after a training step's forward
    and backward through the root. Real FSDP, on the CPU with gloo in an initialised process group: Lightning's
    FSDPStrategy needs a GPU, so it is given the wrapped module directly."""
    bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    strategy = FSDPStrategy()
    strategy.model = shard_by_block(lit, mixed_precision=bf16, use_orig_params=True)
    strategy.model(tokens).sum().backward()
    return strategy


def _assert_full_fp32_copy(copy: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, FullyShardedDataParallel) for m in copy.modules())
    assert {k: v.dtype for k, v in copy.state_dict().items()} == {k: torch.float32 for k in original}
    for key, value in copy.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)


def test_sampling_model_under_fsdp_is_a_full_copy_of_the_weights(tmp_path):
    """Under FSDP a direct call of ``lit.model`` fails: its blocks gather their weights in bf16 but the embedding's
    output is fp32. ``sampling_model`` gathers the full weights and returns an unsharded fp32 copy."""
    torch.manual_seed(0)
    lit = LitLlama(tiny_model())
    original = {k: v.clone() for k, v in lit.model.state_dict().items()}
    tokens = torch.randint(0, 512, (2, 8))
    expected = lit.model(tokens)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        strategy = _shard_with_fsdp(lit, tokens)
        lit.trainer = type("T", (), {"strategy": strategy, "is_global_zero": True})()
        copy = lit.sampling_model()
        with pytest.raises(RuntimeError, match="same dtype"):  # what SampleTextCallback did before
            lit.model(tokens)
    finally:
        dist.destroy_process_group()
    assert copy is not lit.model
    _assert_full_fp32_copy(copy, original)
    torch.testing.assert_close(copy(tokens), expected)


def _sample_from_two_shards(rank: int) -> None:
    """One of two ranks: each builds the same model, FSDP splits its weights between them, and ``sampling_model``
    gathers both halves into rank 0's copy; rank 1 joins the gathering and gets nothing."""
    torch.manual_seed(0)
    lit = LitLlama(tiny_model())
    original = {k: v.clone() for k, v in lit.model.state_dict().items()}
    strategy = _shard_with_fsdp(lit, torch.randint(0, 512, (2, 8)))
    held = sum(p.numel() for p in lit.model.parameters())
    assert 0 < held < sum(v.numel() for v in original.values())  # this rank holds part of the weights only
    lit.trainer = type("T", (), {"strategy": strategy, "is_global_zero": rank == 0})()
    copy = lit.sampling_model()
    if rank == 0:
        _assert_full_fp32_copy(copy, original)
    else:
        assert copy is None


def test_sampling_model_under_fsdp_gathers_the_shards_of_two_ranks(tmp_path):
    run_on_gloo_ranks(_sample_from_two_shards, tmp_path)


def _decay_groups_and_flops_of_two_shards(rank: int) -> None:
    """One of two ranks: the optimizer built on the FSDP-wrapped module (as trainer=fsdp builds it) decays the same
    weights as without FSDP, and the FLOPs behind MFU are the whole model's, though every parameter is a 1-D slice
    of this rank's shard by then."""
    lit = LitLlama(tiny_model())
    lit.trainer = type("T", (), {"max_steps": 10, "precision": "bf16-mixed", "gradient_clip_val": 1.0})()

    def groups_by_name() -> list[list[str]]:
        names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in lit.model.named_parameters()}
        groups = lit.configure_optimizers()["optimizer"].param_groups
        assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0
        return [[names[id(p)] for p in group["params"]] for group in groups]

    expected, flops = groups_by_name(), lit.model.flops_per_token(8)
    _shard_with_fsdp(lit, torch.randint(0, 512, (2, 8)))
    assert all(p.dim() == 1 for p in lit.model.parameters())
    assert groups_by_name() == expected and "layers.0.attention.wq.weight" in expected[0]
    assert lit.model.flops_per_token(8) == flops


def test_weight_decay_and_flops_under_fsdp_of_two_ranks_are_the_unwrapped_models(tmp_path):
    run_on_gloo_ranks(_decay_groups_and_flops_of_two_shards, tmp_path)


def _validate_an_uneven_split_in_two_shards(rank: int) -> None:
    """One of two ranks: 7 held-out windows in batches of 3, rank 0 holding 4 of them and rank 1 three, every
    forward through the FSDP root. Both ranks run two batches (before RankShare rank 1 ran one, and rank 0's second
    forward waited for it forever), and the metrics summed over the ranks are one process's over all 7 windows."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (7, 9))
    windows = [(row[:-1], row[1:]) for row in tokens]
    lit = LitLlama(tiny_model())
    with torch.no_grad():
        expected = F.cross_entropy(lit.model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    sharded = shard_by_block(InRootForward(lit, "validation_step"))
    share = RankShare(windows, SimpleNamespace(global_rank=rank, world_size=2), unscored_window, "windows", "")
    batches = 0
    with torch.no_grad():
        for x, y in DataLoader(share, batch_size=3):
            sharded((x, y), 0)
            batches += 1
    assert batches == 2
    torch.testing.assert_close(lit.val_metrics.compute()["loss"], expected)  # (compute sums over the ranks)


def test_fsdp_ranks_validate_an_uneven_split_in_as_many_batches_and_count_each_token_once(tmp_path):
    run_on_gloo_ranks(_validate_an_uneven_split_in_two_shards, tmp_path)


def test_flops_per_batch_count_the_batch_as_it_came():
    # Fine-tuning rows are padded to the micro-batch's longest example, not to data.seq_len; DPO also runs the
    # reference model forward (a third of a training pass) on the same rows.
    lit, rows, width = LitLlama(tiny_model()), 6, 24
    batch = (torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long))
    assert lit.flops_per_batch(batch) == lit.model.flops_per_token(width) * rows * width
    dpo = LitDPO(tiny_model())
    assert dpo.flops_per_batch(batch) == lit.flops_per_batch(batch) + lit.flops_per_batch(batch) // 3


def test_resuming_another_vocabulary_names_the_setting_that_sets_it():
    # It said "resume with the same model settings", and model.vocab_size=512 was refused: the tokenizer sets it
    lit = LitLlama(tiny_model())
    saved = {"hyper_parameters": {"model": {**dataclasses.asdict(tiny_model()), "vocab_size": 256}}}
    with pytest.raises(ConfigError, match=r"model.vocab_size: 256 → 512 \(the tokenizer's: set data.vocab_size\)"):
        lit.on_load_checkpoint(saved)


def test_flops_per_batch_of_lora_count_no_gradients_of_the_frozen_weights():
    pytest.importorskip("peft")
    lit, rows, width = LitLlama(tiny_model()), 6, 24
    batch = (torch.zeros(rows, width, dtype=torch.long), torch.zeros(rows, width, dtype=torch.long))
    weight_grads = 2 * lit.model.matmul_params() * rows * width  # a third of 6 FLOPs per weight and token
    for lora_lit in (LitLlama(tiny_model(), lora={"enabled": True}), LitDPO(tiny_model(), lora={"enabled": True})):
        reference = lit.flops_per_batch(batch) // 3 if isinstance(lora_lit, LitDPO) else 0  # a forward pass
        assert lora_lit.flops_per_batch(batch) == lit.flops_per_batch(batch) - weight_grads + reference


def test_token_bytes_are_made_on_the_modules_device(datamodule):
    # Resuming under FSDP restores the checkpoint (and so set_tokenizer) after the module moved to the GPU: a buffer
    # made on the CPU then failed validation ("indices should be either on cpu or on the same device").
    lit = LitLlama(tiny_model()).to("meta")  # a device other than the CPU's, without a GPU
    lit.set_tokenizer(datamodule.tokenizer)
    assert lit.token_bytes.device.type == "meta"


def test_sampling_model_without_fsdp_is_the_model_itself():
    lit = LitLlama(tiny_model())
    lit.trainer = type("T", (), {"strategy": SingleDeviceStrategy("cpu"), "is_global_zero": True})()
    assert lit.sampling_model() is lit.model


def test_fsdp_clips_by_norm_through_its_root_module():
    # Lightning's FSDP precision plugin refuses clipping by norm (its issue #19235): the norm spans every rank's
    # shard, which only the root FSDP module's clip_grad_norm_ computes. FSDP needs a GPU; this checks the wiring.
    class RootModule(torch.nn.Module):
        clipped: list[float] = []

        def clip_grad_norm_(self, max_norm):
            self.clipped.append(max_norm)

    strategy = FSDPStrategy()
    strategy.model = RootModule()
    lit = LitLlama(tiny_model())
    lit.trainer = type("T", (), {"strategy": strategy, "precision_plugin": FSDPPrecision("bf16-mixed"),
                                 "gradient_clip_val": 0.5, "gradient_clip_algorithm": None})()
    lit.configure_gradient_clipping(torch.optim.AdamW(lit.parameters()), gradient_clip_val=0.5)
    assert RootModule.clipped == [0.5]
