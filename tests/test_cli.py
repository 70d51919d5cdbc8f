"""The commands as users run them: real subprocesses, real Hydra composition, a real Lightning Trainer."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.precision import cpu_has_native_fp16
from llmfoundry_pl.tokenizer import train_tokenizer
from tests.conftest import TINY, run_cli
from tests.helpers.run_if import RunIf


def read_train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir) -> Path:
    """One tiny training run shared by the eval and generate tests."""
    cwd = tmp_path_factory.mktemp("train")
    proc = run_cli("train", *TINY, "hydra.run.dir=run", cwd=cwd)
    assert "held-out text: val/loss" in proc.stdout
    return cwd / "run"


def test_train_reports_and_leaves_checkpoint(trained_run):
    record = json.loads((trained_run / "final_metrics.json").read_text())
    assert record["metrics"]["val/bpb"] > 0 and record["metrics"]["val/ppl"] > 1
    assert Path(record["checkpoint"]).name == "last.ckpt" and Path(record["checkpoint"]).is_file()
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    # train.log keeps what the run said, with times: Lightning's messages (which wrote to the console only) and the
    # summary printed at the end (the file stayed empty)
    log = (trained_run / "train.log").read_text()
    assert "`Trainer.fit` stopped: `max_steps=8` reached" in log
    assert "held-out text: val/loss" in log and f"checkpoint: {record['checkpoint']}" in log
    assert len(read_train_losses(trained_run)) == 8  # log_every_n_steps=1 for 8 steps
    with open(trained_run / "csv" / "metrics.csv") as f:
        tokens = [float(r["train/tokens"]) for r in csv.DictReader(f) if r.get("train/tokens")]
    assert max(tokens) == 8 * 4 * 32  # 8 steps of 4 windows of 32 tokens
    with open(trained_run / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/device/mfu")]
    # tokens/s and MFU from the throughput callback, against the CPU peak measured at start-up
    assert rows and all(0 < float(r["train/device/mfu"]) < 1 for r in rows)
    assert all(float(r["train/device/items_per_sec"]) > 0 for r in rows)
    with open(trained_run / "csv" / "metrics.csv") as f:
        validations = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]
    # Validated after steps 4 and 8, and logged there (Lightning's own step lagged one behind: 3 and 7, where a
    # validation after fit is logged at its step): fit's validation after the last step gives the final metrics,
    # with no second pass over the same weights
    assert [step for step, _ in validations] == [4, 8] and record["metrics"]["val/loss"] == validations[-1][1]


def test_eval_on_other_text_and_on_the_runs_own_split(trained_run, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("KING LEAR.\nBlow, winds, and crack your cheeks! rage! blow!\n" * 20)
    ckpt = f"ckpt_path={trained_run}/checkpoints/last.ckpt"
    other = json.loads(run_cli("eval", ckpt, f"data.path={text}", cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert other["tokens"] > 100 and other["val/bpb"] > 0 and other["precision"] == "32-true"
    proc = run_cli("eval", ckpt, cwd=tmp_path)
    own = json.loads(proc.stdout.strip().splitlines()[-1])
    assert own["data"] == "validation split of the training data" and own["tokens"] > other["tokens"]
    # the run recorded its split, for lfpl-eval to see that the text has not changed since
    saved = torch.load(f"{trained_run}/checkpoints/last.ckpt", weights_only=False)["hyper_parameters"]
    assert saved["run_config"]["data_split"]["val_tokens"] == own["tokens"] and "warning" not in proc.stderr
    assert list(tmp_path.iterdir()) == [text]  # eval writes no files
    # the run's folder itself (not a model folder: "has no config.json; give a folder written by lfpl-export")
    proc = run_cli("eval", f"ckpt_path={trained_run}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and f"is a training run's folder; give its checkpoint: ckpt_path={trained_run}/" \
        "checkpoints/last.ckpt" in proc.stderr


def test_generate_continues_the_prompt_reproducibly(trained_run, tmp_path):
    args = [f"ckpt_path={trained_run}/checkpoints/last.ckpt", "prompt=ROMEO:", "max_new_tokens=20", "top_k=10"]
    first = run_cli("generate", *args, cwd=tmp_path).stdout
    assert first.strip().splitlines()[0].startswith("ROMEO:")
    streamed = run_cli("generate", *args, "stream=true", cwd=tmp_path).stdout
    assert streamed == first  # a second run samples the same text (same seed), streamed as it comes
    greedy = run_cli("generate", *args, "temperature=0", "top_p=0.9", "repetition_penalty=1.3", cwd=tmp_path).stdout
    assert greedy.startswith("ROMEO:")


def test_generate_batch_mode_interactive_mode_and_speculative_decoding(trained_run, tmp_path):
    ckpt = f"{trained_run}/checkpoints/last.ckpt"
    greedy = [f"ckpt_path={ckpt}", "max_new_tokens=12", "temperature=0"]
    prompts = ["ROMEO:", "Enter", "A"]
    alone = run_cli("generate", *greedy, f"prompt={prompts[0]}", cwd=tmp_path).stdout  # text + "\n"
    # interactive: a prompt per stdin line until EOF, each generated alone; a prompt too long for the context is
    # one line, then it goes on
    typed = run_cli("generate", *greedy, "interactive=true", cwd=tmp_path,
                    input=f"{prompts[0]}\n{'x' * 300}\n{prompts[1]}\n{prompts[2]}\n")
    assert typed.stdout.startswith(alone) and len(typed.stdout) > len(alone)
    assert "error: the prompt is" in typed.stderr and "Traceback" not in typed.stderr
    # batch mode: one JSON line per prompt, each as if generated alone (batch_size=2: a full and a partial batch)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    out = run_cli("generate", *greedy, "prompt_file=prompts.txt", "batch_size=2", cwd=tmp_path).stdout
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert "".join(r["prompt"] + r["completion"] + "\n" for r in records) == typed.stdout
    # speculative decoding with the same checkpoint as draft: same greedy text, every guess accepted
    spec = run_cli("generate", *greedy, f"prompt={prompts[0]}", f"draft_ckpt_path={ckpt}", cwd=tmp_path)
    assert spec.stdout == alone
    assert "draft tokens accepted (100%)" in spec.stderr


def test_generate_interactive_samples_a_prompt_typed_again_anew(trained_run, tmp_path):
    # One seed for every prompt gave a prompt typed again the same sample; each prompt now has its own (seed + n),
    # so a session still repeats as a whole
    args = [f"ckpt_path={trained_run}/checkpoints/last.ckpt", "max_new_tokens=12", "temperature=1", "interactive=true"]
    once = run_cli("generate", *args, cwd=tmp_path, input="ROMEO:\n").stdout
    twice = run_cli("generate", *args, cwd=tmp_path, input="ROMEO:\nROMEO:\n").stdout
    assert once.startswith("ROMEO:") and twice.startswith(once) and twice != once + once


def test_generate_refuses_a_draft_with_another_tokenizer(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    play = sorted(bundled_corpus_dir().glob("*.txt"))[0]
    other = train_tokenizer(play.read_text().splitlines(), vocab_size=512)  # one play only: other merges
    checkpoint["tokenizer_model"] = other.model_proto
    torch.save(checkpoint, tmp_path / "draft.ckpt")
    args = [f"ckpt_path={trained_run}/checkpoints/last.ckpt", "draft_ckpt_path=draft.ckpt", "max_new_tokens=2"]
    proc = run_cli("generate", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "uses a different tokenizer than ckpt_path" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("generate", *args[:1], "draft_ckpt_path=missing.ckpt", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "error: draft_ckpt_path=missing.ckpt does not exist" in proc.stderr


@pytest.mark.parametrize(
    ("placement", "tolerance"),
    [
        pytest.param([], 1e-6, id="cpu"),
        # FSDP on one GPU proves the path (flat sharded parameters, clipping through the root module, full-state-dict
        # checkpoints) under bf16-mixed; GPU kernels are not bit-reproducible, hence the tolerance.
        pytest.param(["hardware=auto", "trainer=fsdp", "trainer.devices=1"], 1e-3, id="fsdp-gpu",
                     marks=RunIf(min_gpus=1)),
    ],
)
def test_resume_continues_exactly(tmp_path, cache_dir, placement, tolerance):
    """Resuming at step 4 gives, step for step, the losses of the uninterrupted run (same data order, same LR), to
    its end three validations later. (Two intervals after the resume point, Lightning's epoch used to end and
    replay the loader: 16 steps are needed to see that.) With dropout, whose masks a resumed run drew from another
    state of the RNG."""
    run = [o for o in TINY if not (placement and o.startswith("hardware="))] + placement + ["trainer.max_steps=16",
                                                                                             "model.dropout=0.1"]
    every_val = ["callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.filename='step{step}'"]
    run_cli("train", *run, *every_val, "hydra.run.dir=full", cwd=tmp_path)
    full = read_train_losses(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "step4.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    proc = run_cli("train", *run, f"ckpt_path={ckpt}", "hydra.run.dir=resumed", cwd=tmp_path)
    assert "not resumable" not in proc.stderr  # Lightning's warning, untrue of these loaders (as the losses show)
    resumed = read_train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [s for s in sorted(full) if s >= 4]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=tolerance, abs=tolerance), step
    # Resumed into its own folder (as after an interruption with a fixed hydra.run.dir), the curve before the
    # checkpoint stays and the steps logged after it are not doubled: Lightning's CSV logger deleted metrics.csv
    shutil.copytree(tmp_path / "full", tmp_path / "same")
    with open(tmp_path / "same" / "csv" / "metrics.csv", "a") as f:
        f.write("0,0.00")  # a row a killed run cut short: the resume ended in a TypeError
    run_cli("train", *run, f"ckpt_path={tmp_path}/same/checkpoints/step4.ckpt", "hydra.run.dir=same", cwd=tmp_path)
    with open(tmp_path / "same" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == sorted(full)
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [4, 8, 12, 16]
    assert read_train_losses(tmp_path / "same") == pytest.approx(full, rel=tolerance, abs=tolerance)
    # `ckpt_path=last` finds the newest last.ckpt under paths.runs_dir
    proc = run_cli("train", *run, "ckpt_path=last", "paths.runs_dir=.", "trainer.max_steps=17", "hydra.run.dir=again",
                   cwd=tmp_path)
    assert "trained 1 steps" in proc.stdout
    assert "held-out text: val/loss" in proc.stdout  # fit validated after step 16, not 17: validated after fitting
    # a finished run resumed as it was would train 0 steps and say nothing of why
    proc = run_cli("train", *run, f"ckpt_path={tmp_path}/again/checkpoints/last.ckpt", "trainer.max_steps=17",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "was saved at step 17, so trainer.max_steps=17 leaves nothing to train" in \
        proc.stderr
    # nor can a resume change the rate or its schedule: both are restored from the checkpoint (they were ignored,
    # and recorded in the new checkpoints as if used)
    proc = run_cli("train", *run, f"ckpt_path={ckpt}", "optim.lr=1e-4", "scheduler.warmup_steps=1", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2 and "optim.lr: 0.003 → 0.0001; scheduler.warmup_steps: 2 → 1 would be ignored" in \
        proc.stderr
    # nor the settings that count the place in the data: half the batch went on with steps 2 and 3's windows again
    proc = run_cli("train", *run, f"ckpt_path={ckpt}", "data.batch_size=2", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("the checkpoint's place in the data counts samples under other settings (samples per step (data.batch_size"
            " × trainer.accumulate_grad_batches × processes): 4 → 2)") in proc.stderr


def test_ddp_sweep_with_mixed_jobs_and_summary(tmp_path, cache_dir):
    """A multirun whose jobs differ (1 process, then DDP with 2 gloo processes): each job runs once, in its own
    directory, and the sweep ends with a summary table."""
    proc = run_cli("train", "-m", *TINY, "trainer=default,ddp", "hydra.sweep.dir=sweep", cwd=tmp_path, timeout=400)
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # no stray sweep from rank 1
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["overrides"].split()[-1] for r in rows] == ["trainer=default", "trainer=ddp"]
    assert all(float(r["val/loss"]) > 0 for r in rows)
    # the steps' own speed beside the wall-clock one, which also counts setup (and this first job's peak measurement)
    assert all(float(r["step_tokens_per_s"]) > float(r["train_tokens_per_s"]) and 0 < float(r["mfu"]) < 1
               for r in rows)
    summary = (sweep / "summary.md").read_text()
    assert "sweep summary" in proc.stdout and "| 1   | trainer=ddp" in summary
    assert "common to all jobs: hardware=cpu" in summary  # the table shows what varied
    ddp_job = json.loads((sweep / "1" / "final_metrics.json").read_text())
    assert Path(ddp_job["checkpoint"]).is_relative_to((sweep / "1").resolve())
    assert "MEMBER: 2/2" in proc.stderr  # rank 1 really ran
    assert not (tmp_path / "outputs").exists()  # ranks wrote nowhere else


# SIGTERM (SLURM's preemption, `docker stop`) ended with status 0, which a scheduler reads as done
@pytest.mark.parametrize(("sent", "status"), [(signal.SIGINT, 1), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_says_which_checkpoint_to_resume_from(tmp_path, cache_dir, sent, status):
    run = [*TINY, "trainer.max_steps=100000", "hydra.run.dir=run"]
    # SIGINT as the terminal sends it; reset to the default in the child in case this process ignores it
    proc = subprocess.Popen([sys.executable, "-m", "llmfoundry_pl.train", *run], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(sent)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status and last.is_file()
    assert f"to go on from the last validation's checkpoint, run lfpl-train ckpt_path={last.resolve()}" in stderr


def test_the_resume_hint_names_only_a_checkpoint_that_is_there(tmp_path):
    # Lightning names a checkpoint before writing it: an interrupt in between named a last.ckpt that did not exist,
    # and with save_last=false "before any checkpoint was saved" hid the best one
    from types import SimpleNamespace

    from llmfoundry_pl.cli.train import _resume_hint

    best, resumed = tmp_path / "step000040.ckpt", tmp_path / "resumed.ckpt"
    best.touch()
    resumed.touch()
    saved = SimpleNamespace(last_model_path=str(tmp_path / "last.ckpt"), best_model_path=str(best), dirpath=tmp_path)
    trainer = SimpleNamespace(global_step=50, checkpoint_callback=saved)
    assert f"to go on from the best checkpoint, run lfpl-train ckpt_path={best} " in _resume_hint(trainer, None)
    # a resume into a new folder: Lightning restores the earlier run's best, which may be steps before the resumed
    saved.dirpath = tmp_path / "new_run"
    assert f"from the checkpoint it resumed from, run lfpl-train ckpt_path={resumed} " in \
        _resume_hint(trainer, str(resumed))
    saved.dirpath = tmp_path
    best.unlink()
    assert f"from the checkpoint it resumed from, run lfpl-train ckpt_path={resumed} " in \
        _resume_hint(trainer, str(resumed))
    assert "before any checkpoint was saved" in _resume_hint(SimpleNamespace(global_step=5, checkpoint_callback=None),
                                                             None)


def test_ctrl_c_at_an_interactive_prompt_ends_without_a_traceback(trained_run, tmp_path):
    # The usual way to leave lfpl-generate interactive=true printed a KeyboardInterrupt traceback
    proc = subprocess.Popen([sys.executable, "-m", "llmfoundry_pl.generate", f"ckpt_path={trained_run}/checkpoints/"
                             "last.ckpt", "interactive=true", "max_new_tokens=4", "temperature=0"], cwd=tmp_path,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdin.write("ROMEO:\n")
    proc.stdin.flush()
    assert proc.stdout.readline().startswith("ROMEO:")  # answered: now waiting for the next prompt
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr and stderr.strip().endswith("interrupted")


def test_a_diverged_job_fails_alone_and_the_sweep_goes_on(tmp_path, cache_dir):
    # A learning-rate sweep meets rates that diverge: that job stops at its first validation (in a single run, exit
    # status 2 and one line), its row reads nan, and the next job runs (before: trained on in NaN, then crashed).
    # So does a job whose settings are impossible (before: the sweep ended there, with no summary table).
    proc = run_cli("train", "-m", *TINY, "optim.lr=1e4,3e-3", "model.n_heads=2,3", "trainer.gradient_clip_val=null",
                   "hydra.sweep.dir=s", cwd=tmp_path, check=False)
    # ... and the sweep ends with a single run's exit status for them (all jobs failing exited 0); a divergence is
    # a result, not a failure
    assert proc.returncode == 2 and proc.stderr.strip().endswith("error: 2 of 4 jobs failed (job 2, 3), each with "
                                                                 "its line above")
    assert "error: training diverged: val/loss is nan at step 4; lower optim.lr (it is 10000)" in proc.stderr
    assert "error: model.dim=32 is not divisible by model.n_heads=3" in proc.stderr
    rows = [json.loads((tmp_path / "s" / job / "final_metrics.json").read_text()) for job in "0123"]
    assert [row["metrics"]["val/loss"] is None for row in rows] == [True, False, True, True]  # strict JSON: null
    assert rows[1]["metrics"]["val/loss"] < 6.3 and "not divisible" in rows[2]["error"] + rows[3]["error"]
    assert "| 0   | model.n_heads=2 optim.lr=10000.0 (diverged) | nan" in proc.stdout  # the summary table
    assert "| 2   | model.n_heads=3 optim.lr=10000.0 (failed)   | nan" in proc.stdout
    assert not (tmp_path / "s" / "0" / "checkpoints").exists()  # no NaN checkpoint


def test_an_optuna_search_goes_on_past_a_failed_trial(tmp_path, cache_dir):
    # Told a failed trial's NaN, Optuna raised: the search ended at its first failure, with no table. With
    # n_heads=5 every width it tries (128, 192, 256) fails.
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli("train", *TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "model.n_heads=5",
                   "hydra.sweep.dir=s", cwd=tmp_path, check=False)
    assert proc.stderr.count("is not divisible by model.n_heads=5") == 2 and proc.returncode == 2
    rows = list(csv.DictReader(open(tmp_path / "s" / "summary.csv")))
    assert len(rows) == 2 and all(row["val/loss"] == "nan" for row in rows)


def test_last_checkpoint_holds_the_trained_steps_and_a_run_needs_no_logger(tmp_path, cache_dir):
    # 10 steps, validations (and checkpoints) at 4 and 8: last.ckpt held step 8, so resuming trained 9-10 again.
    # With no logger, Lightning's LearningRateMonitor raised a traceback; it has nothing to write to: left out.
    # A warmup as long as the run (trainer=debug's: 50 of 20 steps) never reaches the rate, and says so.
    proc = run_cli("train", *TINY, "trainer.max_steps=10", "logger=none", "scheduler.warmup_steps=10",
                   "hydra.run.dir=run", cwd=tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {last}" in proc.stdout and torch.load(last, weights_only=False)["global_step"] == 10
    # and the best is chosen with the final weights too (the loss still falls at step 10: they are)
    assert [p.name[:10] for p in last.parent.glob("step*")] == ["step000010"]
    assert "warning: scheduler.warmup_steps=10 is not below trainer.max_steps=10" in proc.stderr
    assert not list((tmp_path / "run").glob("**/metrics.csv"))
    # A run into the same folder (as the recipes' fixed hydra.run.dir) replaces last.ckpt: Lightning wrote
    # last-v1.ckpt beside it, and a re-run recipe's next command loaded the old model.
    run_cli("train", *TINY, "trainer.max_steps=4", "logger.csv=null", "hydra.run.dir=run", cwd=tmp_path)
    assert torch.load(last, weights_only=False)["global_step"] == 4 and not list(last.parent.glob("last-v*"))


def test_checkpoints_between_validations_are_named_by_their_own_step(tmp_path, cache_dir):
    # The "step" a validation logs (its point in the CSV) stayed in the callback metrics and named the saves after
    # it: step 6's file was called step 4's and replaced it. And with a monitor that is no validation metric, the
    # save after fit's final validation (10 is no multiple of 4) ended the run in a traceback.
    every_2 = ["callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=-1"]
    run_cli("train", *TINY, "trainer.max_steps=12", *every_2, "hydra.run.dir=a", cwd=tmp_path)
    saved = {p.name[:10]: torch.load(p, weights_only=False)["global_step"]
             for p in (tmp_path / "a" / "checkpoints").glob("step*")}
    assert saved == {f"step{step:06d}": step for step in (4, 6, 8, 10, 12)}  # step 2's waits for a val/loss
    run_cli("train", *TINY, "trainer.max_steps=10", *every_2, "callbacks.model_checkpoint.monitor=train/loss",
            "hydra.run.dir=b", cwd=tmp_path)
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 10
    # without last.ckpt, the run's checkpoint is the best one (it said "none saved: no validation ran")
    proc = run_cli("train", *TINY, "trainer.max_steps=4", "callbacks.model_checkpoint.save_last=false",
                   "hydra.run.dir=c", cwd=tmp_path)
    assert f"checkpoint: {tmp_path / 'c' / 'checkpoints' / 'step000004-val_loss'}" in proc.stdout


def test_ddp_single_run_two_processes(tmp_path, cache_dir):
    proc = run_cli("train", *TINY, "trainer=ddp", "trainer.devices=2", "hydra.run.dir=ddp", cwd=tmp_path)
    assert "held-out text" in proc.stdout and "MEMBER: 2/2" in proc.stderr
    assert json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())["metrics"]["val/loss"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]


def test_torchrun_launch_recipe_on_one_node(tmp_path, cache_dir):
    """recipes/multinode/torchrun.sh with NNODES=1: torchrun owns the 2 processes, Lightning joins them (gloo)."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "multinode" / "torchrun.sh"
    env = {**os.environ, "NNODES": "1", "GPUS_PER_NODE": "2", "RUN_DIR": "run", "MASTER_PORT": "29533",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(recipe), *TINY], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr and "held-out text" in proc.stdout
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["metrics"]["val/loss"] > 0


