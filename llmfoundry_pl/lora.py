"""LoRA adapters on our Transformer through ``peft``: add, select for saving, and merge back into plain weights.

peft's ``inject_adapter_in_model`` swaps the targeted ``nn.Linear`` layers (``attention.wq``, ...) for LoRA layers in
place, freezes every other weight, and leaves the model's class and ``forward`` as they were — so training,
generation and the KV cache run the same code with or without adapters. Parameter names gain ``.base_layer`` (the
frozen weight) and ``.lora_A.default`` / ``.lora_B.default`` (the adapter).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from llmfoundry_pl.config import ConfigError, LoraConfig
from llmfoundry_pl.model import Transformer

ADAPTER_MARK = ".lora_"  # in the name of every adapter parameter, and of nothing else


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("lora.enabled=true needs peft: pip install 'llmfoundry-pl[lora]'") from None
    return peft


def apply_lora(model: Transformer, cfg: LoraConfig) -> Transformer:
    """Add adapters to ``cfg.targets`` of every block, in place; only the adapters stay trainable."""
    peft = _peft()
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets))
    return peft.inject_adapter_in_model(config, model)


def has_lora(model: nn.Module) -> bool:
    return any(ADAPTER_MARK in name for name, _ in model.named_parameters())


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as it was before LoRA, inside the ``with``: every adapter off and eval mode (no dropout), as a frozen
    copy of the starting model would compute; on leaving, the adapters are on and trainable again.

    DPO's reference with LoRA: the frozen base weights *are* the starting model, so no second copy of them is kept.
    Written here because peft's ``PeftModel.disable_adapter`` belongs to the wrapper ``inject_adapter_in_model``
    does not add; this is its loop over the LoRA layers."""
    peft = _peft()
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model.train(was_training)


def merge_lora(model: Transformer) -> Transformer:
    """Fold each adapter into its frozen weight (W + alpha/r · B A) and put a plain ``nn.Linear`` back, in place:
    the result has the plain model's parameter names, computes the same function, and runs at full speed.

    Written as a loop over peft's LoRA layers because ``merge_and_unload`` belongs to peft's model wrappers, which
    ``inject_adapter_in_model`` deliberately does not add."""
    peft = _peft()
    for name, module in list(model.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    model.requires_grad_(True)
    return model
