"""What the commands share once their config is composed: config conversion, data, model and checkpoint lookup,
the trainer, and a sweep job that fails alone (how a command starts and ends is in :mod:`llmfoundry_pl.cli.app`)."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from llmfoundry_pl.checkpoint_io import AtomicCheckpointIO
from llmfoundry_pl.cli.app import out_of_memory
from llmfoundry_pl.cli.ddp import build_strategy, running_sweep_dir
from llmfoundry_pl.cli.sweep_summary import STARTED as SWEEP_STARTED
from llmfoundry_pl.cli.sweep_summary import write_final_metrics
from llmfoundry_pl.config import (
    ChatDataConfig,
    ConfigError,
    ModelConfig,
    StreamingDataConfig,
    one_line,
)
from llmfoundry_pl.data import ChatDataModule, StreamingDataModule, TextDataModule
from llmfoundry_pl.interop import ModelSource, load_folder
from llmfoundry_pl.lit_module import LitDPO, LitLlama, TrainingDiverged
from llmfoundry_pl.lora import has_lora, merge_lora
from llmfoundry_pl.model import Transformer, TransformerBlock
from llmfoundry_pl.precision import check_fp16_on_cpu
from llmfoundry_pl.tokenizer import Tokenizer

T = TypeVar("T")


def fail_sweep_job_alone(error: BaseException, output_dir: str | os.PathLike, metrics: dict[str, float]) -> bool:
    """End a sweep's job that failed on the user's side as that job's result, not the sweep's end: a rate that
    diverged, settings one job's values make impossible (n_heads=3 with dim=32), a batch too large for the device.
    Prints its one line, records ``metrics`` and the error for the sweep's table, and returns True: the caller
    returns and the next job runs. False outside a multirun, or for any other error: the caller raises it."""
    what = str(error) if isinstance(error, ConfigError) else out_of_memory(error)
    if what is None or not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    print(f"error: {what}", file=sys.stderr, flush=True)
    key = "diverged" if isinstance(error, TrainingDiverged) else "error"
    write_final_metrics(Path(output_dir), metrics, **{key: what})
    return True


def seed_everything(seed: int, workers: bool = False) -> None:
    """Lightning's ``seed_everything``; a seed numpy cannot take (it seeds numpy too) is one line, not its
    ValueError."""
    if not 0 <= seed <= 2**32 - 1:
        raise ConfigError(f"seed={seed} must be between 0 and {2**32 - 1} (the seeds numpy takes)")
    L.seed_everything(seed, workers=workers)


def pick_device(name: str, key: str = "device") -> torch.device:
    """The device called ``name``; for ``auto`` the best this machine has: CUDA, else MPS, else the CPU. A name
    that is no device, or a device this machine lacks, is a one-line error naming the setting ``key``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name} is not a device: use auto, cpu, cuda (or cuda:N) or mps") from None
    # Checked here: torch's own error comes at the first tensor moved there, as an assertion with a traceback.
    count = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}.get(device.type, 1)
    if (device.index or 0) >= count:
        has = f"{count} CUDA device(s)" if device.type == "cuda" and count else f"no {device.type.upper()} device"
        raise ConfigError(f"{key}={name}, but this machine has {has}: use {key}=auto (here: "
                          f"{pick_device('auto').type}) or name a device it has")
    return device