def test_torchrun_recipe_on_several_nodes_needs_the_shared_address_and_folder(tmp_path):
    # each node dated its own run folder, and waited for the others at its own 127.0.0.1 without end
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "multinode" / "torchrun.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RUN_DIR")}
    for given, missing in [({}, "MASTER_ADDR: set MASTER_ADDR to the address of node 0"),
                           ({"MASTER_ADDR": "node0"}, "RUN_DIR: set RUN_DIR to one folder on a filesystem every node")]:
        proc = subprocess.run(["bash", str(recipe)], cwd=tmp_path, env={**env, "NNODES": "2", **given},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and missing in proc.stderr


# srun as far as recipes/multinode/slurm.sbatch needs it: start SLURM_NTASKS copies of the command, each with the
# per-task variables the real srun sets, and fail if any task fails.
FAKE_SRUN = """#!/usr/bin/env bash
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_slurm_batch_recipe_on_one_node(tmp_path, cache_dir):
    """recipes/multinode/slurm.sbatch as SLURM would run it on one node with 2 tasks (srun simulated): Lightning's
    SLURMEnvironment takes the ranks from SLURM's variables and joins the 2 processes (gloo)."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "multinode" / "slurm.sbatch"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lfpl-train", "SLURM_NNODES": "1", "SLURM_NTASKS": "2",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "localhost", "MASTER_PORT": "29534"}
    env = {**os.environ, **slurm, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                                            os.environ["PATH"]])}
    proc = subprocess.run(["bash", str(recipe), *TINY], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "SLURM auto-requeueing enabled" in output  # Lightning chose its SLURMEnvironment ...
    assert "MEMBER: 2/2" in output  # ... and the two srun tasks became one process group
    metrics = json.loads((tmp_path / "outputs" / "slurm-4242" / "final_metrics.json").read_text())["metrics"]
    assert metrics["val/loss"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_heads=3"], "error: model.dim=32 is not divisible by model.n_heads=3"),
        (["data.path=/no/such/dir"], "error: data.path=/no/such/dir does not exist"),
        (["ckpt_path=/no/such.ckpt"], "error: ckpt_path=/no/such.ckpt does not exist"),
        (["ckpt_path=broken.ckpt"], "error: ckpt_path=broken.ckpt is not a checkpoint written by lfpl-train"),
        (["ckpt_path=folder"], "error: ckpt_path=folder is a folder; give a .ckpt file"),  # it "did not exist"
        (["data.val_fraction=1"], "error: data.val_fraction=1.0 holds out all the data for validation"),
        (["data=streaming", "data.val_fraction=1"], "error: data.val_fraction=1.0 holds out all the data"),
        (["hydra.job.chdir=true"], "error: hydra.job.chdir=true is not supported"),  # relative paths broke
        (["data.path=blank.txt"], "error: the corpus has no text to train a tokenizer on, only whitespace"),
        (["data.tokenizer_path=folder"], "/folder is a folder, not a SentencePiece .model file"),
        (["trainer.max_step=3"], "error: trainer.max_step: max_step is not a setting of trainer; did you mean "
                                 "max_steps?"),  # Hydra's 7 lines said to add the key with +, which is refused
        (["model.n_layers=two"], "Value 'two' of type 'str' could not be converted to Integer"),
        (["hardware=m4pro"], "error: the trainer settings cannot run here: `MPSAccelerator` can not run"),
        (["trainer.precision=bf17"], "error: the trainer settings cannot run here: Precision 'bf17' is invalid"),
        (["trainer=fsdp"], "error: trainer=fsdp needs CUDA GPUs and this run's device is cpu: use trainer=ddp"),
        (["trainer.accumulate_grad_batches=2", "trainer.val_check_interval=3"],
         "error: trainer.val_check_interval=3 (micro-batches) is not a multiple of trainer.accumulate_grad_batches=2"),
        (["trainer.limit_train_batches=4"], "error: trainer.limit_train_batches=4 would replay the same windows"),
        (["trainer.accumulate_grad_batches=0"], "error: trainer.accumulate_grad_batches=0 must be 1 or more"),
        (["trainer.strategy=ddp_spawn", "trainer.devices=2"],
         "error: trainer.strategy=ddp_spawn runs training in child processes lfpl-train cannot report from"),
        # Hydra creates the run's folder before the command runs: its traceback, 33 lines
        (["paths.runs_dir=broken.ckpt"], "error: cannot create the run's folder broken.ckpt/"),
        # failed after the whole run (no summary written) / at the first validation, before any checkpoint
        (["sample_prompt='" + "to be or not " * 12 + "'"], "error: sample_prompt is "),
        (["callbacks.sample_text.prompt='" + "to be or not " * 12 + "'"], "error: callbacks.sample_text.prompt is "),
        pytest.param(["trainer.precision=16-true"], "error: trainer.precision=16-true needs fp16 matmuls",
                     marks=pytest.mark.skipif(cpu_has_native_fp16(), reason="this CPU multiplies fp16 natively")),
    ],
    ids=["clashing-heads", "missing-data", "missing-ckpt", "broken-ckpt", "ckpt-folder", "all-held-out",
         "all-held-out-streaming", "chdir", "blank-corpus", "tokenizer-folder", "typo", "wrong-type", "no-mps",
         "bad-precision", "fsdp-on-cpu", "checkpoints-inside-a-step", "limit-train-batches", "no-accumulation",
         "ddp-spawn", "runs-dir-a-file", "long-sample-prompt", "long-validation-sample-prompt", "fp16-on-cpu"],
)
def test_train_config_mistakes_fail_with_one_line(tmp_path, cache_dir, overrides, message):
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 cut short while copying")
    (tmp_path / "folder").mkdir()
    (tmp_path / "blank.txt").write_text(" \n\t\n  \n" * 50)
    proc = run_cli("train", *TINY, *overrides, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("eval", [], "error: ckpt_path is required"),
        # (torch's own reason said to re-save it with _use_new_zipfile_serialization=True, cut off mid-word)
        ("generate", ["ckpt_path=not_a.ckpt"], "error: ckpt_path=not_a.ckpt is not a checkpoint written by lfpl-train "
                                               "(not the zip archive torch.save writes)"),
        ("generate", ["ckpt_path=not_a.ckpt", "prompt_file=missing.txt"], "error: prompt_file=missing.txt does not"),
        ("generate", ["ckpt_path=not_a.ckpt", "prompt_file=."], "error: prompt_file=. is a folder; give a text file"),
        ("generate", ["ckpt_path=not_a.ckpt", "device=gpu"], "error: device=gpu is not a device: use auto, cpu"),
        ("generate", ["ckpt_path=not_a.ckpt", "prompt_file=blank.txt"], "error: prompt_file=blank.txt holds no prompt"),
        ("generate", ["ckpt_path=not_a.ckpt", "stop=[A,'']"], "error: stop=['A', ''] holds an empty string"),
        ("generate", ["ckpt_path=not_a.ckpt", "prompt=x", "interactive=true"],
         "error: prompt= and interactive=true both give the prompts; keep one"),
        ("generate", ["ckpt_path=not_a.ckpt", "prompt_file=blank.txt", "stream=true"],
         "error: stream=true prints one prompt's text as it comes"),
        ("generate", ["ckpt_path=not_a.ckpt", "prompt=x", "system='Be brief.'"],
         "error: system= opens a chat; without chat=true it was ignored"),
        ("generate", ["ckpt_path=not_a.ckpt", "prompt=x", "draft_ckpt_path=not_a.ckpt", "quantize=int8"],
         "error: quantize=int8 scales each call's activations as a whole"),
    ],
    ids=["eval-no-ckpt", "generate-bad-ckpt", "generate-no-prompt-file", "generate-prompt-folder",
         "generate-bad-device",
         "generate-empty-prompt-file", "generate-empty-stop-string", "generate-two-prompt-sources",
         "generate-stream-a-batch", "generate-system-without-chat", "generate-int8-with-a-draft"],
)
def test_eval_and_generate_mistakes_fail_with_one_line(tmp_path, command, args, message):
    (tmp_path / "not_a.ckpt").write_text("not a checkpoint")
    (tmp_path / "blank.txt").write_text("\n  \n")
    proc = run_cli(command, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_without_validation_trains_and_saves(tmp_path, cache_dir):
    # trainer.limit_val_batches=0 is Lightning's way to skip validation: no held-out metrics, still a checkpoint
    proc = run_cli("train", *TINY, "trainer.limit_val_batches=0", "trainer.max_steps=2", "hydra.run.dir=run",
                   cwd=tmp_path)
    assert "held-out text: not measured (trainer.limit_val_batches=0)" in proc.stdout
    assert "trained 2 steps" in proc.stdout and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())["metrics"]
    assert "val/loss" not in metrics and metrics["train_tokens_per_s"] > 0
    # nor Lightning's lines that say nothing about the run (cli.common.quiet_library_noise)
    for noise in ("💡 Tip", "LeafSpec", "is not supported by the model summary"):
        assert noise not in proc.stdout + proc.stderr


