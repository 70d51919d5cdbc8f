"""Write docs/reference/config.md from the structured-config dataclasses in llmfoundry_pl/config.py.

Every field's name, type, default and help text (``field(metadata={"help": ...})``) comes from the schema itself,
and every config group's options from conf/<group>/*.yaml (each file's first comment line), so the page cannot
drift from the code: tests/test_docs.py fails when the committed page differs from what this script writes.

    python docs/gen_config_reference.py          # rewrite docs/reference/config.md
    python docs/gen_config_reference.py --check  # exit 1 if the committed page is stale
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING

from llmfoundry_pl import config as C

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference" / "config.md"
CONF = ROOT / "conf"

# (schema, where its keys live, one line on when it applies). Order = order on the page.
SCHEMAS: list[tuple[type, str, str]] = [
    (C.TrainConfig, "lfpl-train (top level)", "Its sub-configs are the sections below."),
    (C.ModelConfig, "model.*", "Every `model=` preset (conf/model/*.yaml) fills this schema."),
    (C.DataConfig, "data.*", "`data=text` (the default): plain text tokenized with a SentencePiece model."),
    (C.StreamingDataConfig, "data.*", "`data=streaming`: every `data=text` field above, plus the two below."),
    (C.ChatDataConfig, "data.*", "`data=sft` and `data=preference`: JSONL fine-tuning data."),
    (C.LoraConfig, "lora.*", "LoRA adapters for fine-tuning (`lora.enabled=true`)."),
    (C.DPOConfig, "dpo.*", "Direct preference optimisation (`experiment=dpo`)."),
    (C.OptimConfig, "optim.*", "The optimizer (`optim=adamw`)."),
    (C.SchedulerConfig, "scheduler.*", "The learning-rate schedule (`scheduler=cosine` or `constant`)."),
    (C.PathsConfig, "paths.*", "Where runs and caches go (`paths=default`)."),
    (C.MachineConfig, "machine.*", "The `hardware=` profile's device, for `lfpl-plan` (conf/hardware/*.yaml)."),
    (C.BenchConfig, "lfpl-bench (top level)", "`lfpl-train`'s config plus the field below."),
    (C.BenchSettings, "bench.*", "What `lfpl-bench` measures."),
    (C.PlanConfig, "lfpl-plan (top level)", "`lfpl-train`'s config plus the field below."),
    (C.PlanSettings, "plan.*", "What `lfpl-plan` estimates."),
    (C.EvalConfig, "lfpl-eval (top level)", ""),
    (C.EvalDataConfig, "lfpl-eval data.*", "The text `lfpl-eval` scores."),
    (C.GenerateConfig, "lfpl-generate (top level)", ""),
    (C.ExportConfig, "lfpl-export (top level)", ""),
    (C.ServeConfig, "lfpl-serve (top level)", ""),
]


def own_fields(schema: type) -> list[dataclasses.Field]:
    """The schema's fields, without those it inherits from another schema (BenchConfig adds one to TrainConfig)."""
    inherited = {f.name for base in schema.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(schema) if f.name not in inherited]


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", "")).strip()


def _value(value: Any) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '""' if value == "" else value
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def field_default(f: dataclasses.Field) -> str:
    if f.default_factory is C.default_cache_dir:  # read from the environment: document the rule, not this machine's
        return f"`$LFPL_CACHE_DIR`, else `{C.DEFAULT_CACHE_DIR}`"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            name = type(value).__name__
            return f"[{name}](#{name.lower()})"
        return f"`{_value(value)}`"
    if f.default is MISSING or f.default is dataclasses.MISSING:
        return "required"
    return f"`{_value(f.default)}`"


