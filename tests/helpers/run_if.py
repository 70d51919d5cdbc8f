"""``RunIf``: skip a test unless the machine has what it needs (lightning-hydra-template's idea, reduced)."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def RunIf(min_gpus: int = 0, bf16_cuda: bool = False, package: str | None = None) -> pytest.MarkDecorator:  # noqa: N802
    reasons = []
    if torch.cuda.device_count() < min_gpus:
        reasons.append(f"needs {min_gpus} CUDA GPU(s)")
    if bf16_cuda and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        reasons.append("needs a CUDA GPU with bf16")
    if package is not None and importlib.util.find_spec(package) is None:
        reasons.append(f"needs the '{package}' package")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))