def test_ckpt_path_last_is_the_newest_last_checkpoint_and_paths_expand_home(tmp_path, monkeypatch):
    # A run that reuses a run folder (a fixed hydra.run.dir) gets Lightning's last-v1.ckpt beside the older
    # last.ckpt: `last` found only last.ckpt, so evaluating or resuming "the newest" took the older model.
    from llmfoundry_pl.cli.common import resolve_ckpt_path

    older, newer = tmp_path / "runs/a/checkpoints/last-v1.ckpt", tmp_path / "runs/b/checkpoints/last.ckpt"
    for i, path in enumerate((newer, older)):  # last-v1.ckpt written last
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    assert resolve_ckpt_path("last", runs_dir=str(tmp_path / "runs")) == str(older)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ was expanded for folders only, not for .ckpt files
    assert resolve_ckpt_path("~/runs/b/checkpoints/last.ckpt") == str(newer)


def test_ckpt_path_last_in_a_sweep_is_the_newest_run_before_it_and_follows_linked_folders(tmp_path, monkeypatch):
    from llmfoundry_pl.cli.common import resolve_ckpt_path
    from llmfoundry_pl.cli.ddp import SWEEP_DIR_ENV
    from llmfoundry_pl.cli.sweep_summary import STARTED

    runs = tmp_path / "runs"
    moved = tmp_path / "other_disk/run/checkpoints/last.ckpt"  # a run folder moved away and linked back
    earlier = runs / "multirun/x/0/checkpoints/last.ckpt"  # an earlier sweep into the same (fixed) sweep folder
    job0 = runs / "multirun/x/1/checkpoints/last.ckpt"  # this sweep's first job, done
    for i, path in enumerate((earlier, moved, job0)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + 2 * i, 1_000_000 + 2 * i))
    (runs / "2026-12-07").mkdir(parents=True)
    (runs / "2026-12-07/run").symlink_to(moved.parents[1], target_is_directory=True)
    (runs / "multirun/x" / STARTED).touch()
    os.utime(runs / "multirun/x" / STARTED, (1_000_003, 1_000_003))  # this sweep started after the linked run
    linked = str(runs / "2026-12-07/run/checkpoints/last.ckpt")
    # Outside a running sweep, its jobs count: a marker a finished sweep left changes nothing
    assert resolve_ckpt_path("last", runs_dir=str(runs)) == str(job0)
    # In the sweep (here: one of its job's DDP ranks, as their launcher tells them), each job resolved `last` to
    # the job before it, and a sweep of init_from=last chained its jobs; the earlier sweep's runs still count
    monkeypatch.setenv(SWEEP_DIR_ENV, str(runs / "multirun/x"))
    assert resolve_ckpt_path("last", runs_dir=str(runs)) == linked
    os.utime(moved, (999_000, 999_000))
    assert resolve_ckpt_path("last", runs_dir=str(runs)) == str(earlier)


