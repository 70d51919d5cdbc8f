"""``lfpl-eval``: held-out loss, perplexity and bits per byte of a checkpoint on any text.

    lfpl-eval ckpt_path=outputs/.../checkpoints/last.ckpt                     # the run's own validation split
    lfpl-eval ckpt_path=... data.path=my_text_dir/                            # every token of other text

The checkpoint's own tokenizer is always used. The last line printed is a JSON object of the metrics.
"""

from __future__ import annotations

import json

import hydra
import lightning as L
from omegaconf import DictConfig

from llmfoundry_pl.cli.common import CONFIG_PATH, load_checkpoint, user_errors
from llmfoundry_pl.config import DataConfig, register_configs
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.lit_module import LitLlama


def evaluation_data(cfg: DictConfig, lit: LitLlama) -> DataConfig:
    """What to evaluate on: with ``data.path`` unset, the validation split of the data the checkpoint was trained on;
    otherwise all of ``data.path`` (val_fraction=1)."""
    run_data = (lit.hparams.run_config or {}).get("data", {})
    seq_len = cfg.data.seq_len or run_data.get("seq_len") or lit.model.config.max_seq_len
    common = {"seq_len": seq_len, "batch_size": cfg.data.batch_size, "cache_dir": cfg.data.cache_dir,
              "vocab_size": lit.tokenizer.vocab_size}
    if cfg.data.path is None:
        return DataConfig(path=run_data.get("path"), text_field=run_data.get("text_field", "text"),
                          val_fraction=run_data.get("val_fraction", DataConfig.val_fraction), **common)
    return DataConfig(path=cfg.data.path, text_field=cfg.data.text_field, val_fraction=1.0, **common)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    ckpt_path, lit = load_checkpoint(cfg.ckpt_path)
    data_cfg = evaluation_data(cfg, lit)
    datamodule = TextDataModule(data_cfg, tokenizer=lit.tokenizer)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=1, precision=cfg.precision, logger=False, enable_checkpointing=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    metrics = {k: float(v) for k, v in trainer.validate(lit, datamodule=datamodule, verbose=False)[0].items()}
    meta = datamodule.token_files.meta
    what = "validation split of the training data" if cfg.data.path is None else data_cfg.path
    print(f"\n{what}: {meta['val_tokens']:,} tokens\n"
          f"loss {metrics['val/loss']:.4f} | perplexity {metrics['val/ppl']:.2f} | "
          f"bits per byte {metrics['val/bpb']:.4f}")
    print(json.dumps({"ckpt_path": ckpt_path, "data": what, "tokens": meta["val_tokens"], **metrics}), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
