"""``LitLlama``: the thin LightningModule around :class:`~llmfoundry_pl.model.Transformer`.

It owns the loss, the metrics and the optimizer + schedule. Devices, precision, gradient accumulation and
clipping, checkpointing and distribution are Lightning's (Trainer arguments), not re-implemented here.
A checkpoint carries the model's config (hyper-parameters) and the tokenizer, so it is all that
``lfpl-eval``, ``lfpl-generate`` and ``LitLlama.load_from_checkpoint`` need.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_only
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llmfoundry_pl.config import ConfigError, DPOConfig, LoraConfig, ModelConfig, OptimConfig, SchedulerConfig
from llmfoundry_pl.data.datamodule import IGNORE_INDEX
from llmfoundry_pl.inference.scoring import sequence_log_probs
from llmfoundry_pl.lora import ADAPTER_MARK, adapters_off, apply_lora
from llmfoundry_pl.loss import next_token_loss, uses_chunked_loss
from llmfoundry_pl.metrics import LanguageModelMetrics, PreferenceMetrics
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer


def _as(cls: type, value: Any) -> Any:
    """Accept a config dataclass or its dict form (how hyper-parameters come back from a checkpoint)."""
    return value if isinstance(value, cls) else cls(**value)


class TrainingDiverged(ConfigError):
    """The held-out loss stopped being a number while fitting: too high a learning rate, or no clipping."""


# ModelConfig fields that say how to run the model, not what it is: a resumed run may change them.
RUN_OPTIONS = ("activation_checkpointing", "attention", "logits")


def use_fused_adamw(requested: bool | None, device_type: str, precision: str, gradient_clip_val: float | None) -> bool:
    """Whether AdamW runs fused (one kernel for all parameters); ``requested`` None means auto.

    Fused wins on CUDA and, since torch 2.13, on CPU too (+9% whole training steps for the tiny and ref16m presets
    on a 2-core AVX-512 CPU, against the multi-tensor foreach path); MPS keeps foreach (not measured). Under
    16-mixed a fused AdamW unscales the loss-scaled gradients inside its kernel, so they are still scaled when
    clipping would run: clipping then needs the foreach path. bf16-mixed has no loss scale, and
    :meth:`LitLlama.configure_gradient_clipping` clips there although Lightning refuses it."""
    clipping_scaled = bool(gradient_clip_val) and precision == "16-mixed"
    if requested and clipping_scaled:
        raise ConfigError(
            f"optim.fused=true cannot clip gradients under precision={precision} (they are still loss-scaled when "
            "clipping runs); set optim.fused=null (auto) or trainer.gradient_clip_val=null"
        )
    return requested if requested is not None else device_type in ("cuda", "cpu") and not clipping_scaled


# The smallest AdamW eps that trains with its state in fp16 (precision 16-true), measured on the tiny preset (2-core
# CPU, 20 steps): 1e-8, the default, is 0 in fp16 and the loss went 6.3 → 57 within 8 steps; 1e-7 (two steps of
# fp16's smallest subnormal) ended with a held-out loss above the one 10 steps earlier; 1e-6 to 1e-4 trained as
# fp32 did. bf16 has fp32's range, so bf16-true keeps any eps.
FP16_ADAMW_MIN_EPS = 1e-6


def check_adamw_eps(eps: float, precision: str) -> None:
    """A one-line refusal of an AdamW ``eps`` too small for fp16 when the weights, and so AdamW's state, are fp16
    (``precision="16-true"``): a second moment that underflows to 0 then divides the update by (almost) nothing,
    and the run blows up without a NaN to stop it."""
    if precision == "16-true" and eps < FP16_ADAMW_MIN_EPS:
        raise ConfigError(
            f"optim.eps={eps:g} is too small for AdamW's state in fp16, where trainer.precision=16-true keeps it: "
            "second moments underflow to 0 there and the updates blow up. Use trainer.precision=16-mixed (fp32 "
            f"weights) or bf16-true, or raise optim.eps to {FP16_ADAMW_MIN_EPS:g} or more"
        )


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two parameter groups for ``model``'s trainable weights: the weights of its linear layers, decayed by
    ``weight_decay``, and the rest (norm gains, embedding tables, an output head tied to one) not decayed: decaying a
    norm gain or an embedding row pulls it towards 0 for no benefit.

    Decided by the layer that holds each weight, not by its name or shape, so the rule is the same for any model
    (lfpl-bench applies it to litgpt's ``GPT`` too) and under FSDP, where with several ranks every parameter is a
    1-D slice of its rank's shard by the time the optimizer is built (a rule on ``p.dim()`` decayed nothing there)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    decay, no_decay = [], []
    for p in model.parameters():  # a tied weight comes once
        if p.requires_grad:
            (decay if id(p) in linear else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# What a run trains on, by its data config's format (pretraining text has none), as errors name it
DATA_KINDS = {"text": "text (pretraining)", "sft": "conversations (experiment=sft)",
              "preference": "preference pairs (experiment=dpo)"}


def _data_kind(run_config: dict | None) -> str | None:
    """Which of :data:`DATA_KINDS` a run's config trains on; None without a config (the Python API)."""
    if not run_config:
        return None
    return (run_config.get("data") or {}).get("format", "text")