def test_a_run_records_absolute_paths_that_other_folders_can_follow(tmp_path, cache_dir):
    # A relative data.path was recorded as typed: lfpl-eval of the run's held-out split from another folder read
    # that folder's data/corpus.txt, without a word; a resumed run recorded "ckpt_path: last" or a relative path
    plays = sorted(bundled_corpus_dir().glob("*.txt"))
    for project, play in (("a", plays[0]), ("b", plays[1])):
        (tmp_path / project / "data").mkdir(parents=True)
        (tmp_path / project / "data/corpus.txt").write_text(play.read_text())
    short = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.path=data/corpus.txt"]
    run_cli("train", *TINY, *short, "hydra.run.dir=run", cwd=tmp_path / "a")
    ckpt = f"ckpt_path={tmp_path / 'a/run/checkpoints/last.ckpt'}"
    here, elsewhere = (json.loads(run_cli("eval", ckpt, cwd=tmp_path / p).stdout.strip().splitlines()[-1])
                       for p in ("a", "b"))
    assert elsewhere == here
    run_cli("train", *TINY, *short, "trainer.max_steps=4", "ckpt_path=run/checkpoints/last.ckpt", "hydra.run.dir=run2",
            cwd=tmp_path / "a")
    recorded = torch.load(tmp_path / "a/run2/checkpoints/last.ckpt", weights_only=False)["hyper_parameters"]
    assert recorded["run_config"]["ckpt_path"] == str(tmp_path / "a/run/checkpoints/last.ckpt")
    assert recorded["run_config"]["data"]["path"] == str(tmp_path / "a/data/corpus.txt")


