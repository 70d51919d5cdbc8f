#!/usr/bin/env bash
# Data-parallel training with 2 CPU processes (gloo): each rank draws its own windows, gradients are averaged,
# one checkpoint is written. Expected: ~1 min on a 2-core CPU.
set -euo pipefail
lfpl-train trainer=ddp hardware=cpu trainer.devices=2 model.dim=128 trainer.max_steps=40 \
  trainer.val_check_interval=20 hydra.run.dir=outputs/recipes/ddp_cpu
