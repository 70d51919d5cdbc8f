#!/usr/bin/env bash
# LoRA fine-tuning of a pretrained tiny model on the demo task, then its adapters merged into a Hugging Face
# folder, evaluated and chatted with. Expected: ~1.5 min (measured: 94 s) on a 2-core CPU after recipes/sft_dpo_demo.sh (whose
# pretrained model it starts from; BASE=path/to/last.ckpt picks another).
set -euo pipefail
out=${OUT:-outputs/recipes/lora_sft_cpu}
base=${BASE:-outputs/recipes/sft_dpo_demo/pretrain/checkpoints/last.ckpt}

# Adapters of rank 8 on every linear layer; the base weights stay frozen, and the checkpoint holds the adapters only.
lfpl-train experiment=sft hardware=cpu init_from=$base lora.enabled=true 'lora.targets=[wq,wk,wv,wo,w1,w2,w3]' \
  optim.lr=3e-3 hydra.run.dir=$out/train
ls -l $out/train/checkpoints/last.ckpt
lfpl-export ckpt_path=$out/train/checkpoints/last.ckpt merge_lora=true out=$out/merged overwrite=true verify=true
lfpl-eval ckpt_path=$out/merged task=demo task_limit=130
echo "Which play is this passage from?" | lfpl-generate ckpt_path=$out/merged chat=true interactive=true temperature=0 \
  max_new_tokens=10