def build_trainer(trainer_cfg: DictConfig, callbacks: list, loggers: list, **overrides: Any) -> L.Trainer:
    """The Lightning Trainer of ``trainer.*`` (``overrides``: Trainer arguments that replace those settings), with a
    Hydra-aware DDP/FSDP strategy; settings this machine cannot run (``accelerator=gpu`` without a GPU, an unknown
    precision, FSDP without CUDA, fp16 on a CPU without fp16 instructions) become one line naming the problem instead
    of a traceback."""
    _check_trainer_settings(trainer_cfg)
    strategy = build_strategy(trainer_cfg.strategy, trainer_cfg.devices, block_class=TransformerBlock)
    try:
        # deterministic=null is "leave torch's switch alone", so a sweep job after one with hardware=cpu (true)
        # inherited deterministic kernels; False is what a fresh process has.
        unset = {"deterministic": False} if trainer_cfg.get("deterministic") is None else {}
        trainer = instantiate(trainer_cfg, strategy=strategy, callbacks=callbacks, logger=loggers or False,
                              plugins=[AtomicCheckpointIO()],
                              **{**unset, **_unless_given(trainer_cfg, callbacks), **overrides})
    except InstantiationException as e:
        raise ConfigError(
            f"the trainer settings cannot run here: {_reason(e)} — fix trainer.*, or pick the hardware= profile of "
            "this machine (hardware=auto finds it)"
        ) from None
    # Lightning accepts FSDP on any accelerator, and PyTorch's FSDP refuses anything but a GPU only once the ranks
    # have started ("FSDP needs a non-CPU accelerator device"), with a traceback from each. PyTorch's FSDP itself can
    # run on CPU ranks over gloo (given device_id=cpu, as tests/test_loss.py does), but Lightning passes no device
    # there, and the full state dict its checkpoints gather (offload_to_cpu=True) segfaults on CPU ranks (torch
    # 2.13, tried 2026-12-06): running it here would mean overriding both in Lightning's FSDPStrategy.
    device = trainer.strategy.root_device
    if isinstance(trainer.strategy, FSDPStrategy) and device.type != "cuda":
        raise ConfigError(f"trainer=fsdp needs CUDA GPUs and this run's device is {device.type}: use trainer=ddp to "
                          "train in several processes here, or run on a machine with GPUs (hardware=auto)")
    check_fp16_on_cpu(device.type, trainer.precision, "trainer.precision")
    return trainer


def _unless_given(trainer_cfg: DictConfig, callbacks: list) -> dict[str, bool]:
    """``enable_checkpointing`` and ``enable_progress_bar`` where ``trainer.*`` leaves them unset: on when the callbacks
    hold a checkpoint callback / a progress bar. So ``callbacks.model_checkpoint=null`` (or ``callbacks=none``) saves
    nothing and ``callbacks.progress_bar=null`` shows no bar: left to itself, Lightning puts its own default in the
    empty place (a ModelCheckpoint that saves under the logger's folder at the end of the epoch, a Rich or tqdm bar)."""
    wanted = {"enable_checkpointing": ModelCheckpoint, "enable_progress_bar": ProgressBar}
    return {key: any(isinstance(c, kind) for c in callbacks) for key, kind in wanted.items()
            if trainer_cfg.get(key) is None}


def _check_trainer_settings(trainer_cfg: DictConfig) -> None:
    """Values Lightning's Trainer takes but cannot use: it divides by the first two at the first step
    (ZeroDivisionError), and a negative clipping norm multiplies every gradient by a negative number, silently
    turning descent into ascent."""
    if trainer_cfg.get("log_every_n_steps") is not None and trainer_cfg.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={trainer_cfg.log_every_n_steps} must be 1 or more")
    interval = trainer_cfg.get("val_check_interval")
    if isinstance(interval, (int, float)) and interval <= 0:
        raise ConfigError(f"trainer.val_check_interval={interval} must be positive: a number of training batches; "
                          "to skip validation, trainer.limit_val_batches=0")
    if isinstance(interval, float) and trainer_cfg.get("check_val_every_n_epoch") is None:
        # Lightning reads a float as a fraction of an epoch, and refuses one where runs count steps, not epochs
        raise ConfigError(f"trainer.val_check_interval={interval} is a fraction of an epoch, and runs here count "
                          "steps: give a number of training batches (an int), e.g. trainer.val_check_interval=100")
    clip = trainer_cfg.get("gradient_clip_val")
    if clip is not None and not clip >= 0:  # `not` also refuses NaN (inf is "no clipping", as 0 is)
        raise ConfigError(f"trainer.gradient_clip_val={clip} must be 0 or more (null or 0: no clipping)")


def instantiate_group(group: DictConfig | None, name: str) -> list[Any]:
    """The objects a config group such as ``callbacks`` or ``logger`` lists (entries set to null left out); a
    setting its class refuses is one line naming the entry, not Hydra's four."""
    built = []
    for key, node in (group or {}).items():
        if node is None:
            continue
        try:
            built.append(instantiate(node))
        except InstantiationException as e:
            raise ConfigError(f"{name}.{key}: {_reason(e)}") from None
    return built


def _reason(error: InstantiationException) -> str:
    """What the class said (the exception Hydra wraps), on one line."""
    return one_line(error.__cause__ or error, None)


