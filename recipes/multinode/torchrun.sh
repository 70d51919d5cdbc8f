#!/bin/bash
# Multi-node data-parallel training with torchrun (PyTorch's elastic launcher): run this same script on every node.
# Lightning sees the torchrun environment (TorchElasticEnvironment) and lets torchrun own the processes; each
# process composes the Hydra config itself, so every node must pass the same overrides and the same run folder
# (on a shared filesystem).
#
#   export RUN_DIR=/shared/runs/small-1 MASTER_ADDR=node0
#   NNODES=2 NODE_RANK=0 bash recipes/multinode/torchrun.sh model=small   # on node 0
#   NNODES=2 NODE_RANK=1 bash recipes/multinode/torchrun.sh model=small   # on node 1
#
# On one node, RUN_DIR and MASTER_ADDR have defaults (a dated folder under outputs/, this machine). On several, both
# are required: each node would date its own folder (nodes started a minute apart wrote two), and each would wait
# for the others at its own 127.0.0.1 forever.
#
# Tested here on one machine only (NNODES=1, 2 CPU processes, gloo: tests/test_cli.py::test_torchrun_launch_recipe_on_one_node);
# the multi-node wiring is Lightning's and torchrun's own.
set -euo pipefail
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, the same on every node}"
  : "${RUN_DIR:?set RUN_DIR to one folder on a filesystem every node shares, the same on every node}"
fi
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_DIR=${RUN_DIR:-outputs/torchrun-$(date +%Y%m%d-%H%M)}   # the same path on every node (shared filesystem)

torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  -m llmfoundry_pl.train trainer=ddp trainer.num_nodes="$NNODES" trainer.devices="$GPUS_PER_NODE" \
  hydra.run.dir="$RUN_DIR" "$@"
