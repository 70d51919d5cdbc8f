"""lfpl-bench as users run it: a real subprocess, real Hydra composition, a real Trainer and a plain loop."""

from __future__ import annotations

import json

from tests.conftest import run_cli

TINY_BENCH = [
    "hardware=cpu", "compile=false", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "data.vocab_size=512", "bench.seq_len=32", "bench.batch_size=4", "bench.warmup=1",
]


def test_bench_times_the_lightning_step_and_the_plain_loop(tmp_path, cache_dir):
    out = run_cli("bench", *TINY_BENCH, "bench.steps=3", "trainer.accumulate_grad_batches=2", cwd=tmp_path).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["plain_tokens_per_s"] > 0
    assert 0 < result["mfu"] < 1 and result["peak_flops"] > 1e9  # against the matmul peak measured in-process
    assert 0 <= result["data_wait_frac"] < 1 and result["peak_mem_bytes"] > 2**20
    assert abs(result["lightning_overhead"] - (1 - result["tokens_per_s"] / result["plain_tokens_per_s"])) < 1e-3
    assert "litgpt is not installed" in out or "litgpt_tokens_per_s" in result
    table = out[out.index("tokens/s") :].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["lightning", "plain"]
    assert list(tmp_path.iterdir()) == []  # bench writes no files


def test_bench_mistakes_fail_with_one_line(tmp_path, cache_dir):
    proc = run_cli("bench", *TINY_BENCH, "bench.steps=0", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "bench.steps=0" in proc.stderr and "Traceback" not in proc.stderr