def test_help_and_cfg_job(tmp_path):
    help_text = run_cli("train", "--help", cwd=tmp_path).stdout
    assert "== Configuration groups ==" in help_text and "hardware: auto, cpu, m4pro, rtx5060" in help_text
    cfg = run_cli("eval", "--cfg", "job", "ckpt_path=x.ckpt", cwd=tmp_path).stdout
    assert "ckpt_path: x.ckpt" in cfg
    # the commands that take settings only listed lfpl-train's config groups, which fail there (model=small)
    eval_help = run_cli("eval", "--help", cwd=tmp_path).stdout
    assert "== Settings ==" in eval_help and "ckpt_path: ???" in eval_help and "Configuration groups" not in eval_help
    resolved = run_cli("train", "--cfg", "job", "--resolve", cwd=tmp_path).stdout  # was a traceback
    assert "output_dir: null" in resolved and "runs_dir: outputs" in resolved


def test_non_editable_install_finds_configs_and_corpus(tmp_path):
    """`pip install .` (a wheel, not the source tree) must ship conf/ and the bundled corpus."""
    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "site"
    # Build with the installed setuptools when there is one (fast, offline); else in pip's isolated build env.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", str(target), str(repo)],
        check=True, capture_output=True, timeout=300,
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    code = ("import llmfoundry_pl, llmfoundry_pl.data.corpus as c; print(llmfoundry_pl.__file__); "
            "print(len(list(c.bundled_corpus_dir().glob('*.txt'))))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "13"
    # every config group ships, the ones added later included (each folder must be listed in pyproject.toml)
    yaml_files = lambda conf: {p.relative_to(conf) for p in conf.rglob("*.yaml")}
    assert yaml_files(target / "llmfoundry_pl" / "conf") == yaml_files(repo / "conf")
    cfg = subprocess.run([sys.executable, "-m", "llmfoundry_pl.train", "--cfg", "job", "model=small"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "dim: 512" in cfg


def test_a_weights_only_checkpoint_is_refused_as_a_resume_naming_init_from(tmp_path):
    # (callbacks.model_checkpoint.save_weights_only=true): Lightning's KeyError traceback, 40 lines
    from llmfoundry_pl.cli.train import _resume_point
    from llmfoundry_pl.config import ConfigError

    path = tmp_path / "weights.ckpt"
    torch.save({"global_step": 4, "state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(ConfigError, match=r"weights.ckpt holds weights only .*; start from its weights with "
                                          r"init_from= instead$"):
        _resume_point(str(path))
