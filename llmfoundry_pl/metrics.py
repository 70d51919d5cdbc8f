"""Language-modelling metrics that add up correctly across batches and DDP ranks."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def _add(total: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``total + value`` in float64, for a metric state to be rebound to, not added to in place. Lightning's "-true"
    precisions cast the whole LightningModule with ``.to(dtype)``, and torchmetrics casts the metric states with it:
    a bf16 running sum of ~10^5 nats moves in steps of 512 (``lfpl-eval precision=bf16-true`` read 4.0000 for a
    loss that sums in float64 to 4.0230). The sum starts again in float64 from the cast zero, which is exact."""
    return total.double() + value.double()


class LanguageModelMetrics(Metric):
    """Loss (nats per token), perplexity and bits per UTF-8 byte over everything seen since the last reset.

    Sums, not means of means: a padded last batch or ranks with unequal shares still give the exact average.
    Bits per byte = nats of the text's tokens / ln 2 / their bytes, so models with different tokenizers compare (a
    larger vocabulary lowers the loss per token, not the information per byte); tokens without bytes (``</s>``,
    chat markup) count in the loss per token, not here.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("text_nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nats: torch.Tensor, tokens: torch.Tensor, n_bytes: torch.Tensor,
               text_nats: torch.Tensor | None = None) -> None:
        """``nats``: summed cross-entropy of ``tokens`` predictions; ``text_nats``: the part of it predicting the
        ``n_bytes`` bytes of text (all of it if None)."""
        self.nats = _add(self.nats, nats)
        self.text_nats = _add(self.text_nats, nats if text_nats is None else text_nats)
        # Not +=: under trainer.strategy=ddp_spawn the states sit in memory the processes share, and in-place sums
        # of both ranks landed in one tensor (val/loss read half). Refused now (cli/ddp.py), still the safe form.
        self.tokens = self.tokens + tokens
        self.bytes = self.bytes + n_bytes

    NAMES = ("loss", "ppl", "bpb")  # what compute returns (logged as val/<name>), for settings that name one

    def compute(self) -> dict[str, torch.Tensor]:
        loss = self.nats / self.tokens.clamp(min=1)
        return {
            "loss": loss.float(),
            "ppl": loss.exp().float(),
            "bpb": (self.text_nats / math.log(2) / self.bytes.clamp(min=1)).float(),
        }


class PreferenceMetrics(Metric):
    """DPO on held-out pairs: mean loss, mean reward margin and preference accuracy (chosen reward > rejected
    reward), over every pair since the last reset — sums and counts, so batches and ranks add up exactly."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("loss", "margin", "preferred"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, losses: torch.Tensor, margins: torch.Tensor) -> None:
        """Per-pair DPO losses and reward margins (chosen − rejected). A pair counts as preferred when its margin is
        positive, and as half when it is exactly 0 — as every pair is before training, when the policy is the
        reference: accuracy then starts at 0.5, the level of a coin toss."""
        self.loss = _add(self.loss, losses.sum())
        self.margin = _add(self.margin, margins.sum())
        self.preferred = _add(self.preferred, (margins > 0).sum() + 0.5 * (margins == 0).sum())
        self.pairs = self.pairs + margins.numel()  # not +=: see LanguageModelMetrics.update

    NAMES = ("loss", "reward_margin", "pref_acc")  # what compute returns (logged as val/<name>)

    def compute(self) -> dict[str, torch.Tensor]:
        pairs = self.pairs.clamp(min=1)
        return {"loss": (self.loss / pairs).float(), "reward_margin": (self.margin / pairs).float(),
                "pref_acc": (self.preferred / pairs).float()}
