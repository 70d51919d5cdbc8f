"""``lfpl-generate``: continue a prompt with a trained checkpoint.

    lfpl-generate ckpt_path=outputs/.../last.ckpt prompt="ROMEO:" max_new_tokens=200 temperature=0.8 top_k=50
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from llmfoundry_pl.cli.common import CONFIG_PATH, load_checkpoint, user_errors
from llmfoundry_pl.config import ConfigError, register_configs
from llmfoundry_pl.inference import stream_text


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def generate(cfg: DictConfig) -> str:
    if cfg.max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} must be 0 or more")
    _, lit = load_checkpoint(cfg.ckpt_path)
    model = lit.model.to(pick_device(cfg.device))
    options = dict(
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty, seed=cfg.seed,
    )
    # One path for both modes: with stream=true each delta is printed as it comes, else the whole text at the end.
    print(cfg.prompt, end="", flush=True)
    text = ""
    for delta in stream_text(model, lit.tokenizer, cfg.prompt, cfg.max_new_tokens, stop=list(cfg.stop), **options):
        text += delta
        if cfg.stream:
            print(delta, end="", flush=True)
    print("" if cfg.stream else text, flush=True)
    return text


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        generate(cfg)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