def require_compiler(device: torch.device) -> None:
    """compile=true on a CPU has torch.compile (Inductor) build C++ kernels: without a C++ compiler, say so in one
    line before anything runs, not in Inductor's traceback at the first step. Asks Inductor's own compiler search
    (it honours $CXX), so the answer is the one the compilation would get."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ConfigError(
            "compile=true on a CPU needs a C++ compiler for torch.compile's kernels and none was found: install one "
            "(Debian/Ubuntu: apt install g++; macOS: xcode-select --install) or set CXX, or run with compile=false"
        ) from None


def check_compiled_attention(attention: str, device: torch.device, precision: str) -> None:
    """A one-line refusal of ``model.attention=math`` in a compiled bf16 training step on a CPU: torch 2.13's Inductor
    compiles its backward wrong there (NaN gradients whenever head_dim is a multiple of 32; see
    model.attention_kernel, whose "auto" takes SDPA under compile for this reason)."""
    if attention == "math" and device.type == "cpu" and precision.startswith("bf16"):
        raise ConfigError("model.attention=math with compile=true in bf16 on a CPU trains on NaN gradients (torch's "
                          "Inductor compiles its backward wrong); use model.attention=auto or compile=false")


def compile_training_step(lit: LitLlama, trainer: L.Trainer) -> None:
    """``compile=true`` in lfpl-train and lfpl-bench: refused in one line where it cannot work here
    (:func:`require_compiler`, :func:`check_compiled_attention`), then :meth:`LitLlama.compile_training`."""
    device = trainer.strategy.root_device
    require_compiler(device)
    check_compiled_attention(lit.model.config.attention, device, str(trainer.precision))
    lit.compile_training()


def prepare_data_and_model(cfg: DictConfig) -> tuple[TextDataModule | ChatDataModule, ModelConfig, Transformer | None]:
    """The prepared data module, the model config and, with ``init_from``, the starting network of a training
    config (lfpl-train, lfpl-bench).

    Data first: the model's vocabulary is the tokenizer's — trained on the data for pretraining from scratch, the
    starting model's own with ``init_from`` (fine-tuning, or continued pretraining on new text). (Lightning calls
    prepare_data again in fit; by then it only reads the cache.)"""
    data_cfg = OmegaConf.to_object(cfg.data)
    if data_cfg.val_fraction >= 1:  # before any tokenizing (chat data's schema keeps it below 1)
        raise ConfigError(f"data.val_fraction={data_cfg.val_fraction} holds out all the data for validation and leaves "
                          "none to train on; lower it (0.05 is the default)")
    source = load_model(cfg.init_from, key="init_from") if cfg.get("init_from") else None
    tokenizer = source[1] if source else None
    if isinstance(data_cfg, ChatDataConfig):
        if tokenizer is None:
            raise ConfigError(f"data={data_cfg.format} fine-tunes a model: give the one to start from with init_from=")
        datamodule = ChatDataModule(data_cfg, tokenizer)
    elif isinstance(data_cfg, StreamingDataConfig):
        datamodule = StreamingDataModule(data_cfg, tokenizer=tokenizer)
    else:
        datamodule = TextDataModule(data_cfg, tokenizer=tokenizer)
    datamodule.prepare_data()
    model_cfg = to_dataclass(cfg.model, ModelConfig)
    vocab_size = datamodule.tokenizer.vocab_size
    if model_cfg.vocab_size not in (None, vocab_size):
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} but the tokenizer has {vocab_size} tokens; "
                          "leave model.vocab_size=null (the tokenizer's)")
    model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    check_seq_len(data_cfg.seq_len, model_cfg)
    network = init_network(source[0], model_cfg, cfg.init_from) if source else None
    return datamodule, model_cfg, network


# Fields that decide what a network computes; max_seq_len only sizes the RoPE tables, so a fine-tune may change it.
ARCHITECTURE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "norm_eps", "rope_theta",
                "tie_embeddings")


def check_seq_len(seq_len: int, model_cfg: ModelConfig) -> None:
    """Training windows longer than the model's positions cannot run (lfpl-train, and lfpl-plan, which plans them)."""
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}; lower "
                          "data.seq_len, or raise model.max_seq_len with it")


def init_network(source: Transformer, model_cfg: ModelConfig, init_from: str) -> Transformer:
    """A network of shape ``model_cfg`` holding ``source``'s weights; a one-line error if the shapes differ."""
    differ = [f for f in ARCHITECTURE if getattr(source.config, f) != getattr(model_cfg, f)]
    if differ:
        fix = " ".join(f"model.{f}={getattr(source.config, f)}" for f in differ)
        raise ConfigError(
            f"init_from={init_from} is a different model from model=: "
            + ", ".join(f"{f} {getattr(source.config, f)} vs {getattr(model_cfg, f)}" for f in differ)
            + f"; pick the preset it was trained with, or override: {fix}"
        )
    network = Transformer(model_cfg)
    network.load_state_dict(source.state_dict())
    return network


