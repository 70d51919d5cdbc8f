"""``lfpl-train``: compose the config → build data, model, trainer → fit → evaluate held-out text → report.

Examples::

    lfpl-train                                         # tiny model, bundled Shakespeare, whatever hardware is found
    lfpl-train model=small hardware=rtx5060 optim.lr=3e-4 trainer.max_steps=2000
    lfpl-train -m optim.lr=1e-3,3e-4 model.n_layers=4,6   # a sweep: summary table in the sweep directory
    lfpl-train ckpt_path=last                          # resume the newest run under paths.runs_dir
    lfpl-train trainer=ddp hardware=cpu trainer.devices=2
    lfpl-train experiment=sft init_from=outputs/.../last.ckpt    # chat fine-tuning; experiment=dpo for DPO
"""

from __future__ import annotations

import csv
import logging
import math
import signal
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from llmfoundry_pl.allocator import keep_freed_memory
from llmfoundry_pl.callbacks import LastAndBestCheckpoint, SampleTextCallback
from llmfoundry_pl.cli.common import (
    absolute_data_paths,
    absolute_model_path,
    build_trainer,
    compile_training_step,
    fail_sweep_job_alone,
    instantiate_group,
    pick_device,
    prepare_data_and_model,
    read_checkpoint,
    resolve_ckpt_path,
    seed_everything,
    to_dataclass,
)
from llmfoundry_pl.cli.ddp import end_distributed_job
from llmfoundry_pl.cli.sweep_summary import write_final_metrics
from llmfoundry_pl.config import ConfigError, DPOConfig, LoraConfig, OptimConfig, SchedulerConfig
from llmfoundry_pl.data import ChatDataModule, TextDataModule
from llmfoundry_pl.data.corpus import split_counts
from llmfoundry_pl.data.datamodule import check_accumulate
from llmfoundry_pl.inference import generate_text
from llmfoundry_pl.inference.text import encode_prompt
from llmfoundry_pl.lit_module import LitDPO, LitLlama, check_adamw_eps
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.precision import check_fp16_on_cpu
from llmfoundry_pl.tokenizer import Tokenizer, check_encodable


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job; returns the final held-out metrics (``val/loss``, ``val/ppl``, ``val/bpb``)."""
    keep_freed_memory(cfg.keep_freed_memory)  # false undoes an earlier sweep job's true
    seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.runs_dir)
    start_step, fine_tuned_from = _resume_point(ckpt_path)
    max_steps = cfg.trainer.max_steps  # an int (the schema's)
    if max_steps <= 0:  # Lightning's -1, "no limit", included (the data modules refuse it too, but only in fit)
        raise ConfigError(f"trainer.max_steps={max_steps} must be a positive number of optimizer steps: the data and "
                          "the schedule count steps, not epochs")
    if start_step and max_steps <= start_step:  # Lightning would train 0 steps
        raise ConfigError(f"ckpt_path={ckpt_path} was saved at step {start_step}, so trainer.max_steps={max_steps} "
                          "leaves nothing to train: raise trainer.max_steps to train on (past the schedule's end the "
                          "rate stays at its minimum), or measure the model with lfpl-eval")

    # Settings are checked before the tokenizer and token files are built (which can take a while).
    lora, dpo = to_dataclass(cfg.lora, LoraConfig), to_dataclass(cfg.dpo, DPOConfig)
    optim, scheduler = to_dataclass(cfg.optim, OptimConfig), to_dataclass(cfg.scheduler, SchedulerConfig)
    precision, accelerator = str(cfg.trainer.precision), str(cfg.trainer.accelerator)
    if accelerator in ("cpu", "auto"):  # first: fp16 that cannot run here at all, then the eps it would need
        check_fp16_on_cpu(pick_device(accelerator).type, precision, "trainer.precision")  # (build_trainer: others)
    check_adamw_eps(optim.eps, precision)
    with open_dict(cfg):  # the run's config, in its checkpoints, records what this run used, found from anywhere
        if fine_tuned_from and not cfg.init_from:  # resuming a fine-tune: its base, as a fresh start would give it
            if not Path(fine_tuned_from).exists():  # it was "init_from=... does not exist": a setting not given
                raise ConfigError(f"ckpt_path={ckpt_path} was fine-tuned from init_from={fine_tuned_from}, which is "
                                  "not there now; put it back, or give where it is now with init_from=")
            cfg.init_from = fine_tuned_from
        if lora.enabled and not cfg.init_from:
            raise ConfigError("lora.enabled=true adapts a trained model: give it with init_from=")
        if cfg.init_from:  # LoRA adapters find their base there, a resumed DPO its reference
            cfg.init_from = absolute_model_path(cfg.init_from, cfg.paths.runs_dir)
        cfg.ckpt_path = ckpt_path and str(Path(ckpt_path).resolve())  # where the curve before this run is
        absolute_data_paths(cfg.data)
    datamodule, model_cfg, network = prepare_data_and_model(cfg)

    # Preference pairs train with DPO; text and conversations with next-token prediction.
    objective = {"dpo": dpo} if isinstance(datamodule, ChatDataModule) and datamodule.cfg.format == "preference" \
        else {}
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(datamodule, TextDataModule):  # for lfpl-eval to tell whether the text is still what it validated on
        run_config["data_split"] = split_counts(datamodule.token_files.meta)
    lit = (LitDPO if objective else LitLlama)(
        model=model_cfg,
        optim=optim,
        scheduler=scheduler,
        run_config=run_config,
        network=network,
        lora=lora,
        init_from=cfg.init_from,
        **objective,
    )
    lit.set_tokenizer(datamodule.tokenizer)

    callbacks, loggers = instantiate_group(cfg.callbacks, "callbacks"), instantiate_group(cfg.logger, "logger")
    if not loggers:  # logger=none or every logger set to null: the rate has nowhere to go (Lightning raises)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    _check_sample_prompts(cfg, callbacks, datamodule.tokenizer, model_cfg.max_seq_len)
    check_monitors(cfg.callbacks, [f"val/{name}" for name in lit.val_metrics.NAMES])
    trainer = build_trainer(cfg.trainer, callbacks, loggers)
    _check_step_settings(trainer)
    if cfg.compile:  # (its checks before the curve is touched)
        compile_training_step(lit, trainer)
    if start_step and trainer.is_global_zero:
        _keep_the_curve_before(start_step, loggers)
    if max_steps <= scheduler.warmup_steps and trainer.is_global_zero:  # trainer=debug's 20 steps, for one
        print(f"warning: scheduler.warmup_steps={scheduler.warmup_steps} is not below trainer.max_steps={max_steps}: "
              f"the rate rises for the whole run, never reaching optim.lr={optim.lr} nor decaying", file=sys.stderr,
              flush=True)

    failed = True
    try:
        initial = {}
        if cfg.initial_validation and ckpt_path is None:  # the starting point, logged at step 0
            initial = _validate(trainer, lit, datamodule)
            lit.val_metrics.reset()  # validate() re-created its sums under inference mode, which fit could not update
        t0 = time.perf_counter()
        try:
            trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
            train_seconds = time.perf_counter() - t0
            step_speed = _step_speed(trainer)  # before a validation below resets what was logged
            metrics = _final_metrics(trainer, lit, datamodule)
        except SystemExit:  # how Lightning ends its graceful shutdown, in fit or the final validation
            if trainer.interrupted and trainer.is_global_zero:
                print(_resume_hint(trainer, ckpt_path), file=sys.stderr, flush=True)
            if trainer.received_sigterm:  # Lightning's SIGTERMException exits 0, "done" to SLURM or Kubernetes
                raise SystemExit(128 + signal.SIGTERM) from None  # 143, as a process the signal ends
            raise
        # Before the process group goes: under FSDP every rank takes part in gathering the weights to sample with.
        sampler = lit.sampling_model() if cfg.sample_tokens > 0 else None
        failed = False
    finally:
        end_distributed_job(trainer.strategy, failed)

    if trainer.is_global_zero:
        # Pretraining rows are all seq_len tokens; fine-tuning rows are examples of varying length (or, packed,
        # several of them).
        steps = trainer.global_step - start_step
        if isinstance(datamodule, ChatDataModule):
            unit, trained = "examples", datamodule.examples_in_steps(start_step, trainer.global_step)
        else:
            rows_per_step = cfg.data.batch_size * trainer.accumulate_grad_batches * trainer.world_size
            unit, trained = "tokens", steps * rows_per_step * cfg.data.seq_len
        metrics[f"train_{unit}_per_s"] = trained / train_seconds if train_seconds > 0 else 0.0
        metrics["train_seconds"] = train_seconds
        if unit != "tokens":  # the monitor counts the rows' padding too
            step_speed.pop("step_tokens_per_s", None)
        metrics.update(step_speed)
        _report(cfg, lit, trainer, metrics, initial, steps, unit, sampler)
    return metrics


def _final_metrics(trainer: L.Trainer, lit: LitLlama, datamodule: L.LightningDataModule) -> dict[str, float]:
    """The trained weights' held-out metrics: those of fit's own last validation when it ran after the last step
    (as it does when trainer.val_check_interval divides trainer.max_steps, the default run's case), else a
    validation now. A second pass over the held-out split would measure the same weights again and log the same
    figures twice (the default run cut to 120 steps, 2-core CPU: 44.8 s → 42.7 s wall without it).

    In the second case the checkpoints are saved again too: ModelCheckpoint saves at validations, so last.ckpt held
    the weights of the last one (max_steps=10, validations at 4 and 8: step 8, and resuming from it trained steps
    9-10 again), and the best one was chosen without the final weights."""
    step, metrics = lit.last_fit_validation or (None, {})
    if step == trainer.global_step:
        return metrics
    metrics = _validate(trainer, lit, datamodule)
    if "val/loss" in metrics:  # diverged after fit's last validation: no NaN checkpoints (and no NaN sample)
        lit.check_not_diverged(metrics["val/loss"])
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, LastAndBestCheckpoint):
        checkpoint.save_after_validation(trainer)  # on every rank: under FSDP a collective
    elif checkpoint is not None and checkpoint.last_model_path:  # another ModelCheckpoint, named in the config
        trainer.save_checkpoint(checkpoint.last_model_path)
    return metrics


def _step_speed(trainer: L.Trainer) -> dict[str, float]:
    """The training steps' own tokens/s and MFU, as TokenThroughputMonitor last logged them (over about the last
    20 steps), where the wall-clock figure also counts fit's setup, compilation and validation. A sweep compares its
    jobs by these: its first job also pays for measuring the CPU's peak and for Inductor's cold caches (a tiny job:
    884 tokens/s wall-clock against 3,566 in the steps). None in a run too short to fill the monitor's window."""
    logged = trainer.callback_metrics
    figures = {"step_tokens_per_s": logged.get("train/items_per_sec", logged.get("train/device/items_per_sec")),
               "mfu": logged.get("train/device/mfu")}
    return {name: float(value) for name, value in figures.items() if value is not None}


