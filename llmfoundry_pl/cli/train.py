"""``lfpl-train``: compose the config → build data, model, trainer → fit → evaluate held-out text → report.

Examples::

    lfpl-train                                         # tiny model, bundled Shakespeare, whatever hardware is found
    lfpl-train model=small hardware=rtx5060 optim.lr=3e-4 trainer.max_steps=2000
    lfpl-train -m optim.lr=1e-3,3e-4 model.n_layers=4,6   # a sweep: summary table in the sweep directory
    lfpl-train ckpt_path=last                          # resume the newest run under paths.runs_dir
    lfpl-train trainer=ddp hardware=cpu trainer.devices=2
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llmfoundry_pl.cli.common import (
    CONFIG_PATH,
    prepare_data_and_model,
    resolve_ckpt_path,
    to_dataclass,
    user_errors,
)
from llmfoundry_pl.cli.ddp import build_strategy, end_distributed_job
from llmfoundry_pl.config import ConfigError, OptimConfig, SchedulerConfig, register_configs
from llmfoundry_pl.inference import generate_text
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.model import TransformerBlock
from llmfoundry_pl.tokenizer import atomic_write_bytes


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job; returns the final held-out metrics (``val/loss``, ``val/ppl``, ``val/bpb``)."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.runs_dir)

    datamodule, model_cfg = prepare_data_and_model(cfg)

    lit = LitLlama(
        model=model_cfg,
        optim=to_dataclass(cfg.optim, OptimConfig),
        scheduler=to_dataclass(cfg.scheduler, SchedulerConfig),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    lit.set_tokenizer(datamodule.tokenizer)
    if cfg.compile:
        lit.model.compile()  # in place: parameter names (and so checkpoints) stay those of the plain model

    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    trainer = _build_trainer(cfg.trainer, callbacks, loggers)

    failed = True
    try:
        start_step, t0 = _checkpoint_step(ckpt_path), time.perf_counter()
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt_path)
        train_seconds = time.perf_counter() - t0
        metrics = {k: float(v) for k, v in trainer.validate(lit, datamodule=datamodule, verbose=False)[0].items()}
        failed = False
    finally:
        end_distributed_job(trainer.strategy, failed)

    if trainer.is_global_zero:
        tokens_per_step = cfg.data.seq_len * cfg.data.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        steps = trainer.global_step - start_step
        metrics["train_tokens_per_s"] = steps * tokens_per_step / train_seconds if train_seconds > 0 else 0.0
        metrics["train_seconds"] = train_seconds
        _report(cfg, lit, trainer, metrics, steps)
    return metrics


def _build_trainer(trainer_cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Lightning Trainer; settings this machine cannot run (``accelerator=gpu`` without a GPU, an unknown
    precision) become one line naming the problem instead of a traceback."""
    strategy = build_strategy(trainer_cfg.strategy, trainer_cfg.devices, block_class=TransformerBlock)
    try:
        return instantiate(trainer_cfg, strategy=strategy, callbacks=callbacks, logger=loggers or False)
    except InstantiationException as e:
        reason = " ".join(str(e.__cause__ or e).split())
        raise ConfigError(
            f"the trainer settings cannot run here: {reason} — fix trainer.*, or pick the hardware= profile of this "
            "machine (hardware=auto finds it)"
        ) from None


def _checkpoint_step(ckpt_path: str | None) -> int:
    """The optimizer step a checkpoint was saved at (0 for a new run), to count this run's own steps."""
    if ckpt_path is None:
        return 0
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def _report(cfg: DictConfig, lit: LitLlama, trainer: L.Trainer, metrics: dict[str, float], steps: int) -> None:
    """Print held-out quality, speed, a sample and the checkpoint; write them to final_metrics.json for sweeps."""
    sample = generate_text(lit.model, lit.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
    if trainer.checkpoint_callback is None:
        ckpt, no_ckpt = "", "(none: callbacks.model_checkpoint is disabled)"
    else:
        ckpt, no_ckpt = trainer.checkpoint_callback.last_model_path, "(none saved: no validation ran)"
    print(
        f"\nheld-out text: val/loss {metrics['val/loss']:.4f} | val/ppl {metrics['val/ppl']:.2f} | "
        f"val/bpb {metrics['val/bpb']:.4f}\n"
        f"trained {steps} steps in {metrics['train_seconds']:.1f} s ({metrics['train_tokens_per_s']:,.0f} tokens/s)\n"
        f"sample: {cfg.sample_prompt}{sample}\n"
        f"checkpoint: {ckpt or no_ckpt}",
        flush=True,
    )
    output_dir = Path(cfg.paths.output_dir)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record = {"overrides": overrides, "metrics": metrics, "checkpoint": ckpt}
    atomic_write_bytes(output_dir / "final_metrics.json", json.dumps(record, indent=2).encode())


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float:
    with user_errors():
        # The value Hydra's sweepers (hparams_search=optuna) minimise.
        return train(cfg)["val/loss"]


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
