"""lfpl-bench as users run it: a real subprocess, real Hydra composition, a real Trainer and a plain loop."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmfoundry_pl.cli.bench import _combine, _plain_loop
from llmfoundry_pl.config import ModelConfig
from llmfoundry_pl.model import Transformer
from tests.conftest import run_cli

TINY_BENCH = [
    "hardware=cpu", "compile=false", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "data.vocab_size=512", "bench.seq_len=32", "bench.batch_size=4", "bench.warmup=1",
]


def test_bench_times_the_lightning_step_and_the_plain_loop(tmp_path, cache_dir):
    proc = run_cli("bench", *TINY_BENCH, "bench.steps=3", "trainer.accumulate_grad_batches=2", "bench.rounds=2",
                   cwd=tmp_path)
    out = proc.stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert proc.stderr.count("`Trainer.fit` stopped") == 2 and "medians of 2 rounds" in out  # a Trainer per round
    assert 0 <= result["tokens_per_s_spread"] < 2 and 0 <= result["plain_tokens_per_s_spread"] < 2
    assert result["devices"] == 1 and result["tokens_per_step"] == 4 * 32 * 2  # batch × seq_len × accumulation
    assert out.count(f"{result['params'] / 1e6:.1f}M parameters") == 1 and result["params"] > 2 * 512 * 32
    assert result["tokens_per_s"] > 0 and result["plain_tokens_per_s"] > 0
    assert 0 < result["mfu"] < 1 and result["peak_flops"] > 1e9  # against the matmul peak measured in-process
    assert 0 <= result["data_wait_frac"] < 1 and result["peak_mem_bytes"] > 2**20
    assert 0 < result["train_mem_bytes"] < result["peak_mem_bytes"] and result["plain_train_mem_bytes"] > 0
    assert f"attention={result['attention']}," in out and result["attention"] in ("math", "sdpa")  # on a CPU
    assert f"logits={result['logits']};" in out and result["logits"] == "chunked"  # model.logits=auto, eager
    assert abs(result["lightning_overhead"] - (1 - result["tokens_per_s"] / result["plain_tokens_per_s"])) < 1e-3
    assert "litgpt is not installed" in out or "litgpt_tokens_per_s" in result
    assert result["weights_finite"] is True and "warning" not in out
    assert f"precision {result['precision']}," in out and result["precision"] in ("32-true", "bf16-mixed")  # as run
    table = out[out.index("tokens/s  spread") :].splitlines()
    assert [line.split()[0] for line in table[1:3]] == ["lightning", "plain"]
    assert list(tmp_path.iterdir()) == []  # bench writes no files


def test_bench_says_when_the_steps_it_timed_diverged(tmp_path, cache_dir):
    # A step that makes NaN weights runs as fast as a sound one; the figures must not pass for a working setup.
    proc = run_cli("bench", *TINY_BENCH, "bench.steps=3", "optim.lr=1e8", "scheduler.warmup_steps=0",
                   "trainer.gradient_clip_val=null", "trainer.precision=32-true", "bench.plain=false", cwd=tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["weights_finite"] is False and result["tokens_per_s"] > 0
    assert "warning: the weights are NaN or inf after the timed steps" in proc.stdout


def test_bench_under_ddp_counts_the_tokens_of_every_rank(tmp_path, cache_dir):
    proc = run_cli("bench", *TINY_BENCH, "trainer=ddp", "bench.steps=2", cwd=tmp_path)
    out = proc.stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["devices"] == 2 and result["tokens_per_step"] == 2 * 4 * 32  # both ranks' micro-batches
    assert "2 × cpu" in out and result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    # the single-device contenders are left out, and only rank 0 reports
    assert "plain_tokens_per_s" not in result and "rows are skipped with 2 devices" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("lightning ", "plain "))] == ["lightning"]
    assert sum(line.startswith("{") for line in out.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("precision", "weights", "autocast"), [("bf16-true", torch.bfloat16, None),
                                                                ("bf16-mixed", torch.float32, torch.bfloat16),
                                                                ("32-true", torch.float32, None)])
def test_the_plain_loop_runs_the_precision_the_trainer_runs(precision, weights, autocast):
    # It read the setting: bf16-true trained in fp32 (a -20% "overhead"), 16-mixed autocast to fp16 on a CPU where
    # Lightning runs bf16, and the aliases bf16 and 16 ran without autocast
    seen = []

    def loss_fn(model, x, y):
        seen.append((next(model.parameters()).dtype, torch.is_autocast_enabled("cpu") and
                     torch.get_autocast_dtype("cpu")))
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=16))
    tokens = torch.randint(0, 64, (2, 17))
    data = SimpleNamespace(train_batches=lambda start, n: [(tokens[:, :-1], tokens[:, 1:])] * n)
    cfg = OmegaConf.create({"trainer": {"accumulate_grad_batches": 1, "gradient_clip_val": 1.0},
                            "optim": {"fused": None, "weight_decay": 0.1, "lr": 1e-3, "betas": [0.9, 0.95],
                                      "eps": 1e-8}})
    _plain_loop(model, loss_fn, data, cfg, precision, torch.device("cpu"), 2, 1, lambda *figures: figures)
    assert seen == [(weights, autocast or False)] * 2


def test_bench_combines_rounds_into_medians_and_a_spread():
    def round_(tokens_per_s, first_step, peak_mem):
        return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s / 1e4, "data_wait_frac": 0.01,
                "first_step_s": first_step, "peak_mem_bytes": peak_mem, "train_mem_bytes": peak_mem - 100}

    row = _combine([round_(900.0, 5.0, 300), round_(1000.0, 0.1, 200), round_(1200.0, 0.2, 400)])
    # the middle rate, not the mean; the first round's first step (it compiles) and memory (the one that is its own
    # where the peak cannot be restarted)
    assert row["tokens_per_s"] == 1000.0 and row["mfu"] == 0.1 and row["data_wait_frac"] == 0.01
    assert row["first_step_s"] == 5.0 and row["peak_mem_bytes"] == 300 and row["train_mem_bytes"] == 200
    assert row["tokens_per_s_spread"] == pytest.approx(0.3)
    assert "tokens_per_s_spread" not in _combine([round_(900.0, 5.0, 300)])  # one round shows no spread


# trainer.precision=64: the planned memory beside the measured refused it, after the whole benchmark had run
@pytest.mark.parametrize("override", ["bench.steps=0", "bench.rounds=0", "bench.seq_len=0", "trainer.precision=64"])
def test_bench_mistakes_fail_with_one_line(tmp_path, cache_dir, override):
    proc = run_cli("bench", *TINY_BENCH, override, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and override in proc.stderr and "Traceback" not in proc.stderr


def test_a_bench_sweep_job_that_cannot_run_fails_alone(tmp_path, cache_dir):
    # It ended the sweep (exit status 2, no later job, no table); lfpl-train's sweeps already went on.
    proc = run_cli("bench", "-m", *TINY_BENCH, "bench.steps=1", "bench.plain=false", "model.n_heads=3,2",
                   "hydra.sweep.dir=s", cwd=tmp_path, check=False)
    assert "error: model.dim=32 is not divisible by model.n_heads=3" in proc.stderr and proc.returncode == 2
    rows = list(csv.DictReader(open(tmp_path / "s" / "summary.csv")))
    assert [(r["status"], bool(r["tokens_per_s"])) for r in rows] == [("(failed)", False), ("", True)]


def test_bench_sweep_measures_each_job_afresh_and_ends_with_a_table(tmp_path, cache_dir):
    """lfpl-bench -m: the jobs run in one process, yet the smaller second job's memory is its own (the process's
    resident peak is restarted per job and contender, after the freed heap is handed back), and a table compares
    them."""
    tiny = [arg for arg in TINY_BENCH if not arg.startswith("bench.batch_size=")]
    proc = run_cli("bench", "-m", *tiny, "bench.steps=2", "data.vocab_size=8192", "model.logits=full",
                   "bench.batch_size=32,1", cwd=tmp_path)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    jobs = [json.loads((sweep / str(n) / "final_metrics.json").read_text()) for n in range(2)]
    assert [job["overrides"][-1] for job in jobs] == ["bench.batch_size=32", "bench.batch_size=1"]
    big, small = (job["metrics"] for job in jobs)
    assert big["tokens_per_step"] == 32 * 32 and small["tokens_per_step"] == 32
    # batch 32's full logits (32 × 32 × 8192 in fp32 is 32 MiB a copy: the logits, their softmax and gradients) need
    # ~150 MiB more than batch 1's: the Lightning step's and the plain loop's own memory show it, and so does the
    # process's peak. The margin is wide on purpose: the process's floor creeps up from job to job (freed Python
    # and allocator memory that is not all handed back), by ~25 MiB on CI's machine.
    for key in ("peak_mem_bytes", "train_mem_bytes", "plain_train_mem_bytes"):
        assert small[key] < big[key] - 50 * 2**20, key
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [float(r["tokens_per_s"]) for r in rows] == [big["tokens_per_s"], small["tokens_per_s"]]
    summary = (sweep / "summary.md").read_text()
    assert "sweep summary" in proc.stdout and "| 1   | bench.batch_size=1 " in summary
    assert f"| {big['train_mem_bytes'] / 2**20:,.0f} MiB" in summary  # bytes shown in MiB; the CSV keeps them exact