def _cell(text: str) -> str:
    """Table-safe Markdown: no raw pipes, and angle brackets shown rather than read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def schema_section(schema: type, where: str, intro: str) -> list[str]:
    doc = " ".join((schema.__doc__ or "").strip().split("\n\n")[0].split())
    command, _, rest = where.partition(" (top level)")
    keys = f"the top level of `{command}`" if _ else f"`{where}`"
    lines = [f"## {schema.__name__}", "", f"Keys: {keys}. {intro}".rstrip(), ""]
    if doc and not doc.startswith(schema.__name__ + "("):  # dataclasses invent a signature docstring when none
        lines += [_cell(doc), ""]
    lines += ["| field | type | default | help |", "|---|---|---|---|"]
    for f in own_fields(schema):
        ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        # Inside a code span a pipe does not split the table cell (and an escaped one would show its backslash).
        lines.append(f"| `{f.name}` | `{ftype}` | {field_default(f)} | {_cell(field_help(f))} |")
    return lines + [""]


def first_comment(path: Path) -> str:
    """The first sentence of the file's opening comment (which may wrap over several lines), skipping Hydra's
    ``# @package`` directive and stopping at an indented example command; "" when a key comes first (a comment
    further down is about that key, not the file)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("# @package"):
            continue
        if stripped and not stripped.startswith("#"):
            break
        if not stripped or stripped.startswith("#  "):
            if words:
                break
            continue
        words.append(stripped.lstrip("#").strip())
    text = " ".join(words)
    sentence = re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]
    return sentence.rstrip(":").strip()


def _yaml_summary(path: Path) -> str:
    """For a file without a comment: its top-level keys and values, e.g. `decay: cosine, warmup_steps: 50`."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return "`" + ", ".join(f"{k}: {_value(v)}" for k, v in data.items() if k != "defaults") + "`"


def group_defaults() -> dict[str, str]:
    """The option each group of conf/train.yaml picks when none is given."""
    defaults = yaml.safe_load((CONF / "train.yaml").read_text(encoding="utf-8"))["defaults"]
    return {k: v for item in defaults if isinstance(item, dict) for k, v in item.items()}


def groups_section() -> list[str]:
    defaults = group_defaults()
    lines = [
        "## Config groups and their options",
        "",
        "Pick an option with `group=name` (`lfpl-train model=small hardware=rtx5060`). Each option is a file "
        "`conf/<group>/<name>.yaml`; the description is the file's first comment line. **default** marks the option "
        "`lfpl-train` uses when none is given.",
        "",
    ]
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        files = sorted(group.glob("*.yaml"))
        if not files:
            continue
        default = defaults.get(group.name)
        lines += [f"### `{group.name}`", "", "| option | description |", "|---|---|"]
        for f in files:
            mark = " (**default**)" if f.stem == default else ""
            about = _cell(first_comment(f)) or f"sets {_yaml_summary(f)}"
            lines.append(f"| `{group.name}={f.stem}`{mark} | {about} |")
        lines.append("")
    return lines


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/gen_config_reference.py from llmfoundry_pl/config.py and conf/. Do not edit by hand:"
        " run `python docs/gen_config_reference.py`. -->",
        "",
        "Every setting of every command, read from the structured-config dataclasses in `llmfoundry_pl/config.py` "
        "(which are also the Hydra schemas: a misspelt key or a wrong type fails before anything runs, naming the "
        "key). Change a value with `key=value` on the command line, e.g. `lfpl-train model.n_layers=6 optim.lr=1e-3`; "
        "`lfpl-train --cfg job` prints the composed config without running.",
        "",
        "`required` marks a value with no default (`???` in YAML) that you must give. `null` is YAML's None.",
        "",
        "The `trainer`, `callbacks` and `logger` groups are Lightning's own classes: their schemas are derived from "
        "the installed Lightning's signatures (`schema_from_signature` in `llmfoundry_pl/config.py`), so every "
        "argument of [`Trainer`](https://lightning.ai/docs/pytorch/stable/common/trainer.html) and of each "
        "callback is available under its Lightning name (`trainer.max_steps`, `callbacks.model_checkpoint.save_top_k`)"
        " and is not repeated here.",
        "",
    ]
    lines += groups_section()
    for schema, where, intro in SCHEMAS:
        lines += schema_section(schema, where, intro)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python docs/gen_config_reference.py")
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
