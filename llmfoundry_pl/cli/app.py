"""How a Hydra command starts and ends: its ``main`` (:func:`hydra_command`), and errors printed as one line.

A console script imports the module of its ``main`` before calling it. This module imports neither torch nor
Lightning (~5 s of a core on a 2-core machine), so the commands' ``main`` starts at once, and Ctrl-C while those
imports load is the one word "interrupted" (exit status 130), as anywhere else in a command, not Python's traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from llmfoundry_pl.config import ConfigError, one_line, register_configs

CONFIG_PATH = "pkg://llmfoundry_pl.conf"  # conf/ ships inside the package (see pyproject.toml)


def hydra_command(config_name: str, task: str) -> Callable[[], Any]:
    """The ``main`` of a Hydra command (a console script of pyproject.toml): compose ``conf/<config_name>.yaml``
    with the command line, then import ``task`` (``"module:function"``) and call it with the config, inside
    :func:`user_errors`; what it returns goes back to Hydra (the value a sweeper minimises). One definition for
    every command, which each repeated; ``task``'s module is imported last, for Ctrl-C (see the module's doc)."""

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def app(cfg: DictConfig) -> Any:
        with user_errors(cfg):
            module, _, function = task.partition(":")
            return getattr(importlib.import_module(module), function)(cfg)

    return lambda: run_hydra_app(app, config_name)


@contextmanager
def user_errors(cfg: DictConfig | None = None) -> Iterator[None]:
    """Turn a :class:`ConfigError` (a mistake in the user's settings or data) into one line on stderr and exit
    status 2, instead of a traceback; running out of memory into one line and status 1; Ctrl-C into "interrupted"
    and status 130, as a shell reports it. Anything else is a bug and keeps its traceback. Given the command's
    ``cfg``, first checks that Hydra's ``~key`` deleted nothing it needs (:func:`check_nothing_deleted`)."""
    try:
        if cfg is not None:
            check_nothing_deleted(cfg)
            check_nothing_added(cfg)
        if HydraConfig.initialized() and HydraConfig.get().job.chdir:
            # Relative paths (data.path, ckpt_path, init_from, the cache) mean the folder the command started in; in
            # the run's folder they named nothing ("does not exist"), or put the token cache inside each run.
            raise ConfigError("hydra.job.chdir=true is not supported: relative paths are read from the folder the "
                              "command starts in, and outputs go to the run's folder (paths.output_dir) anyway; "
                              "drop it")
        yield
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's switch for the whole traceback, as for its errors
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except MissingMandatoryValue as e:
        print(f"error: {e.full_key} is required; give it on the command line ({e.full_key}=...)", file=sys.stderr)
        raise SystemExit(2) from None
    except InterpolationToMissingValueError as e:  # ${paths.output_dir} after ~paths, say
        needed = re.search(r"Missing mandatory value: (\S+)", str(e))
        what = needed[1] if needed else "a value it refers to"
        print(f"error: {e.full_key} needs {what}, which is missing; give it on the command line ({what}=...)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C outside fit (which Lightning ends itself): preparing data, a prompt, ...
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # running out of memory (torch.OutOfMemoryError is a RuntimeError) or of disk space
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's switch for the whole traceback
            raise
        if (what := out_of_memory(e)) is not None:
            print(f"error: out of memory: {what} — the 'Out of memory' section of docs/troubleshooting.md lists what "
                  "to lower; for training, lfpl-plan shows the largest micro-batch that fits", file=sys.stderr)
            raise SystemExit(1) from None
        if (what := out_of_disk(e)) is not None:
            print(f"error: out of disk space: {what}; free some, or write elsewhere (lfpl-train: paths.output_dir=, "
                  "the token cache: LFPL_CACHE_DIR=, lfpl-export: out=)", file=sys.stderr)
            raise SystemExit(1) from None
        raise


def check_nothing_deleted(cfg: DictConfig) -> None:
    """Refuse a config that Hydra's ``~key`` override left without a setting of its schema. Hydra deletes the key
    (``~lora``) or the group's option (``~trainer``), and the command failed later, deep in its code, with
    OmegaConf's traceback ("Key 'lora' not in 'TrainConfig'"). Settings are turned off by value here
    (``lora.enabled=false``, ``callbacks.sample_text=null``), so a deletion is never what the user meant."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    deleted = {o[1:].partition("=")[0] for o in HydraConfig.get().overrides.task if o.startswith("~")} \
        if HydraConfig.initialized() else set()
    for f in dataclasses.fields(schema):
        # ~trainer: the group's option deleted, and only what other groups (hardware=) set in it is left
        gone = f.name not in cfg.keys() or (f.default == MISSING and f.name in deleted)
        if gone:
            example = " (lora.enabled=false, callbacks=none)" if "lora" in cfg and "callbacks" in cfg else ""
            raise ConfigError(f"~{f.name} deleted {f.name}, which this command needs; set its value instead "
                              f"(--help lists the settings): features turn off by value{example}")


# What each writer says when a write comes up short: the OS (no space, a file-size or quota limit), numpy's tofile,
# torch.save's zip writer (inline_container.cc) and safetensors (its Rust I/O error, with the OS's number).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))  # Windows has no EDQUOT
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|inline_container\.cc.*(unexpected pos|failed writing)|"
                          rf"os error ({'|'.join(map(str, _DISK_FULL_ERRNOS))})\b")


def out_of_disk(error: BaseException) -> str | None:
    """What could not be written, if ``error`` (or what caused it) is a write that ran out of disk space or hit a
    file-size limit; else None. Each library says it its own way, and a run that fills its disk said it in a
    traceback, after hours of training."""
    seen = set()  # a chain of causes can loop back
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return f"{error.strerror}" + (f" ({error.filename})" if error.filename else "")
        if _SHORT_WRITE.search(str(error)):
            return one_line(error)
        error = error.__cause__ or error.__context__
    return None


# The groups whose members are objects built from their _target_: +callbacks.lr_monitor._target_=... adds one.
ADDABLE_GROUPS = ("callbacks", "logger")


def check_nothing_added(cfg: DictConfig) -> None:
    """Refuse a ``+key=value`` override that adds a key the schema does not have. Hydra answers a misspelt key
    with "to append to your config use +key=value", and the appended key was then ignored without a word
    (``+model.n_layer=1`` trained the preset's 4 layers)."""
    added = [o.lstrip("+").partition("=")[0] for o in HydraConfig.get().overrides.task if o.startswith("+")] \
        if HydraConfig.initialized() else []
    for key in added:
        if unknown := _unknown_setting(cfg, key, consequence=", so it would be ignored"):
            raise ConfigError(f"+{key}: {unknown}")


def _unknown_setting(cfg: DictConfig, key: str, consequence: str = "") -> str | None:
    """Why the dotted ``key`` is not a setting of ``cfg``'s schema ("n_layer is not a setting of model, then
    ``consequence``; did you mean n_layers?"), or None where it is one, or lies in a free-form mapping (a callback's
    arguments), or names a new callback or logger (built from its ``_target_``)."""
    node = cfg
    for depth, part in enumerate(key.split(".")):
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if not dataclasses.is_dataclass(schema):  # a free-form mapping (a callback's arguments, say): anything
            return None
        names = [f.name for f in dataclasses.fields(schema)]
        if depth == 1 and key.split(".")[0] in ADDABLE_GROUPS and part not in names:
            return None  # a new member, built from its _target_
        if part not in names:
            where = ".".join(key.split(".")[:depth]) or "the config"
            # (0.75: above vocab_size ~ batch_size's 0.7, which sent lfpl-eval data.vocab_size= to batch_size)
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.75) or (_one_level_down(node, part)
                                                                                if depth == 0 else [])
            return f"{part} is not a setting of {where}{consequence}" + (
                f"; did you mean {close[0]}?" if close else "; --help lists the settings")
        node = node._get_node(part)  # the node itself: its value may be an interpolation not resolvable yet
    return None


def _one_level_down(cfg: DictConfig, name: str) -> list[str]:
    """The settings one level down called ``name``: ``precision=bf16-mixed`` means trainer.precision."""
    found = []
    for key in cfg.keys():
        node = cfg._get_node(key)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if dataclasses.is_dataclass(schema) and name in {f.name for f in dataclasses.fields(schema)}:
            found.append(f"{key}.{name}")
    return found


def out_of_memory(error: BaseException) -> str | None:
    """What ran out, in torch's words, if ``error`` is an allocation failure (CUDA's OutOfMemoryError, or the
    RuntimeError of the CPU and MPS allocators); else None. The most common way a run on an 8 GB GPU ends, and
    torch's own message is the useful part of its traceback."""
    import torch  # here, not at the top (see the module's doc): an error from torch has imported it already

    text = " ".join(str(error).split())
    if isinstance(error, torch.OutOfMemoryError) or "MPS backend out of memory" in text:
        return ". ".join(text.split(". ")[:3]).rstrip(".")  # what was asked for, and what the device has free
    cpu = re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", text)
    return f"the CPU could not allocate {int(cpu[1]) / 1e9:.1f} GB more" if cpu else None


def run_hydra_app(app: Callable[[], Any], config_name: str) -> None:
    """Start a Hydra command (``app``, its ``@hydra.main`` function, of ``conf/<config_name>.yaml``): register the
    schemas, quiet the libraries' noise, quote the values Hydra's command-line grammar cannot read unquoted
    (:func:`quote_non_ascii_values`) and refuse overrides of settings that are not there, or off
    (:func:`check_overrides`); output piped into a reader that stops early (``| head``) ends quietly, as
    for other commands, and Ctrl-C before the command's task starts (the imports, composing the config) is
    "interrupted", as during it."""
    try:
        with user_errors():  # (the task's own user_errors, inside app, has already ended what happened there)
            register_configs()  # imports Lightning: the schemas of trainer, callbacks and logger are its signatures
            quiet_library_noise()
            sys.argv[1:] = quote_non_ascii_values(sys.argv[1:])
            check_overrides(config_name, sys.argv[1:])
            app()
    except BrokenPipeError:  # `lfpl-train --help | head`: the reader left early, and Python's traceback said so
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: no second error at exit
        raise SystemExit(1) from None


# The key of an override of a callback or logger, or of a setting inside one: callbacks.early_stopping.patience
_MEMBER_KEY = re.compile(r"\+{0,2}(callbacks|logger)\.(\w+)(\.[\w.]+)?")
# An override that can choose which members are on: a config group's option (experiment=sft, callbacks=none) or a
# top-level setting; not a sweep (a,b), which a single composition cannot take
_CHOICE_OVERRIDE = re.compile(r"\+{0,2}(?!hydra)[\w/]+(@[\w.]+)?=[^,]*")
# An override of a setting (seed=1, model.n_layers=2), without Hydra's + or ~; one without a dot may be a group's
# option instead (model=small)
_SETTING_OVERRIDE = re.compile(r"(?!hydra[.=])(\w+(\.\w+)*)=.*", flags=re.DOTALL)
# Hydra's options that compose another config than the package's (the checks below compose the package's)
_OWN_CONFIG_OPTIONS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def check_overrides(config_name: str, args: list[str]) -> None:
    """Refuse, in one line, a command-line override Hydra would refuse in several, or take wrongly:

    - of a key the schema lacks (``model.n_layer=2``, ``precision=bf16-mixed``): Hydra's message told to add it
      with ``+``, which :func:`check_nothing_added` refuses in turn; named here with the likely setting.
    - inside a callback or logger that the config leaves off (null): ``callbacks.early_stopping.patience=5``
      under ``callbacks=default``, or ``callbacks.sample_text={...}`` under ``experiment=sft``. OmegaConf cannot
      fill a member that is null (see ``config._optional_members``), and failed in a 23-line traceback
      ("Unexpected type for root: NoneType").

    Only when such overrides are typed, the config is composed once more from the group choices alone; a sweep
    over a group's choice (``data=text,sft``) leaves the keys to Hydra, job by job, as does a config of the
    user's own (``--config-dir``) and a composition that fails, which Hydra reports."""
    members = [(m[1], m[2], m[0].lstrip("+")) for arg in args if (m := _MEMBER_KEY.fullmatch(arg.partition("=")[0]))]
    groups = {p.name for p in resources.files("llmfoundry_pl.conf").iterdir() if p.is_dir() and p.name.isidentifier()}
    settings = [m[1] for arg in args if (m := _SETTING_OVERRIDE.fullmatch(arg)) and m[1] not in groups]
    if not (members or settings) or any(arg.partition("=")[0] in _OWN_CONFIG_OPTIONS for arg in args):
        return
    choices = [arg for arg in args if _CHOICE_OVERRIDE.fullmatch(arg)]
    swept_choice = any(re.fullmatch(r"\+{0,2}[\w/]+(@[\w.]+)?=.*", arg) for arg in args if arg not in choices)
    # the top-level settings may be what is misspelt (device=cpu): then the group choices alone
    cfg = _compose(config_name, choices) or _compose(config_name, [a for a in choices if a.partition("=")[0] in groups])
    if cfg is None:
        return
    for key in [] if swept_choice else settings:
        if unknown := _unknown_setting(cfg, key):
            raise ConfigError(f"{key}: {unknown}")
    for group, member, key in members:
        if isinstance(cfg.get(group), DictConfig) and member in cfg[group] and cfg[group][member] is None:
            own_option = resources.files("llmfoundry_pl.conf").joinpath(group, f"{member}.yaml").is_file()
            fix = f"{group}={member} turns it on" if own_option else (
                "choose configs that leave it on (an experiment= may turn it off), or turn it on in a config file "
                "of your own")
            raise ConfigError(f"{key}: {group}.{member} is off (null) in this config, and a setting that is off "
                              f"cannot be filled in from the command line; {fix}")


def _compose(config_name: str, overrides: list[str]) -> DictConfig | None:
    """The package's config ``config_name`` with ``overrides``; None where that fails (Hydra says why, later)."""
    from hydra import compose, initialize_config_module

    try:
        with initialize_config_module(config_module="llmfoundry_pl.conf", version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except Exception:  # noqa: BLE001 - Hydra reports a bad command line itself, in its words
        return None


# Characters with a meaning in Hydra's override grammar (sweeps, lists, dicts, interpolations, quotes): a value that
# holds one is left as typed, for Hydra to read.
_GRAMMAR_CHARACTERS = set("'\"\\[]{}(),$=")


def quote_non_ascii_values(args: list[str]) -> list[str]:
    """``args`` with each override's value that holds non-ASCII text quoted (``prompt=你好`` as ``prompt='你好'``).
    Hydra reads unquoted values in ASCII only: ``prompt=你好``, ``data.path=/data/语料.txt``, even ``prompt=é``
    ended in its lexer's error, and its docs say to quote them, which only a shell's quotes around Hydra's own do
    (``'prompt="你好"'``). Values Hydra would read otherwise (a sweep ``a,b``, a list, ``${...}``) are left as typed,
    but for the prompts' free text outside a sweep (:data:`TEXT_KEYS`), quoted whatever it holds."""
    quoted, sweep = [], "-m" in args or "--multirun" in args
    for arg in args:
        override = re.fullmatch(r"([~+]{0,2}[A-Za-z_][\w.@/-]*)=(.*)", arg, flags=re.DOTALL)
        text = override and not sweep and override[1].lstrip("+").endswith(TEXT_KEYS)
        if text and _needs_quotes(override[2]):
            arg = f"{override[1]}={_quoted(override[2])}"
        elif override and not override[2].isascii() and not _GRAMMAR_CHARACTERS & set(override[2]):
            arg = f"{override[1]}='{override[2]}'"
        quoted.append(arg)
    return quoted


# Settings whose values are free text, never a list: outside a sweep (-m), their grammar characters are the text's
# own (prompt="don't" ended in Hydra's lexer error, prompt="Hello, world" in "Ambiguous value ... add --multirun").
TEXT_KEYS = ("prompt",)


def _needs_quotes(value: str) -> bool:
    already = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    return not already and "${" not in value and (not value.isascii() or bool(_GRAMMAR_CHARACTERS & set(value)))


def _quoted(text: str) -> str:
    """``text`` as a quoted value of Hydra's grammar, which escapes only quotes (and backslashes before them)."""
    quote = "'" if "'" not in text else '"' if '"' not in text else "'"
    escaped = re.sub(r"(\\*)(" + quote + r"|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), text)
    return quote + escaped + quote


def quiet_library_noise() -> None:
    """Leave out lines libraries print in every run that say nothing about it: three of Lightning's (an
    advertisement for its cloud logger, a model-summary caveat under mixed precision — the summary counts
    parameters, not bytes, here — and the FutureWarning its own pytree helper raises under recent torch, LeafSpec)
    and torch's notice, once per enum, that torchao registers enums it no longer needs to (torchao comes with peft:
    every LoRA run printed two). No setting of ours can act on them; a learner's first run should show the run.
    Each filter matches one message exactly. One more of Lightning's is untrue here: every resume warned that the
    dataloader "is not resumable" and results may be unreliable, where the data modules restart at the resumed
    step's samples by construction (data/datamodule.py) and resumed losses equal the uninterrupted run's."""
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    leaf_spec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(  # where rank_zero_info writes
        lambda record: not record.getMessage().startswith("💡 Tip: For seamless cloud logging"))
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "is an Enum subclass and is now natively supported by torch.compile" not in record.getMessage())