def to_dataclass(node: DictConfig, cls: type[T]) -> T:
    """A structured config node as its dataclass (runs ``__post_init__`` checks)."""
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, cls), f"expected {cls.__name__}, got {type(obj).__name__}"
    return obj


def load_model(ckpt_path: str | None, key: str = "ckpt_path") -> tuple[Transformer, Tokenizer, ModelSource]:
    """The model (on the CPU), its tokenizer and where they came from, for any of the forms a user may hold: a
    checkpoint written by ``lfpl-train`` (or ``last``), a folder written by ``lfpl-export`` (either format), or a
    Hugging Face Llama folder. Folders are told apart by their config.json. ``key`` names the setting in errors."""
    if ckpt_path not in (None, "last"):
        path = Path(ckpt_path).expanduser()
        if path.is_file() and (path.name == "config.json" or path.suffix == ".safetensors"):
            path = path.parent  # a file inside a model folder: the folder is meant
        if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"{key}={ckpt_path} is a training run's folder; give its checkpoint: "
                              f"{key}={Path(ckpt_path) / 'checkpoints' / 'last.ckpt'}")
        if path.is_dir():
            return load_folder(path)
        if not path.exists():
            raise ConfigError(f"{key}={ckpt_path} does not exist; give a .ckpt file (or last), a folder written "
                              "by lfpl-export, or a Hugging Face Llama folder")
    path, lit = load_checkpoint(ckpt_path, key)
    # Adapters folded into the weights: the same function as base + adapters, at the plain model's speed.
    lora = has_lora(lit.model)
    model = merge_lora(lit.model) if lora else lit.model
    return model, lit.tokenizer, ModelSource(path, "ckpt", lit.hparams.run_config, merged_lora=lora)


def load_checkpoint(ckpt_path: str | None, key: str = "ckpt_path") -> tuple[str, LitLlama]:
    """The resolved path and the model of a checkpoint written by ``lfpl-train`` (on the CPU; callers move it).

    A DPO run's checkpoint loads as :class:`LitDPO`; a LoRA run's holds the adapters only, so its base model is
    loaded first from the ``init_from`` it records."""
    path = resolve_ckpt_path(ckpt_path, key=key)
    hparams = read_checkpoint(path, key).get("hyper_parameters", {})
    try:
        lit_class = LitDPO if "dpo" in hparams else LitLlama
        base = {}
        if (hparams.get("lora") or {}).get("enabled"):
            base = {"network": _adapter_base(hparams, path, key)}
        lit = lit_class.load_from_checkpoint(path, map_location="cpu", **base)
    except ConfigError:
        raise
    except Exception as e:
        raise _not_a_checkpoint(path, key, e) from None
    if lit.tokenizer is None:
        raise ConfigError(f"{key}={path} has no tokenizer inside; it was not written by lfpl-train")
    return path, lit


def read_checkpoint(path: str, key: str = "ckpt_path") -> dict:
    """What a checkpoint file holds, its tensors memory-mapped on the CPU; a one-line error naming ``key`` if the
    file is none (truncated, another program's, ...)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise _not_a_checkpoint(path, key, e) from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{key}={path} is not a checkpoint written by lfpl-train (it holds a "
                          f"{type(checkpoint).__name__}, not a dict)")
    return checkpoint


def _not_a_checkpoint(path: str, key: str, error: Exception) -> ConfigError:
    reason = one_line(re.split(r"\.\s", str(error))[0])  # the first sentence is the useful one
    reason = f"{type(error).__name__}: {reason}"
    if "_use_new_zipfile_serialization" in reason:  # torch.load(mmap=True) of any file that is no zip: "re-save it"
        reason = "the file is empty" if os.path.getsize(path) == 0 else "not the zip archive torch.save writes"
    return ConfigError(f"{key}={path} is not a checkpoint written by lfpl-train ({reason})")


def _adapter_base(hparams: dict, path: str, key: str) -> Transformer:
    """The base network a LoRA checkpoint's adapters belong to, from the init_from it records."""
    init_from = hparams.get("init_from")
    if init_from is None or not Path(init_from).exists():
        raise ConfigError(f"{key}={path} holds LoRA adapters whose base model init_from={init_from} is missing; "
                          "put the base back at that path")
    base, model_cfg = load_model(init_from, key="init_from")[0], ModelConfig(**hparams["model"])
    try:
        return init_network(base, model_cfg, init_from)
    except ConfigError:  # of another shape: its fix names model.* overrides, which lfpl-train has and these lack
        raise ConfigError(f"{key}={path} holds LoRA adapters of another base model than init_from={init_from} holds "
                          "now (replaced since they were trained); put their base back at that path") from None