def _check_step_settings(trainer: L.Trainer) -> None:
    """Settings Lightning accepts that would make the run other than it says. Checkpoints are written at
    validations, every trainer.val_check_interval micro-batches: between two micro-batches of one accumulated
    step, a resume cannot continue the run (the gradient summed so far is in no checkpoint). And the training
    stream is max_steps of windows, so trainer.limit_train_batches (N micro-batches an "epoch") made every epoch
    after the first replay the same N."""
    accumulate, interval = trainer.accumulate_grad_batches, trainer.val_check_interval
    check_accumulate(accumulate)  # before it divides: 0 was a ZeroDivisionError below
    if isinstance(interval, int) and interval % accumulate:
        raise ConfigError(f"trainer.val_check_interval={interval} (micro-batches) is not a multiple of "
                          f"trainer.accumulate_grad_batches={accumulate}: its checkpoints would fall inside an "
                          "accumulated step, which no resume can continue; give a multiple of it")
    if trainer.limit_train_batches != 1.0:
        raise ConfigError(f"trainer.limit_train_batches={trainer.limit_train_batches} would replay the same "
                          "windows every epoch; the run's length is trainer.max_steps: set that instead")


def _validate(trainer: L.Trainer, lit: LitLlama, datamodule: L.LightningDataModule) -> dict[str, float]:
    """The held-out metrics; none with ``trainer.limit_val_batches=0`` (Lightning's way to train without
    validation, where ``validate`` returns no results)."""
    results = trainer.validate(lit, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _check_sample_prompts(cfg: DictConfig, callbacks: list, tokenizer: Tokenizer, context: int) -> None:
    """The prompts sampled after each validation and at the end fit the model's context. Checked only when sampled,
    the end's failed after the whole run (no summary, no final_metrics.json), a validation's before any checkpoint."""
    if cfg.sample_tokens < 0:  # taken as 0 without a word, where lfpl-generate refuses max_new_tokens=-3
        raise ConfigError(f"sample_tokens={cfg.sample_tokens} must be 0 (no sample) or more")
    prompts = [("sample_prompt", cfg.sample_prompt)] if cfg.sample_tokens > 0 else []
    prompts += [("callbacks.sample_text.prompt", c.prompt) for c in callbacks if isinstance(c, SampleTextCallback)]
    for setting, prompt in prompts:
        check_encodable(prompt, setting)  # named as set: encode_prompt's own check calls it "the prompt"
        n = len(encode_prompt(tokenizer, prompt, chat=None)[0])  # <s> included, as generation feeds it
        if n > context:
            raise ConfigError(f"{setting} is {n} tokens, more than the model's context (model.max_seq_len={context}): "
                              "shorten it")


def _keep_the_curve_before(step: int, loggers: list) -> None:
    """Resuming into the run's own folder (a fixed hydra.run.dir, as the recipes use), keep its csv/metrics.csv rows
    up to the checkpoint's ``step``: Lightning's CSV logger deletes an existing metrics.csv when it starts (it has no
    append mode), and the curve from before the interruption was gone. Rows logged after the checkpoint are left
    out: the resumed run logs those steps again."""
    for logger in loggers:
        path = Path(logger.log_dir) / "metrics.csv" if isinstance(logger, CSVLogger) else None
        if path is None or not path.is_file():
            continue
        with open(path, newline="") as f:  # a validation logs at the step it follows, the training steps after it
            rows = [r for r in csv.DictReader(f) if _whole_row(r) and (int(r["step"]) < step or (
                int(r["step"]) == step and any(v for k, v in r.items() if k.startswith("val/"))))]
        logger.experiment.metrics[:0] = rows  # creating the writer deleted the file: written back at once, or a
        logger.experiment.save()  # resume that failed before its first log (a setting refused, a kill) lost it


def _whole_row(row: dict) -> bool:
    """Whether a metrics.csv row holds a step and numbers only: the run a resume follows may have been killed while
    writing its last row, which was then cut short (kept, it ended the resume in a TypeError)."""
    try:
        int(row["step"])
        for value in row.values():
            if value:
                float(value)
    except (TypeError, ValueError):  # no step (too few cells), a number cut short, or extra cells (a list)
        return False
    return True


def check_monitors(callbacks: DictConfig | None, validated: list[str]) -> None:
    """Refuse a checkpoint or early-stopping ``monitor`` that names a ``val/`` metric the run does not log
    (``validated``): Lightning said so at the first validation, hours into a run, in a 47-line traceback, with
    nothing saved. (Other names, a ``train/`` metric say, are left to Lightning.) ``None``: ``~callbacks``, none."""
    for key, node in (callbacks or {}).items():
        monitor = node.get("monitor") if isinstance(node, DictConfig) else None
        if isinstance(monitor, str) and monitor.startswith("val/") and monitor not in validated:
            raise ConfigError(f"callbacks.{key}.monitor={monitor} is not a metric this run validates; use one of "
                              f"{', '.join(validated)}")


def _resume_point(ckpt_path: str | None) -> tuple[int, str | None]:
    """The optimizer step a checkpoint was saved at (0 for a new run), to count this run's own steps, and the model
    it was fine-tuned from (its recorded ``init_from``), which a resumed fine-tune starts from again: the tokenizer,
    LoRA's frozen base and DPO's reference come from there. Read before anything is built, so a file that cannot be
    resumed from is a one-line error at once."""
    if ckpt_path is None:
        return 0, None
    checkpoint = read_checkpoint(ckpt_path)
    step = checkpoint.get("global_step")
    if not isinstance(step, int):
        raise ConfigError(f"ckpt_path={ckpt_path} holds no training state (global_step) to resume from; give a "
                          "checkpoint lfpl-train wrote (outputs/.../checkpoints/*.ckpt), or init_from= for weights")
    if "optimizer_states" not in checkpoint:  # Lightning's KeyError traceback, 40 lines
        raise ConfigError(f"ckpt_path={ckpt_path} holds weights only (callbacks.model_checkpoint.save_weights_only="
                          "true): no optimizer state to resume; start from its weights with init_from= instead")
    return step, (checkpoint.get("hyper_parameters") or {}).get("init_from")


def _resume_hint(trainer: L.Trainer, resumed_from: str | None) -> str:
    """After Ctrl-C or SIGTERM: where the run stopped, and the checkpoint to go on from: the last validation's, the
    best one where last.ckpt is off (save_last=false), or before this run saved one, the one it resumed from. Each
    only if its file is there: Lightning names a checkpoint before writing it, and an interrupt in between named
    a last.ckpt that did not exist. The best only if this run saved it: a resume into a new folder restores the
    earlier run's best path, which may lie steps before the checkpoint it resumed from."""
    saved = trainer.checkpoint_callback
    candidates = [(saved.last_model_path, "the last validation's checkpoint")] if saved is not None else []
    if saved is not None and saved.best_model_path and Path(saved.best_model_path).parent == Path(saved.dirpath):
        candidates.append((saved.best_model_path, "the best checkpoint"))
    candidates.append((resumed_from, "the checkpoint it resumed from"))
    found = next(((path, what) for path, what in candidates if path and Path(path).is_file()), None)
    if found is None:
        return (f"interrupted at step {trainer.global_step}, before any checkpoint was saved (one is written at each "
                "validation, every trainer.val_check_interval micro-batches)")
    return (f"interrupted at step {trainer.global_step}; to go on from {found[1]}, run lfpl-train "
            f"ckpt_path={found[0]} with this run's settings")


def _report(
    cfg: DictConfig, lit: LitLlama, trainer: L.Trainer, metrics: dict[str, float], initial: dict[str, float],
    steps: int, unit: str, sampler: Transformer | None,
) -> None:
    """Print held-out quality, speed, a sample (from ``sampler``, if any) and the checkpoint; write them to
    final_metrics.json for sweeps."""
    if trainer.checkpoint_callback is None:
        ckpt, no_ckpt = "", "(none: callbacks.model_checkpoint is disabled)"
    else:
        saved = trainer.checkpoint_callback  # with save_last=false, the best one is the run's checkpoint
        ckpt, no_ckpt = saved.last_model_path or saved.best_model_path, "(none saved: no validation ran)"
    speed = f"{metrics[f'train_{unit}_per_s']:,.{0 if unit == 'tokens' else 1}f} {unit}/s"
    lines = [f"\nheld-out {'text' if unit == 'tokens' else 'examples'}: {_held_out(metrics)}",
             f"trained {steps} steps in {metrics['train_seconds']:.1f} s ({speed})"]
    if initial:
        lines.insert(1, f"before training: {_held_out(initial)}")
    if sampler is not None:
        sample = generate_text(sampler, lit.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
        lines.append(f"sample: {cfg.sample_prompt}{sample}")
    report = "\n".join([*lines, f"checkpoint: {ckpt or no_ckpt}"])
    print(report, flush=True)
    logging.getLogger("lfpl.run_summary").info(report.strip())  # into <run>/train.log (conf/train.yaml, job_logging)
    write_final_metrics(Path(cfg.paths.output_dir), metrics, initial_metrics=initial, checkpoint=ckpt)


def _held_out(metrics: dict[str, float]) -> str:
    shown = [f"{k} {v:.{2 if k == 'val/ppl' else 4}f}" for k, v in metrics.items() if k.startswith("val/")]
    return " | ".join(shown) or "not measured (trainer.limit_val_batches=0)"


def run(cfg: DictConfig) -> float:
    """lfpl-train's task (see :func:`~llmfoundry_pl.cli.app.hydra_command`): :func:`train`, returning the value
    Hydra's sweepers (hparams_search=optuna) minimise. A trial without one (no validation, or failed below) is
    +inf, the worst: told a NaN, Optuna raised, and the whole search ended there."""
    try:
        return train(cfg).get("val/loss", math.inf)
    except (ConfigError, RuntimeError) as e:
        if not fail_sweep_job_alone(e, cfg.paths.output_dir, {"val/loss": float("nan")}):
            raise
        return math.inf  # Optuna ranks it last
