#!/usr/bin/env bash
# The whole path on the bundled data with the tiny preset: pretrain → supervised fine-tuning (SFT) → DPO, with the
# demo task's held-out accuracy ("Which play is this passage from?", 13 titles) after each stage.
# Expected: ~7 min on a 2-core CPU (measured: 389–423 s). The last line is one JSON object:
#   {"chance", "base_acc", "sft_acc", "dpo_acc", "dpo_val_pref_acc_start", "dpo_val_pref_acc_end", "questions",
#    "seconds"}
# OUT=dir and QUESTIONS=n (held-out questions scored, default all 507) may be set in the environment.
set -euo pipefail
out=${OUT:-outputs/recipes/sft_dpo_demo}
questions=${QUESTIONS:-507}
start=$SECONDS
last_json() { tail -n 1; }

# 1. Pretrain the tiny model on the plays (the default run, compiled: ~3 min).
lfpl-train hardware=cpu hydra.run.dir=$out/pretrain sample_tokens=0
base=$out/pretrain/checkpoints/last.ckpt
base_eval=$(lfpl-eval ckpt_path=$base task=demo task_limit=$questions | last_json)

# 2. SFT on the demo task's conversations; the loss is on the answers only.
lfpl-train experiment=sft hardware=cpu init_from=$base hydra.run.dir=$out/sft
sft=$out/sft/checkpoints/last.ckpt
sft_eval=$(lfpl-eval ckpt_path=$sft task=demo task_limit=$questions | last_json)

# 3. DPO on the demo pairs (the right title chosen, a wrong one rejected), from the SFT model.
lfpl-train experiment=dpo hardware=cpu init_from=$sft hydra.run.dir=$out/dpo
dpo_eval=$(lfpl-eval ckpt_path=$out/dpo/checkpoints/last.ckpt task=demo task_limit=$questions | last_json)

python - "$base_eval" "$sft_eval" "$dpo_eval" "$out/dpo/final_metrics.json" $((SECONDS - start)) <<'PY'
import json, sys
base, sft, dpo = (json.loads(a) for a in sys.argv[1:4])
record = json.load(open(sys.argv[4]))
print(json.dumps({
    "chance": round(base["chance"], 4), "base_acc": base["accuracy"], "sft_acc": sft["accuracy"],
    "dpo_acc": dpo["accuracy"],
    "dpo_val_pref_acc_start": record["initial_metrics"]["val/pref_acc"],
    "dpo_val_pref_acc_end": record["metrics"]["val/pref_acc"],
    "questions": base["questions"], "seconds": int(sys.argv[5]),
}))
PY