def absolute_data_paths(data: DictConfig) -> None:
    """Make the data config's local paths absolute (``~`` expanded), as a run's config records them. Relative, they
    named other files from another folder: lfpl-eval of a run's held-out split read whatever data/corpus.txt the
    current folder held, without a word, or failed naming a setting the user never typed."""
    for key in ("path", "val_path", "tokenizer_path", "chunks_dir"):
        value = data.get(key)
        if isinstance(value, str) and "://" not in value:  # not an object-store URI (data.chunks_dir)
            data[key] = os.path.abspath(os.path.expanduser(value))


def _this_sweep() -> tuple[Path, float] | None:
    """The folder of the sweep the current job belongs to while it runs (:func:`running_sweep_dir`), and when it
    started (its ``.sweep_started`` marker's time; 0 without one); None outside a running sweep."""
    if (folder := running_sweep_dir()) is None:
        return None
    marker = Path(folder) / SWEEP_STARTED
    return Path(folder).resolve(), marker.stat().st_mtime if marker.is_file() else 0.0


def absolute_model_path(path: str, runs_dir: str = "outputs", key: str = "init_from") -> str:
    """``path`` (a checkpoint, or a model folder) as an absolute path, ``last`` being the newest last.ckpt under
    ``runs_dir``. As typed, ``init_from=last`` or a relative path stopped naming the same model once recorded: a
    LoRA checkpoint's base went missing from another folder, and a resumed DPO run took itself for its reference."""
    found = Path(resolve_ckpt_path(path, runs_dir, key) if path == "last" else path).expanduser()
    return str(found.resolve()) if found.exists() else path  # a missing one: load_model names it as it was typed


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: str = "outputs", key: str = "ckpt_path") -> str | None:
    """``ckpt_path`` as given (``~`` expanded), or for ``last`` the newest last checkpoint under ``runs_dir``:
    ``checkpoints/last.ckpt``, or ``last-v1.ckpt`` and so on, which Lightning writes beside an older one when a run
    reuses a run folder (a fixed ``hydra.run.dir``) with ``callbacks.model_checkpoint.enable_version_counter=true``
    (as runs before it was turned off did).

    Run folders linked from elsewhere (moved to another disk) are searched too. A job of a running sweep leaves out
    the sweep's own runs: each job resolved ``last`` as it started, to the job before it, so a sweep of
    ``init_from=last`` fine-tuned job 2 from job 1 and job 3 from job 2 instead of all from one model."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        sweep = _this_sweep()
        pattern = os.path.join(glob.escape(os.path.expanduser(runs_dir)), "**", "checkpoints", "last*.ckpt")
        found = [Path(p) for p in glob.glob(pattern, recursive=True, include_hidden=True)]  # pathlib's ** skips links

        def this_sweeps(p: Path) -> bool:  # written by a job of the running sweep (not an earlier one in its folder)
            return sweep is not None and sweep[0] in p.resolve().parents and p.stat().st_mtime >= sweep[1]

        candidates = sorted((p for p in found if not this_sweeps(p)), key=lambda p: p.stat().st_mtime)
        if not candidates:
            before = " from before this sweep" if sweep else ""
            raise ConfigError(f"{key}=last found no checkpoints/last.ckpt{before} under {runs_dir}/; give the path")
        return str(candidates[-1])
    path = Path(ckpt_path).expanduser()
    if path.is_dir():  # a run's folder, or a model folder (lfpl-export's, Hugging Face's): no training state
        raise ConfigError(f"{key}={ckpt_path} is a folder; give a .ckpt file (a run's checkpoints/last.ckpt, or "
                          f"{key}=last) — to start from a model folder's weights, use init_from=")
    if not path.is_file():
        raise ConfigError(f"{key}={ckpt_path} does not exist; give the path of a .ckpt file (or {key}=last)")
    return str(path)
