#!/usr/bin/env bash
# The outside reference for lfpl-bench's reference shape: litgpt's own `pretrain` (its Fabric loop, torch.compile on,
# AdamW, gradient clipping 1.0) on the ref16m shape — vocab 8192, dim 384, 6 layers, 6 heads / 2 KV heads, hidden
# 1024, fp32, micro-batch 8 × 256 — over the bundled plays, with the 8,192-token SentencePiece model lfpl-train
# builds for them. Run it next to lfpl-bench in the same minutes: this VM's speed drifts by ±10% through a day.
#
#   pip install litgpt          # not a dependency of this project
#   bash docs/baselines/litgpt_pretrain.sh [DIR]
#   lfpl-bench model=ref16m data.vocab_size=8192 hardware=cpu bench.batch_size=8 bench.seq_len=256 bench.steps=20
#
# Prints litgpt's own throughput figure (its ThroughputMonitor's tokens/s at the last of 40 steps; the first step,
# compilation, is outside its window). Not part of the package: a reference point only; see docs/benchmarks.md.
set -euo pipefail
dir=${1:-outputs/baselines/litgpt_ref16m}
rm -rf "$dir" && mkdir -p "$dir/tokenizer" "$dir/train" "$dir/val"

python - "$dir" <<'PY'
import shutil
import sys
from pathlib import Path

from llmfoundry_pl.config import DataConfig
from llmfoundry_pl.data.corpus import bundled_corpus_dir, prepare_corpus

out = Path(sys.argv[1])
tokenizer, _ = prepare_corpus(DataConfig(vocab_size=8192))  # cached after the first lfpl run with this vocabulary
tokenizer.save(out / "tokenizer" / "tokenizer.model")
plays = sorted(bundled_corpus_dir().glob("*.txt"))
for play in plays[:-1]:
    shutil.copy(play, out / "train")
shutil.copy(plays[-1], out / "val")  # litgpt's TextFiles wants a validation folder; validation is off below
PY

cat > "$dir/ref16m.yaml" <<'YAML'
model_config:
  name: ref16m
  block_size: 256
  vocab_size: 8192
  padded_vocab_size: 8192
  n_layer: 6
  n_head: 6
  n_query_groups: 2
  n_embd: 384
  intermediate_size: 1024
  rotary_percentage: 1.0
  parallel_residual: false
  bias: false
  norm_class_name: RMSNorm
  norm_eps: 1.0e-05
  mlp_class_name: LLaMAMLP
  rope_base: 10000
YAML

litgpt pretrain ref16m --config "$dir/ref16m.yaml" --out_dir "$dir/out" --precision 32-true --devices 1 \
  --tokenizer_dir "$dir/tokenizer" --data TextFiles --data.train_data_path "$dir/train" \
  --data.val_data_path "$dir/val" --data.num_workers 1 \
  --train.micro_batch_size 8 --train.global_batch_size 8 --train.max_seq_length 256 --train.max_tokens 81920 \
  --train.lr_warmup_steps 2 --train.log_interval 1 --train.save_interval 100000 \
  --eval.interval 100000 --eval.initial_validation false --eval.final_validation false \
  --logger_name csv > "$dir/pretrain.log" 2>&1 || { tail -20 "$dir/pretrain.log"; exit 1; }

python - "$dir" <<'PY'
import csv
import sys
from pathlib import Path

rows = list(csv.DictReader(next(Path(sys.argv[1], "out", "logs").rglob("metrics.csv")).open()))
print(f"litgpt pretrain, ref16m, batch 8 × 256: {float(rows[-1]['device/items_per_sec']):,.0f} tokens/s "
      f"(first step {float(rows[0]['iter_time']):.1f} s)")
PY
