"""Every shipped YAML composes against its schema; mistakes fail at compose time."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from llmfoundry_pl.cli import app as app_module
from llmfoundry_pl.cli.app import (
    check_nothing_added,
    check_nothing_deleted,
    check_overrides,
    quote_non_ascii_values,
    run_hydra_app,
    user_errors,
)
from llmfoundry_pl.cli.common import (
    build_trainer,
    check_compiled_attention,
    instantiate_group,
    pick_device,
    require_compiler,
    seed_everything,
    to_dataclass,
)
from llmfoundry_pl.cli.ddp import HydraDDPStrategy, HydraFSDPStrategy, build_strategy
from llmfoundry_pl.cli.train import check_monitors
from llmfoundry_pl.config import (
    DEFAULT_CACHE_DIR,
    ChatDataConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    EvalDataConfig,
    GenerateConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    SchedulerConfig,
    ServeConfig,
    schema_from_signature,
)
from llmfoundry_pl.model import Transformer, TransformerBlock

CONF = resources.files("llmfoundry_pl.conf")
GROUPS = ["model", "data", "trainer", "optim", "scheduler", "callbacks", "logger", "paths", "hardware", "experiment"]


def group_options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))



@pytest.mark.parametrize("env", [None, "/big/disk/lfpl"])
def test_configs_built_in_python_share_the_cache_hydra_composes(compose_train, monkeypatch, env):
    """Python-built configs used to ignore $LFPL_CACHE_DIR (and fill the home folder) while lfpl-train honoured it."""
    if env is None:
        monkeypatch.delenv("LFPL_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("LFPL_CACHE_DIR", env)
    composed = compose_train([]).paths.cache_dir
    assert composed == (env or DEFAULT_CACHE_DIR)
    assert DataConfig().cache_dir == ChatDataConfig().cache_dir == EvalDataConfig().cache_dir == composed

@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_shipped_config_composes(compose_train, group, option):
    cfg = compose_train([f"{group}={option}"])
    OmegaConf.resolve(cfg.model)
    model = to_dataclass(cfg.model, ModelConfig)
    data = OmegaConf.to_object(cfg.data)
    assert isinstance(data, ChatDataConfig if option in ("sft", "preference", "dpo") else DataConfig)
    to_dataclass(cfg.optim, OptimConfig)
    to_dataclass(cfg.scheduler, SchedulerConfig)
    to_dataclass(cfg.lora, LoraConfig)
    # The vocabulary is the tokenizer's (filled in when it is known); the context is the data's windows.
    assert model.vocab_size is None and model.max_seq_len == cfg.data.seq_len
    assert cfg.trainer.max_steps > 0


@pytest.mark.parametrize(("preset", "low", "high"), [("tiny", 1e6, 8e6), ("small", 20e6, 30e6), ("base", 100e6, 140e6)])
def test_model_presets_have_the_advertised_size(compose_train, preset, low, high):
    cfg = compose_train([f"model={preset}"])
    model = dataclasses.replace(to_dataclass(cfg.model, ModelConfig), vocab_size=cfg.data.vocab_size)
    assert low < Transformer(model).num_params() < high


def test_reference_preset_is_the_shape_outside_projects_are_compared_on(compose_train):
    cfg = dataclasses.replace(to_dataclass(compose_train(["model=ref16m"]).model, ModelConfig), vocab_size=8192)
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (
        8192, 384, 6, 6, 2, 1024)
    assert 15.5e6 < Transformer(cfg).num_params() < 16e6


@pytest.mark.parametrize("hardware", [p.name.removesuffix(".yaml") for p in CONF.joinpath("hardware").iterdir()
                                      if p.name.endswith(".yaml")])
def test_every_hardware_profile_runs_every_trainer_and_experiment(compose_train, hardware):
    # rtx5060's 4-step accumulation refused trainer=debug and experiment=dpo: validations (so checkpoints) every
    # 10 and 50 micro-batches fell inside an accumulated step
    for group in ["trainer=debug", "trainer=ddp", "trainer=fsdp", "experiment=sft", "experiment=dpo",
                  "experiment=shakespeare_small", "trainer=default"]:
        trainer = compose_train([group, f"hardware={hardware}"]).trainer
        assert trainer.val_check_interval % trainer.accumulate_grad_batches == 0, (group, hardware)
    # a profile of one GPU left trainer=ddp one device (its own devices: 1, applied after the trainer group)
    assert compose_train(["trainer=ddp", f"hardware={hardware}"]).trainer.devices == 2 or hardware == "m4pro"


def test_hparams_search_composes_the_optuna_sweeper(compose_train):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_train(["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert "optim.lr" in cfg.hydra.sweeper.params
    # Bayesian, as its comment says: Optuna's 10 random start-up trials left all 8 trials random
    assert cfg.hydra.sweeper.sampler.n_startup_trials < cfg.hydra.sweeper.n_trials
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    lr = OverridesParser.create().parse_overrides([f"optim.lr={cfg.hydra.sweeper.params['optim.lr']}"])[0]
    assert type(create_optuna_distribution_from_override(lr)).__name__ == "LogUniformDistribution"


@pytest.mark.parametrize(
    ("override", "message"),
    [("trainer.max_step=3", "max_step"), ("model.n_layer=3", "n_layer"), ("model.n_layers=two", "n_layers"),
     ("callbacks.model_checkpoint.save_top=2", "save_top"), ("data.seq_len=1.5", "seq_len")],
)
def test_config_typos_and_wrong_types_fail_at_compose_time(compose_train, override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        compose_train([override])


@pytest.mark.parametrize(("name", "schema"), [("generate", GenerateConfig), ("eval", EvalConfig),
                                              ("serve", ServeConfig)])
def test_quantize_typo_fails_when_the_config_is_read(compose_train, name, schema):
    cfg = compose_train(["ckpt_path=some/model", "quantize=int3"], name=name)
    with pytest.raises(ConfigError) as error:
        to_dataclass(cfg, schema)
    assert str(error.value) == "quantize=int3 is not one of none, int8, int8_weight, int4_weight"
    valid = compose_train(["ckpt_path=some/model", "quantize=int4_weight"], name=name)
    assert to_dataclass(valid, schema).quantize == "int4_weight"



@pytest.mark.parametrize(
    ("name", "schema", "overrides", "message"),
    [("generate", GenerateConfig, ["temperature=-1"], "temperature=-1.0 must be 0 (greedy) or more"),
     ("generate", GenerateConfig, ["top_p=0"], "top_p=0.0 must be in (0, 1] (or null for no limit)"),
     ("generate", GenerateConfig, ["max_new_tokens=-1"], "max_new_tokens=-1 must be 0 or more"),
     ("generate", GenerateConfig, ["draft_tokens=0"], "draft_tokens=0 must be 1 or more"),
     ("generate", GenerateConfig, [f"seed={2**64}"],
      f"seed={2**64} is not a seed torch takes: give one from -2**63 to 2**64 - 1, or null"),
     ("eval", EvalConfig, ["data.batch_size=0"], "data.batch_size=0 must be positive"),
     ("eval", EvalConfig, ["data.stride=0"], "data.stride=0 must be positive (or null)"),
     ("eval", EvalConfig, ["task=nope"], "task=nope is not a known task; use one of demo, or task=null for loss / "
                                         "perplexity / bits per byte on text"),
     ("eval", EvalConfig, ["task=demo", "task_limit=0"],
      "task_limit=0 must be at least 1, or null for every question")],
)
def test_generate_and_eval_settings_are_checked_when_the_config_is_read(compose_train, name, schema, overrides,
                                                                         message):
    """By the schema, before a model is loaded (a sampling setting used to fail only after loading it), and for
    configs built in Python too."""
    cfg = compose_train(["ckpt_path=some/model", *overrides], name=name)
    with pytest.raises(ConfigError) as error:
        to_dataclass(cfg, schema)
    assert str(error.value) == message

def test_hardware_profiles_set_device_and_precision(compose_train):
    cpu = compose_train(["hardware=cpu"])
    assert (cpu.trainer.accelerator, cpu.compile) == ("cpu", True)  # its precision: tests/test_precision.py
    # fine-tuning batches vary in length (each new length would recompile): the experiments turn compile off
    assert not compose_train(["hardware=cpu", "experiment=sft"]).compile
    assert not compose_train(["hardware=cpu", "experiment=dpo"]).compile
    gpu = compose_train(["hardware=rtx5060"])
    assert (gpu.trainer.accelerator, gpu.trainer.precision) == ("gpu", "bf16-mixed")
    assert compose_train(["hardware=m4pro"]).trainer.accelerator == "mps"


def test_a_seed_numpy_cannot_take_is_one_line(monkeypatch):
    import lightning

    seeded = []  # (not Lightning's own: it would set the worker's global seed and PL_GLOBAL_SEED for later tests)
    monkeypatch.setattr(lightning, "seed_everything", lambda seed, workers: seeded.append(seed))
    with pytest.raises(ConfigError, match="^seed=-1 must be between 0 and 4294967295"):
        seed_everything(-1)
    seed_everything(2**32 - 1)  # the largest numpy takes
    assert seeded == [2**32 - 1]


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # two GPUs, no Apple GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("cuda:1") == torch.device("cuda", 1) and pick_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"^device=cuda:2, but this machine has 2 CUDA device\(s\): use device=auto "
                                          r"\(here: cuda\)"):
        pick_device("cuda:2")
    with pytest.raises(ConfigError, match="^accelerator=mps, but this machine has no MPS device"):
        pick_device("mps", key="accelerator")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device=cuda, but this machine has no CUDA device: use device=auto \(here: "
                                          r"cpu\)"):
        pick_device("cuda")


@pytest.mark.parametrize(
    ("override", "message"),
    [("trainer.log_every_n_steps=0", "^trainer.log_every_n_steps=0 must be 1 or more$"),  # Lightning divides by them
     ("trainer.val_check_interval=0", "^trainer.val_check_interval=0 must be positive"),
     ("trainer.val_check_interval=0.5", "^trainer.val_check_interval=0.5 is a fraction of an epoch, .*(an int)"),
     ("trainer.gradient_clip_val=-1", r"^trainer.gradient_clip_val=-1 must be 0 or more"),  # would flip the gradients
     ("trainer.gradient_clip_val=nan", r"^trainer.gradient_clip_val=nan must be 0 or more"),  # trained in NaN
     ("callbacks.model_checkpoint.save_top_k=-5", "^callbacks.model_checkpoint: Invalid value for save_top_k=-5")],
)
def test_trainer_and_callback_settings_lightning_cannot_use_are_one_line(compose_train, tmp_path, override, message):
    cfg = compose_train(["hardware=cpu", f"paths.output_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=message):
        build_trainer(cfg.trainer, instantiate_group(cfg.callbacks, "callbacks"), [])


@pytest.mark.parametrize("max_steps", [0, -1])
def test_a_run_of_no_steps_is_refused_before_anything_is_built(compose_train, tmp_path, max_steps, monkeypatch):
    # It was refused once the data loader was asked for: after the corpus, the model summary, the CPU's peak
    # measurement and the run folder's csv/hparams.yaml
    from llmfoundry_pl.cli import train as train_cli

    monkeypatch.setattr(train_cli, "prepare_data_and_model", lambda cfg: pytest.fail("built the data first"))
    cfg = compose_train(["hardware=cpu", f"paths.output_dir={tmp_path}", f"trainer.max_steps={max_steps}"])
    with pytest.raises(ConfigError, match=f"^trainer.max_steps={max_steps} must be a positive number of optimizer"):
        train_cli.train(cfg)


def test_runs_dir_under_home_is_the_home_folder(compose_train, tmp_path, monkeypatch):
    # Hydra made the run folder from paths.runs_dir as written: '~/runs' became a folder named ~ in the current one
    monkeypatch.setenv("HOME", str(tmp_path))
    hydra = compose_train(["paths.runs_dir='~/runs'"], return_hydra_config=True).hydra
    assert Path(hydra.run.dir).parents[1] == Path(hydra.sweep.dir).parents[2] == tmp_path / "runs"


def test_runs_started_in_the_same_second_get_their_own_folders(compose_train):
    # Two lfpl-train started at once (a shell loop with &) shared one folder to the second: one last.ckpt held the
    # other's weights, and their metrics.csv rows mixed
    first, second = (compose_train(return_hydra_config=True).hydra for _ in range(2))
    assert first.run.dir != second.run.dir and first.sweep.dir != second.sweep.dir
    assert Path(first.run.dir).parent == Path(second.run.dir).parent  # outputs/<date>/


@pytest.mark.parametrize(("overrides", "checkpoints", "bar"), [
    ([], True, True),
    (["callbacks=none"], False, False),  # not Lightning's own checkpoint callback and progress bar in their place
    (["callbacks.progress_bar=null"], True, False),
    (["callbacks.model_checkpoint=null", "trainer.enable_checkpointing=true"], True, True),  # as asked
    (["~callbacks"], False, False),  # deleted: as callbacks=none (lfpl-train's monitor check was a traceback)
])
def test_a_callback_set_to_null_is_off(compose_train, tmp_path, overrides, checkpoints, bar):
    cfg = compose_train(["hardware=cpu", f"paths.output_dir={tmp_path}", *overrides])
    check_monitors(cfg.callbacks, ["val/loss"])
    trainer = build_trainer(cfg.trainer, instantiate_group(cfg.callbacks, "callbacks"), [])
    assert (trainer.checkpoint_callback is not None) == checkpoints
    assert (trainer.progress_bar_callback is not None) == bar


def test_a_job_after_a_deterministic_one_runs_as_a_fresh_process_would(compose_train, tmp_path):
    # hardware=cpu sets trainer.deterministic=true; Lightning leaves torch's switch alone for null, so the next job of
    # a sweep (say hardware=auto on a GPU) inherited deterministic kernels, slower or refused for some ops.
    try:
        build_trainer(compose_train(["hardware=cpu", f"paths.output_dir={tmp_path}"]).trainer, [], [])
        assert torch.are_deterministic_algorithms_enabled()
        build_trainer(compose_train(["hardware=cpu", "trainer.deterministic=null", f"paths.output_dir={tmp_path}"]
                                    ).trainer, [], [])
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.63 GiB of which 1.10 GiB "
            "is free. Including non-PyTorch memory, this process has 6.52 GiB memory in use. See documentation for "
            "Memory Management")


@pytest.mark.parametrize(("error", "line"), [
    (torch.OutOfMemoryError(CUDA_OOM), "error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
                                       "has a total capacity of 7.63 GiB of which 1.10 GiB is free — the 'Out of "
                                       "memory' section"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 30000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "error: out of memory: the CPU could not allocate 30.0 GB more — "),
])
def test_running_out_of_memory_is_one_line_naming_what_to_lower(capsys, monkeypatch, error, line):
    with pytest.raises(SystemExit) as exit_, user_errors():
        raise error
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith(line) and err.count("\n") == 1 and "lfpl-plan" in err
    with pytest.raises(RuntimeError, match="a bug"), user_errors():  # any other RuntimeError keeps its traceback
        raise RuntimeError("a bug")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # and Hydra's switch for whole tracebacks shows this one's too
    with pytest.raises(type(error)), user_errors():
        raise error


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_runs_out_of_disk_is_one_line(tmp_path, capsys):
    # A full disk (here: a file-size limit, as `ulimit -f` sets, which fails writes the same way) ended lfpl-train's
    # checkpoint, the token cache and lfpl-export in a traceback; each writer says it its own way.
    import resource

    import numpy as np
    from safetensors.torch import save_file

    writes = {"torch.save": lambda path: torch.save(torch.zeros(100_000), path),
              "numpy": lambda path: np.zeros(100_000, np.uint16).tofile(path),
              "safetensors": lambda path: save_file({"w": torch.zeros(100_000)}, str(path)),
              "open": lambda path: path.write_bytes(bytes(200_000))}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for name, write in writes.items():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))  # Python ignores SIGXFSZ: the write fails
        try:
            with pytest.raises(SystemExit) as exit_, user_errors():
                write(tmp_path / name)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith("error: out of disk space: ") and err.count("\n") == 1, name
        assert "free some, or write elsewhere" in err


def test_hydra_full_error_shows_the_traceback_behind_a_one_line_error(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_, user_errors():
        raise ConfigError("data.path=x does not exist")
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: data.path=x does not exist\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # Hydra's switch showed its own errors' tracebacks, not ours
    with pytest.raises(ConfigError, match="data.path=x"), user_errors():
        raise ConfigError("data.path=x does not exist")


def test_deleting_a_setting_with_a_tilde_is_one_line_naming_it(compose_train, monkeypatch, capsys):
    # ~lora deleted the key, ~trainer the group's option: the run failed later in OmegaConf's traceback
    from hydra.core.hydra_config import HydraConfig

    for override in ("~lora", "~seed", "~trainer"):
        cfg = compose_train([override], return_hydra_config=True)
        monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)
        with pytest.raises(SystemExit) as exit_, user_errors(cfg):
            raise AssertionError("the check runs first")
        assert exit_.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {override} deleted {override[1:]}, which this command")
    for override in ("~logger", "~callbacks"):  # deletions that leave a working run (no logger, no callbacks)
        cfg = compose_train([override], return_hydra_config=True)
        monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)
        check_nothing_deleted(cfg)
    # ~paths: an interpolation to the value it deleted
    with pytest.raises(SystemExit) as exit_, user_errors():
        _ = OmegaConf.create({"trainer": {"default_root_dir": "${paths.output_dir}"}, "paths": {"output_dir": "???"}}
                             ).trainer.default_root_dir
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        "error: trainer.default_root_dir needs paths.output_dir, which is missing; give it on the command line "
        "(paths.output_dir=...)\n")


def test_adding_a_key_the_schema_lacks_is_one_line_naming_the_setting(compose_train, monkeypatch, capsys):
    # Hydra answers a misspelt key "to append to your config use +key=value"; appended, it was ignored without a
    # word (+model.n_layer=1 trained the preset's layers)
    from hydra.core.hydra_config import HydraConfig

    for override, line in [("+model.n_layer=1", "+model.n_layer: n_layer is not a setting of model, so it would be "
                                                "ignored; did you mean n_layers?"),
                           ("+sample_token=5", "+sample_token: sample_token is not a setting of the config"),
                           ("+callbacks.model_checkpoint.monitr=x", "+callbacks.model_checkpoint.monitr: monitr is "
                                                                     "not a setting of callbacks.model_checkpoint")]:
        cfg = compose_train([override], return_hydra_config=True)
        monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)
        with pytest.raises(SystemExit) as exit_, user_errors(cfg):
            raise AssertionError("the check runs first")
        assert exit_.value.code == 2 and capsys.readouterr().err.startswith(f"error: {line}")
    # a new callback (or logger) is built from its _target_: adding one is what + is for
    cfg = compose_train(["+callbacks.my_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor"],
                        return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)
    check_nothing_added(cfg)


def test_a_negative_sample_length_is_refused(compose_train):
    from llmfoundry_pl.cli.train import _check_sample_prompts

    with pytest.raises(ConfigError, match=r"sample_tokens=-7 must be 0 \(no sample\) or more"):
        _check_sample_prompts(compose_train(["sample_tokens=-7"]), [], None, 64)


def test_a_sample_prompt_that_is_not_text_is_named_as_set(compose_train):
    from llmfoundry_pl.callbacks import SampleTextCallback
    from llmfoundry_pl.cli.train import _check_sample_prompts

    cfg = compose_train(["sample_tokens=4"])
    cfg.sample_prompt = "ROMEO\udcff"  # a Latin-1 byte typed in a UTF-8 terminal, in Python's stand-in
    with pytest.raises(ConfigError, match=r"^sample_prompt: character 6 is byte 0xff, which is not UTF-8 text"):
        _check_sample_prompts(cfg, [], None, 64)
    cfg.sample_tokens = 0  # no sample at the end: the callback's prompt is the one checked
    with pytest.raises(ConfigError, match=r"^callbacks.sample_text.prompt: character 1 is U\+D83D"):
        _check_sample_prompts(cfg, [SampleTextCallback(prompt="\ud83d", max_new_tokens=4)], None, 64)


def test_non_ascii_values_are_quoted_for_hydras_grammar(compose_train):
    # Hydra reads unquoted values in ASCII only: prompt=你好, data.path=/data/语料.txt, even sample_prompt=é ended
    # in its lexer's error (LexerNoViableAltException), for a project whose first audience writes Chinese
    typed = ["sample_prompt=你好", "data.path=/tmp/语料 a/a.txt", "optim.lr=3e-4", "-m", "--config-dir", "配置",
             "sample_prompt=你好,再见", 'sample_prompt="你好"', "stop=[\"。\"]", "+x=${a}é"]
    assert quote_non_ascii_values(typed) == [
        "sample_prompt='你好'", "data.path='/tmp/语料 a/a.txt'", *typed[2:]]  # Hydra's grammar left to Hydra
    cfg = compose_train(quote_non_ascii_values(typed[:3]))
    assert (cfg.sample_prompt, cfg.data.path, cfg.optim.lr) == ("你好", "/tmp/语料 a/a.txt", 3e-4)
    with pytest.raises(Exception, match="LexerNoViableAltException"):  # as typed, without the quotes
        compose_train(typed[:1])
    # A prompt is free text: "don't" was Hydra's lexer error, "Hello, world" its "Ambiguous value" (outside a sweep)
    prompts = ["don't", "ROMEO: what, ho! (enter)", "a=b", 'both \' and " and \\', "你好,再见"]
    for prompt in prompts:
        assert compose_train(quote_non_ascii_values([f"sample_prompt={prompt}"])).sample_prompt == prompt


def test_a_reader_that_leaves_early_ends_the_command_quietly(monkeypatch, capfd):
    # `lfpl-train --help | head`: Python's BrokenPipeError traceback, after the lines the reader wanted
    monkeypatch.setattr(sys, "argv", ["lfpl-train", "sample_prompt=你好"])
    seen = []

    def app():
        seen.append(sys.argv[1])
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(SystemExit) as exit_:
        run_hydra_app(app, "train")
    assert exit_.value.code == 1 and seen == ["sample_prompt='你好'"] and capfd.readouterr().err == ""


def test_ctrl_c_while_a_command_starts_is_one_word(monkeypatch, capfd):
    # A console script imports its main's module first: the commands' main lived beside torch and Lightning, and
    # Ctrl-C in the ~5 s of their imports printed a traceback. Their module imports neither now, and Ctrl-C before
    # the task (importing Lightning's schemas, composing) is "interrupted" as during it.
    code = "import sys, llmfoundry_pl.cli.commands; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(app_module, "register_configs", interrupted)
    with pytest.raises(SystemExit) as exit_:
        run_hydra_app(lambda: None, "train")
    assert exit_.value.code == 130 and capfd.readouterr().err == "interrupted\n"


def test_a_setting_inside_a_callback_that_is_off_is_one_line(compose_train):
    # OmegaConf cannot fill a member that is null: callbacks.early_stopping.patience=5 (off by default) was a 23-line
    # traceback, "AssertionError: Unexpected type for root: NoneType"
    with pytest.raises(ConfigError, match=r"callbacks.early_stopping.patience: callbacks.early_stopping is off \(null"
                                          r"\) in this config, .*; callbacks=early_stopping turns it on"):
        check_overrides("train", ["model=tiny", "callbacks.early_stopping.patience=5"])
    with pytest.raises(ConfigError, match=r"callbacks.sample_text: .* \(an experiment= may turn it off\)"):
        check_overrides("train", ["experiment=sft", "callbacks.sample_text={prompt: hi}"])
    with pytest.raises(ConfigError, match="logger.tensorboard.name: .*; logger=tensorboard turns it on"):
        check_overrides("train", ["logger.tensorboard.name=x"])
    # on: taken, a sweep over it too
    check_overrides("train", ["callbacks=early_stopping", "callbacks.early_stopping.patience=5,9"])
    check_overrides("train", ["optim.lr=1e-3,3e-3", "callbacks.sample_text.prompt=ROMEO:"])
    compose_train(["callbacks=early_stopping", "callbacks.early_stopping.patience=5"])  # the global state is kept


def test_a_misspelt_setting_is_one_line_naming_the_likely_one(compose_train):
    # Hydra's 7-line answer told to add the key with +, which check_nothing_added refuses in turn
    with pytest.raises(ConfigError, match=r"^model.n_layer: n_layer is not a setting of model; did you mean "
                                          r"n_layers\?$"):
        check_overrides("train", ["model=tiny", "model.n_layer=2"])
    with pytest.raises(ConfigError, match=r"^trainer.max_step: .* of trainer; did you mean max_steps\?"):
        check_overrides("train", ["trainer.max_step=10,20", "-m"])
    with pytest.raises(ConfigError, match=r"^data.overlng: .* of data; did you mean overlong\?"):
        check_overrides("train", ["data=sft", "data.overlng=drop"])  # a key of the chosen data config only
    with pytest.raises(ConfigError, match=r"^optim.zzz: zzz is not a setting of optim; --help lists the settings"):
        check_overrides("train", ["optim.zzz=1"])
    # a top-level one, with the setting of that name one level down (Hydra's lines also said to add it with +)
    with pytest.raises(ConfigError, match=r"^precision: .* of the config; did you mean trainer.precision\?$"):
        check_overrides("train", ["precision=bf16-mixed", "seed=3", "model=small"])
    with pytest.raises(ConfigError, match=r"^device: device is not a setting of the config; --help lists the"):
        check_overrides("eval", ["ckpt_path=x", "device=cpu"])
    with pytest.raises(ConfigError, match=r"^data.vocab_size: .* of data; --help lists the settings$"):
        check_overrides("eval", ["data.vocab_size=8192"])  # "did you mean batch_size?" (difflib's 0.7) misled
    check_overrides("plan", ["callbacks.early_stopping.patience=5"])  # lfpl-plan has none: Hydra's line, no TypeError
    # left to Hydra: a setting of one of the swept choices, the user's own config, a new callback's argument
    check_overrides("train", ["-m", "data=text,sft", "data.overlng=drop"])
    check_overrides("train", ["--config-dir", "mine", "model.n_layer=2"])
    check_overrides("train", ["+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
                              "callbacks.lr.logging_interval=step"])
    check_overrides("train", ["model.n_layers=2", "hydra.run.dir=out", "data=sft", "data.overlong=drop"])


def test_schema_from_signature_keeps_names_defaults_and_plain_types():
    class Thing:
        def __init__(self, steps: int = 3, name: str | None = None, mode: int | str = "a", **kwargs) -> None:
            pass

    schema = OmegaConf.structured(schema_from_signature(Thing))
    assert schema._target_.endswith("Thing") and schema.steps == 3 and schema.name is None and schema.mode == "a"
    with pytest.raises(Exception, match="steps"):
        schema.steps = "many"
    schema.mode = 5  # a union stays untyped


def test_build_strategy_picks_hydra_aware_ddp_and_fsdp(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    assert isinstance(build_strategy("ddp", 2, TransformerBlock), HydraDDPStrategy)
    assert isinstance(build_strategy("auto", 2, TransformerBlock), HydraDDPStrategy)
    assert build_strategy("auto", 1, TransformerBlock) == "auto"
    fsdp = build_strategy("fsdp", 2, TransformerBlock)
    assert isinstance(fsdp, HydraFSDPStrategy) and fsdp._state_dict_type == "full"
    assert TransformerBlock in fsdp.kwargs["auto_wrap_policy"]._module_classes


def test_compile_without_a_cpp_compiler_is_one_line():
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    require_compiler(torch.device("cpu"))  # this machine has one (Inductor's own search)
    # Inductor's own patch(): monkeypatch's undo would delete the setting from Inductor's config module.
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++")}):
        with pytest.raises(ConfigError, match="compile=true on a CPU needs a C\\+\\+ compiler.*compile=false"):
            require_compiler(torch.device("cpu"))
        require_compiler(torch.device("cuda"))  # GPU kernels come from Triton, not a C++ compiler
    cpp_compiler_search.cache_clear()
    require_compiler(torch.device("cpu"))  # the real compiler is found again


def test_compiled_math_attention_in_bf16_on_a_cpu_is_refused():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="model.attention=math with compile=true in bf16 on a CPU.*attention=auto"):
        check_compiled_attention("math", cpu, "bf16-mixed")
    for attention, device, precision in [("auto", cpu, "bf16-mixed"), ("sdpa", cpu, "bf16-true"),
                                         ("math", cpu, "32-true"), ("math", torch.device("cuda"), "bf16-mixed")]:
        check_compiled_attention(attention, device, precision)  # the Inductor CPU kernel in question is not used


def test_the_schemas_import_without_torch():
    """As config.py's docstring says: torch and Lightning are imported by register_configs, not with the schemas
    (the hardware probes that ask torch live in llmfoundry_pl.precision)."""
    code = "import sys, llmfoundry_pl.config; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(("overrides", "message"), [
    (["callbacks.model_checkpoint.monitor=val/los"], "callbacks.model_checkpoint.monitor=val/los is not a metric "
                                                     "this run validates; use one of val/loss, val/ppl, val/bpb"),
    (["callbacks=early_stopping", "callbacks.early_stopping.monitor=val/acc"], "callbacks.early_stopping.monitor="),
])
def test_a_monitor_naming_no_validated_metric_is_refused_before_training(compose_train, overrides, message):
    # Lightning said so at the first validation, hours in, in a 47-line traceback, and nothing was saved
    from llmfoundry_pl.metrics import LanguageModelMetrics, PreferenceMetrics

    validated = [f"val/{name}" for name in LanguageModelMetrics.NAMES]
    check_monitors(compose_train(["callbacks=early_stopping"]).callbacks, validated)  # val/loss: the defaults pass
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_monitors(compose_train(overrides).callbacks, validated)
    for metrics in (LanguageModelMetrics(), PreferenceMetrics()):  # the names are what is logged
        assert tuple(metrics.compute()) == metrics.NAMES