def weights_sha256(network: nn.Module) -> str:
    """The identity of a network's weights: sha256 of their names and bytes (about 1 s per GB on a CPU core)."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # bf16: as bytes
    return digest.hexdigest()


class LitLlama(L.LightningModule):
    """Next-token prediction with AdamW and a warmup + decay schedule (scheduler.decay: cosine, linear or constant).

    Args:
        model: the transformer's shape.
        optim: AdamW settings.
        scheduler: learning-rate schedule; its length is ``trainer.max_steps``.
        run_config: the run's whole resolved config, stored with the checkpoint for the record (and for
            ``lfpl-eval`` to find the run's data). The module reads only its data format, to refuse resuming a
            checkpoint under another kind of data (:data:`DATA_KINDS`).
        network: an already-built transformer of shape ``model`` to wrap (e.g. loaded from an exported or
            Hugging Face folder, or the ``init_from`` weights of a fine-tune); None builds a freshly initialised one.
        lora: train LoRA adapters on ``network`` instead of all its weights; checkpoints then hold the adapters only.
        init_from: where ``network``'s weights came from, recorded so that an adapter checkpoint can find its base.
        init_sha256: the fingerprint of those weights that a checkpoint recorded (:func:`weights_sha256`); computed
            afresh from ``network`` where the checkpoint depends on them (LoRA adapters, a DPO reference), and
            compared with the recorded one on loading.
    """

    keeps_reference = False  # whether the objective compares against the starting weights (DPO), rebuilt on resume

    def __init__(
        self,
        model: ModelConfig | dict,
        optim: OptimConfig | dict | None = None,
        scheduler: SchedulerConfig | dict | None = None,
        run_config: dict | None = None,
        network: Transformer | None = None,
        lora: LoraConfig | dict | None = None,
        init_from: str | None = None,
        init_sha256: str | None = None,
    ) -> None:
        super().__init__()
        model_cfg = _as(ModelConfig, model)
        if network is not None and network.config != model_cfg:
            raise ValueError(f"network has config {network.config}, not model={model_cfg}")
        self.optim_cfg = _as(OptimConfig, optim or {})
        self.scheduler_cfg = _as(SchedulerConfig, scheduler or {})
        self.lora_cfg = _as(LoraConfig, lora or {})
        # The starting weights' identity, where checkpoints hold less than the whole model: adapters only, or no
        # DPO reference. Their init_from path may by then hold another model (a recipe re-run into its folder),
        # which the adapters were silently merged onto.
        depends = self.lora_cfg.enabled or self.keeps_reference
        self.base_sha256 = weights_sha256(network) if network is not None and init_from and depends else None
        self.save_hyperparameters(
            {
                "model": dataclasses.asdict(model_cfg),
                "optim": dataclasses.asdict(self.optim_cfg),
                "scheduler": dataclasses.asdict(self.scheduler_cfg),
                "run_config": run_config,
                "lora": dataclasses.asdict(self.lora_cfg),
                "init_from": init_from,
                "init_sha256": self.base_sha256 or init_sha256,
            }
        )
        self.model = network if network is not None else Transformer(model_cfg)
        self.base_given = network is not None  # whether a LoRA checkpoint's adapters have their base to sit on
        if self.lora_cfg.enabled:
            apply_lora(self.model, self.lora_cfg)
        self.val_metrics = LanguageModelMetrics()
        self.tokenizer: Tokenizer | None = None
        self.compiled = False  # whether compile_training ran; model.logits=auto looks at it
        self._step_sums: dict[str, torch.Tensor] = {}  # the optimizer step's logged values so far (_log_step_means)
        # (optimizer step, logged metrics) of the last validation while fitting: when fit ends on that step, they
        # are the trained weights' final metrics, and lfpl-train does not measure them a second time
        self.last_fit_validation: tuple[int, dict[str, float]] | None = None

    # ---------------------------------------------------------------------------------------------------------
    # Tokenizer: travels inside the checkpoint
    # ---------------------------------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        if tokenizer.vocab_size != self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={self.model.config.vocab_size}"
            )
        self.tokenizer = tokenizer
        # Bytes of text per token id, for bits per byte; derived from the tokenizer, so not saved as state. Made on
        # the module's device: resuming under FSDP calls this (from on_load_checkpoint) after the move to the GPU.
        for name in ("token_bytes", "first_token_bytes"):
            self.register_buffer(name, torch.from_numpy(getattr(tokenizer, name)).to(self.device), persistent=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer_model"] = self.tokenizer.model_proto
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self._saved(k)}

    def _saved(self, key: str) -> bool:
        """Which weights a checkpoint keeps: all of them, or with LoRA the adapters only (the frozen base is
        init_from's, reloaded from there)."""
        return not self.lora_cfg.enabled or ADAPTER_MARK in key

    def _fill_unsaved(self, checkpoint: dict[str, Any]) -> None:
        """Put back the weights ``_saved`` left out, from this module (which holds them already), so that loading
        stays strict: a missing or misnamed saved weight is still an error."""
        state = checkpoint.get("state_dict")
        if state is not None:
            state.update({k: v for k, v in self.state_dict().items() if not self._saved(k) and k not in state})

    def _check_starting_model(self, saved: dict[str, Any]) -> None:
        """A LoRA checkpoint holds the adapters alone, so they load onto this module's base weights: those they were
        trained on (and a DPO run's reference is rebuilt from them too), under the same lora.* settings. Otherwise
        lora.r was a size-mismatch traceback, lora.alpha (which scales the adapters) or another init_from loaded
        silently, and LitLlama.load_from_checkpoint put the adapters on random weights."""
        lora = saved.get("lora") or {}
        changed = [f"lora.{k}: {v} → {self.hparams['lora'].get(k)}" for k, v in lora.items()
                   if self.hparams["lora"].get(k, v) != v]
        if changed:
            raise ConfigError(f"the checkpoint's LoRA settings differ from this run's ({'; '.join(changed)}); "
                              "resume with its lora.* settings")
        if not (lora.get("enabled") or "dpo" in saved):  # every weight is in the checkpoint
            return
        if lora.get("enabled") and not self.base_given:
            raise ConfigError(f"the checkpoint holds LoRA adapters only, without the weights they adapt (its "
                              f"init_from={saved.get('init_from')}): pass that model as network=, or load both with "
                              "llmfoundry_pl.cli.common.load_checkpoint(path), as lfpl-eval and lfpl-generate do")
        recorded, given = saved.get("init_from"), self.hparams["init_from"]
        what = "adapters" if lora.get("enabled") else "reference model"
        moved = recorded and given and Path(recorded).expanduser().resolve() != Path(given).expanduser().resolve()
        if moved and Path(recorded).expanduser().exists():
            raise ConfigError(f"the checkpoint was fine-tuned from init_from={recorded}, not {given}, and its "
                              f"{what} came from that model; resume with init_from={recorded}")
        if saved.get("init_sha256") and self.base_sha256:  # the weights themselves, wherever they are now
            if saved["init_sha256"] != self.base_sha256:
                raise ConfigError(f"the checkpoint's {what} came from other weights than init_from={given} holds now "
                                  "(replaced since, as by a run into the same folder?); put back the model it was "
                                  "fine-tuned from")
        elif moved and (self._trainer is None or self.trainer.is_global_zero):
            # Moved (another folder, another machine), from before checkpoints recorded the weights' fingerprint:
            # nothing to compare with, so the user's word is taken.
            print(f"warning: the checkpoint was fine-tuned from init_from={recorded}, which is gone; its {what} "
                  f"are taken to come from init_from={given}", file=sys.stderr, flush=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the tokenizer; when resuming, first check that the checkpoint fits this run (Lightning calls
        this before loading the weights, so a mismatch is one clear line instead of a size-mismatch traceback)."""
        saved = checkpoint.get("hyper_parameters", {})
        # A DPO or SFT run resumed under pretraining's settings went on as next-token training on the plays, exit 0.
        before, now = _data_kind(saved.get("run_config")), _data_kind(self.hparams.get("run_config"))
        if before and now and before != now and checkpoint.get("optimizer_states"):
            raise ConfigError(f"the checkpoint was trained on {DATA_KINDS[before]}, and this run's data is "
                              f"{DATA_KINDS[now]}; resume with the run's own settings, or start from its weights "
                              "with init_from= instead of ckpt_path=")
        saved_model = saved.get("model", {})
        # The presets set max_seq_len from data.seq_len, which is then the setting that changed.
        changed = [f"model.{k}: {v} → {getattr(self.model.config, k)}"
                   + (" (the model presets take it from data.seq_len)" if k == "max_seq_len" else "")
                   + ((" (the tokenizer's: set data.vocab_size)" if now in (None, "text") else " (the init_from "
                       "model's: resume with the run's init_from)") if k == "vocab_size" else "")
                   for k, v in saved_model.items() if getattr(self.model.config, k, v) != v and k not in RUN_OPTIONS]
        if changed:
            raise ConfigError(f"the checkpoint's model differs from this run's ({'; '.join(changed)}); "
                              "resume with the same model settings, or start a new run")
        # Resuming restores the optimizer's and the schedule's state, settings included: new optim.* or scheduler.*
        # values would be recorded in this run's checkpoints but never used.
        changed = [f"{group}.{k}: {v} → {self.hparams[group][k]}" for group in ("optim", "scheduler")
                   for k, v in (saved.get(group) or {}).items() if self.hparams[group].get(k, v) != v]
        if changed and checkpoint.get("optimizer_states"):
            raise ConfigError(f"resuming restores the checkpoint's optimizer and schedule, so {'; '.join(changed)} "
                              "would be ignored; resume with its settings, or start a new schedule from its weights "
                              "with init_from= instead of ckpt_path=")
        self._check_starting_model(saved)
        self._fill_unsaved(checkpoint)
        if "tokenizer_model" not in checkpoint:
            return
        tokenizer = Tokenizer(checkpoint["tokenizer_model"])
        if self.tokenizer is not None and self.tokenizer.sha256 != tokenizer.sha256:
            raise ConfigError("the checkpoint was trained with another tokenizer than this run's data.* settings "
                              "give; resume with the run's data settings, or start a new run")
        self.set_tokenizer(tokenizer)

    # ---------------------------------------------------------------------------------------------------------
    # Steps
    # ---------------------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(tokens, segment_ids=segment_ids)

    def train_forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """The training step's model and loss: ``{"loss": ...}``, plus whatever else the objective logs as
        ``train/<name>``. The part of the step that :meth:`compile_training` compiles."""
        # (B, T) inputs and (B, T) targets: y is x shifted left by one token, IGNORE_INDEX where nothing is learnt
        # (fine-tuning prompts, padding); packed fine-tuning rows add (B, T) segment ids.
        x, y, *segment_ids = batch
        chunked = uses_chunked_loss(self.model.config.logits, self.compiled)
        return {"loss": next_token_loss(self.model, x, y, *segment_ids, chunked=chunked)}

    def compile_training(self) -> None:
        """torch.compile :meth:`train_forward`: the model and its loss as one graph, so the loss's softmax and its
        gradient fuse with the rest (1-2% faster per step than compiling the model alone, on a 2-core CPU).
        Validation and sampling stay eager: they run without gradients (no_grad, inference mode), and each mode
        would compile graphs of its own — 16 s for the tiny preset's final validation on that CPU — for a few
        batches. Parameter names, and so checkpoints, stay those of the plain model."""
        self.train_forward = torch.compile(self.train_forward)
        self.compiled = True

    def on_fit_start(self) -> None:
        self._dropout_seed = torch.initial_seed()  # the run's seed (lfpl-train seeds before building anything)
        self._step_sums = {}  # a fit stopped inside a step (Ctrl-C in a notebook) left its micro-batches' sums

    def on_train_batch_start(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """With dropout (model.dropout, lora.dropout), seed torch's RNG from (seed, step, micro-batch, rank), as the
        data windows are: the masks were drawn from the RNG's running state, which a resumed run restarts from the
        seed, so resuming at step 4 changed the losses from there (6.18263 → 6.18328). Now each micro-batch's masks
        are the same in a resumed run as in the uninterrupted one."""
        if self.model.config.dropout or (self.lora_cfg.enabled and self.lora_cfg.dropout):
            key = [self._dropout_seed, self.global_step, batch_idx, self.global_rank]
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        outputs = self.train_forward(batch)
        loss = outputs["loss"] * self._share_of_step(batch)
        self._log_step_means({**outputs, "loss": loss}, batch_idx)
        # Where every step holds the same tokens (a data module of another kind, or none: the Python API's loaders,
        # is taken at its batches' word)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0 and \
                getattr(self.trainer.datamodule, "same_tokens_every_step", True):
            # Only on the steps Lightning writes logs: logging a Python number copies it to the GPU, which waits
            # for the GPU to finish (torch.cuda.set_sync_debug_mode flagged it once per step on an H100).
            tokens_per_step = batch[0].numel() * self.trainer.accumulate_grad_batches * self.trainer.world_size
            self.log("train/tokens", float((self.global_step + 1) * tokens_per_step), reduce_fx="max")
        return loss

    def _log_step_means(self, values: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Log each of ``values`` as ``train/<name>`` once per optimizer step: its mean over the step's micro-batches
        and ranks. For the loss, scaled by :meth:`_share_of_step`, that mean is the step's loss over all its targets.
        Logged each micro-batch, Lightning kept rank 0's last one: batch 4 × 2 accumulation logged 6.2477 and 2
        ranks × 4 logged 6.2372 where batch 8 logged 6.2425, for one and the same step."""
        accumulate = self.trainer.accumulate_grad_batches
        sums = {name: value.detach() + self._step_sums.get(name, 0.0) for name, value in values.items()}
        if (batch_idx + 1) % accumulate:  # the step goes on (an epoch holds whole steps: StepBatchSampler)
            self._step_sums = sums
            return
        self._step_sums = {}
        for name, total in sums.items():
            # Not prog_bar=True: that reads the loss back to the host after every step (a GPU sync); the progress
            # bar (callbacks.LossProgressBar) reads it only when it refreshes.
            self.log(f"train/{name}", total / accumulate, sync_dist=self.trainer.world_size > 1)

    def _share_of_step(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor | float:
        """What turns this micro-batch's mean loss into its part of the optimizer step's mean over all the step's
        counted targets, when micro-batches count different numbers of them (fine-tuning: replies differ in length).

        Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` (A) and DDP/FSDP average the
        gradients of the W ranks, so the step's gradient is that of the mean of the micro-batch means. That weighs a
        reply token of a micro-batch with few of them more than one of a micro-batch with many, so the same data
        would train differently at batch 16 than at 4 × 4 accumulation or on 4 GPUs (the "gradient accumulation
        bug" fixed in Hugging Face's Trainer in 2024). Scaled by counted · A · W / (the step's count), each
        micro-batch adds its summed loss over the step's count, as one big batch would. The data module gives that
        count (``targets_in_step``); without one (pretraining windows: every micro-batch counts B·T targets) the
        plain mean is already right."""
        targets_in_step = getattr(self.trainer.datamodule, "targets_in_step", None)
        step_count = targets_in_step(self.global_step) if targets_in_step else None
        if step_count is None:
            return 1.0
        counted = (batch[1] != IGNORE_INDEX).sum()
        return counted * (self.trainer.accumulate_grad_batches * self.trainer.world_size / step_count)

    @torch.no_grad()  # as Lightning runs it; a direct call (a notebook, a test) too: the per-token loss has no backward
    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, y, *segment_ids = batch
        # Validation runs eagerly (compile_training compiles the training step only), so under model.logits=auto it
        # takes the chunks: its full logits, B·T·V copied to fp32 twice, outgrew a chunked training step's peak.
        chunked = uses_chunked_loss(self.model.config.logits, compiled=False)
        nats = next_token_loss(self.model, x, y, *segment_ids, chunked=chunked, reduction="none").view_as(y)
        counted = y != IGNORE_INDEX
        # Without a tokenizer the bytes behind each token are unknown: val/bpb then reads as bits per token.
        n_bytes, text_nats = counted.sum(), nats.sum()
        if self.tokenizer is not None:
            first = x == self.tokenizer.bos_id  # a document's first token: see Tokenizer.first_token_bytes
            ids = y.clamp(min=0)  # IGNORE_INDEX, a valid index for the lookup, then left out by ``counted``
            token_bytes = torch.where(first, self.first_token_bytes[ids], self.token_bytes[ids]) * counted
            n_bytes = token_bytes.sum()
            # Bits per byte of the text: a structure token (</s>, <s>, the chat markup) has no bytes, and its nats
            # counted made the figure depend on how the text was cut into documents (300 one-line documents: 31%
            # above the same lines as one), as nanochat's and lm-evaluation-harness's leave them out too
            text_nats = nats[token_bytes > 0].sum()
        self.val_metrics.update(nats.sum(), counted.sum(), n_bytes, text_nats)

    def on_validation_epoch_end(self) -> None:
        self._log_validation(self.val_metrics.compute())  # torchmetrics adds up the sums across ranks

    def _log_validation(self, metrics: dict[str, torch.Tensor]) -> None:
        """Log the held-out metrics as ``val/<name>``. While fitting, a loss that is no longer a number ends the
        run here with one line: else it would train on in NaN to the end, save NaN checkpoints, and crash in the
        first sample it tried to draw. (Every rank computes the same summed loss, so all of them stop.)"""
        logged = {f"val/{k}": v for k, v in metrics.items()}
        self.log_dict(logged, prog_bar=True)
        self.val_metrics.reset()
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        if fitting and not self.trainer.sanity_checking:
            self.last_fit_validation = self.global_step, {k: float(v) for k, v in logged.items()}
            # A metric named "step" is the step loggers write at: the optimizer steps taken, as for the validations
            # before and after fit (trainer.validate). During fit Lightning's own step lags one behind (after step
            # 4 it wrote 3): in a run of 10 validated at 4 and 8, the curve's last point sat 3 steps on, not 2.
            # (Taken out of the callback metrics again in on_validation_end.)
            self.log("step", float(self.global_step))
        if fitting:
            self.check_not_diverged(float(metrics["loss"]))

    def check_not_diverged(self, loss: float) -> None:
        """Raise :class:`TrainingDiverged` if the held-out ``loss`` of the weights trained so far is no longer a
        number: while fitting (at each validation), and in ``lfpl-train``'s validation after fit's last step."""
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"training diverged: val/loss is {loss} at step {self.global_step}; lower optim.lr (it is "
                f"{self.optim_cfg.lr:g}) or keep gradient clipping on (trainer.gradient_clip_val=1.0). The "
                "checkpoints saved before this step are kept"
            )

    def on_validation_end(self) -> None:
        # Left there, the "step" _log_validation logs named the checkpoints saved between validations
        # (every_n_train_steps): ModelCheckpoint prefers it to trainer.global_step, so step 6's save overwrote step
        # 4's file, under its name. Lightning calls this after the callbacks' on_validation_end, which name theirs
        # rightly.
        self.trainer.callback_metrics.pop("step", None)

    def sampling_model(self) -> Transformer | None:
        """The transformer to generate text with between training steps, on global rank 0; None on other ranks.

        That is ``self.model``, except under FSDP. There each block holds a flat shard that only the FSDP forward of
        the whole module gathers, in the precision's dtype, so a direct call of ``self.model`` fails (one GPU: "mat1
        and mat2 ... float != BFloat16"; several: every rank holds a slice). Then the full weights are gathered, as
        for a checkpoint, and rank 0 gets an unsharded fp32 copy. Under FSDP that is a collective: every rank must
        call this."""
        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDPStrategy):
            return self.model if self.trainer.is_global_zero else None
        # cpu_offload: the full state goes to rank 0's host memory only (the other ranks get an empty dict). Not when
        # the shards are in host memory already: offloading from the CPU to the CPU frees the gathered weights before
        # they are copied (a segfault with 2 ranks, torch 2.13), and there rank 0 holds them anyway.
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.device.type != "cpu")
        state = get_model_state_dict(strategy.model, options=options)
        if not self.trainer.is_global_zero:
            return None
        network = Transformer(self.model.config)
        if self.lora_cfg.enabled:
            apply_lora(network, self.lora_cfg)
        network.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        return network.to(self.device)

    def flops_per_batch(self, batch: tuple[torch.Tensor, ...]) -> int:
        """Training FLOPs of the micro-batch ``batch``, read by the throughput callback to report MFU. Counted from
        the batch's own shape: fine-tuning rows are padded to the micro-batch's longest example, not to
        data.seq_len (the demo task's: ~70 of 256), and the model computes every padded position."""
        rows, width = batch[0].shape
        return self.model.flops_per_token(width, weights_trained=not self.lora_cfg.enabled) * rows * width

    # ---------------------------------------------------------------------------------------------------------
    # Optimizer and schedule
    # ---------------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        groups = adamw_param_groups(self.model, cfg.weight_decay)
        fused = use_fused_adamw(cfg.fused, self.device.type, str(self.trainer.precision),
                                self.trainer.gradient_clip_val)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
        schedule = WarmupDecay(self.scheduler_cfg, total_steps=self.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's clipping (``trainer.gradient_clip_val``), also in two cases where Lightning refuses a sound one:

        - FSDP, by norm (Lightning issue #19235): the norm is over every rank's shard, which only the root FSDP
          module's own ``clip_grad_norm_`` can compute.
        - a fused AdamW under bf16-mixed (Lightning issue #21435): Lightning refuses fused optimizers under any
          mixed precision because under 16-mixed the gradients are still loss-scaled here; bf16-mixed has no loss
          scale, so its gradients are the true ones and Lightning's plain clipping is right for them."""
        strategy, precision = self.trainer.strategy, self.trainer.precision_plugin
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        if gradient_clip_val and algorithm == GradClipAlgorithmType.NORM and isinstance(strategy, FSDPStrategy):
            strategy.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and isinstance(precision, MixedPrecision) and precision.scaler is None:
            # the base class's clipping, without MixedPrecision's refusal
            Precision.clip_gradients(precision, optimizer, gradient_clip_val, algorithm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


class WarmupDecay:
    """Learning-rate multiplier per optimizer step: linear warmup to 1, then cosine (or linear) decay to
    ``min_lr_ratio`` at ``total_steps``. A plain callable object (not a lambda) so the scheduler's state, and so
    resuming, works."""

    def __init__(self, cfg: SchedulerConfig, total_steps: int) -> None:
        self.decay, self.warmup, self.min_ratio = cfg.decay, cfg.warmup_steps, cfg.min_lr_ratio
        self.total = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.decay == "constant":
            return 1.0
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * shape


class LitDPO(LitLlama):
    """Direct preference optimisation (Rafailov et al., 2023): make the policy prefer the chosen reply to the
    rejected one, measured against a frozen reference model (the starting weights), without a reward model.

    With log-ratios r = log π(reply | prompt) − log π_ref(reply | prompt), the loss of one pair is
    −log σ(β · (r_chosen − r_rejected)); β · r is the "implicit reward" of a reply. Logged: ``train/loss``, and on
    the validation pairs ``val/loss``, ``val/reward_margin`` (mean β·(r_chosen − r_rejected)) and ``val/pref_acc``
    (share of pairs with chosen reward > rejected reward, ties counted half: 0.5 before training, when the policy
    is the reference and every reward is 0).

    The reference is a frozen copy of the starting network, kept out of checkpoints: a resumed run rebuilds it from
    ``init_from``. With LoRA it is the policy itself with its adapters off (:func:`adapters_off`): the frozen base
    weights are the starting network, and a copy would double the weights' memory.

    Batches come from ChatDataModule with data.format=preference: 2B rows, the B chosen conversations first, then
    the B rejected ones.
    """

    keeps_reference = True

    def __init__(
        self, model: ModelConfig | dict, *, network: Transformer | None = None, dpo: DPOConfig | dict | None = None,
        **kwargs,
    ) -> None:
        """``dpo``: beta; the other arguments are :class:`LitLlama`'s (by keyword)."""
        super().__init__(model, network=network, **kwargs)
        self.dpo_cfg = _as(DPOConfig, dpo or {})
        self.hparams["dpo"] = dataclasses.asdict(self.dpo_cfg)
        # The starting weights, frozen; with LoRA the policy's own frozen base weights serve (_reference_logits)
        self.reference = None if self.lora_cfg.enabled else copy.deepcopy(self.model).requires_grad_(False).eval()
        self.val_metrics = PreferenceMetrics()
        dropout = {k: v for k, v in (("model.dropout", self.model.config.dropout),
                                     ("lora.dropout", self.lora_cfg.dropout if self.lora_cfg.enabled else 0.0)) if v}
        if dropout and rank_zero_only.rank == 0:  # a warning, not a refusal: TRL leaves it to a flag as well
            settings = ", ".join(f"{k}={v}" for k, v in dropout.items())
            print(f"warning: DPO with dropout ({settings}) compares a policy with dropout to a reference without, so "
                  "the rewards start away from 0 and stay noisy; TRL turns dropout off for DPO: set it to 0",
                  file=sys.stderr, flush=True)

    def _saved(self, key: str) -> bool:
        return not key.startswith("reference.") and super()._saved(key)

    def _rewards(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """β · log-ratio of the chosen and of the rejected replies, each (B,)."""
        x, y = batch
        with torch.no_grad():
            reference = sequence_log_probs(self._reference_logits(x), y)
        policy = sequence_log_probs(self(x), y)  # (2B,)
        chosen, rejected = (self.dpo_cfg.beta * (policy - reference)).chunk(2)
        return chosen, rejected

    def _reference_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            with adapters_off(self.model):
                return self.model(x)
        self.reference.eval()  # Lightning switches every submodule to train mode; the reference never is
        return self.reference(x)

    def flops_per_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """The policy's forward and backward plus the reference's forward."""
        rows, width = batch[0].shape
        return super().flops_per_batch(batch) + self.model.forward_flops_per_token(width) * rows * width

    def train_forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = self._rewards(batch)
        return {"loss": -F.logsigmoid(chosen - rejected).mean(), "reward_margin": (chosen - rejected).mean()}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected = self._rewards(batch)
        # A pair with no reply token to score is the blank one that evens out the ranks' batches (RankShare)
        scored = (batch[1][: len(chosen)] != IGNORE_INDEX).any(dim=1)
        margin = (chosen - rejected)[scored]
        self.val_metrics.update(-F.logsigmoid(margin), margin)  # summed over batches and ranks: per-pair means

