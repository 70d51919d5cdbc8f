"""``lfpl-generate``: continue prompts with a trained checkpoint.

    lfpl-generate ckpt_path=outputs/.../last.ckpt prompt="ROMEO:" max_new_tokens=200 temperature=0.8 top_k=50
    lfpl-generate ckpt_path=... prompt_file=prompts.txt        # batch mode: one JSON line per prompt
    lfpl-generate ckpt_path=... interactive=true stream=true   # a prompt per line on stdin, until EOF
    lfpl-generate ckpt_path=big.ckpt draft_ckpt_path=small.ckpt temperature=0   # speculative decoding
    lfpl-generate ckpt_path=sft.ckpt chat=true interactive=true stream=true     # chat in the terminal, with history
    lfpl-generate ckpt_path=... device=cpu quantize=int8                         # int8 linear layers (CPU)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from llmfoundry_pl.chat import ChatFormat, Message
from llmfoundry_pl.cli.app import out_of_memory
from llmfoundry_pl.cli.common import (
    load_model,
    pick_device,
    require_compiler,
    to_dataclass,
)
from llmfoundry_pl.config import ConfigError, GenerateConfig
from llmfoundry_pl.inference import SpeculativeStats, generate_text_batch, stream_text
from llmfoundry_pl.inference.quantize import for_inference
from llmfoundry_pl.inference.text import Prompt, encode_prompt
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer, check_encodable


def load_models(cfg: GenerateConfig) -> tuple[Transformer, Tokenizer, Transformer | None]:
    """The model, its tokenizer and the optional draft model, on the chosen device, in the precision and quantized
    as asked."""
    device = pick_device(cfg.device)
    model, tokenizer, _ = load_model(cfg.ckpt_path)
    model, draft = for_inference(model, device, cfg.precision, cfg.quantize), None
    if cfg.draft_ckpt_path is not None:
        draft, draft_tokenizer, _ = load_model(cfg.draft_ckpt_path, key="draft_ckpt_path")
        if draft_tokenizer.sha256 != tokenizer.sha256:
            raise ConfigError(
                f"draft_ckpt_path={cfg.draft_ckpt_path} uses a different tokenizer than ckpt_path; speculative "
                "decoding needs a draft trained with the same tokenizer (data.tokenizer_path)"
            )
        draft = for_inference(draft, device, cfg.precision, cfg.quantize)
    if cfg.compile:  # dynamic: the cache grows by one slot per step, which must not mean one compilation per step
        require_compiler(device)
        model = torch.compile(model, dynamic=True)
        draft = draft if draft is None else torch.compile(draft, dynamic=True)
    return model, tokenizer, draft


def read_prompt_file(path: str) -> list[str]:
    """The non-empty lines of a prompt file."""
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"prompt_file={path} {what}; give a text file, one prompt per line")
    try:  # utf-8-sig: a file saved with a byte-order mark (Windows editors) does not start its first prompt with it
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt_file={path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:  # else the run would load the model and print nothing
        raise ConfigError(f"prompt_file={path} holds no prompt (only empty lines); write one prompt per line")
    return prompts


def _check_prompt_lengths(path: str, prompts: list[str], asked: list, tokenizer: Tokenizer, chat: ChatFormat | None,
                          context: int) -> None:
    """Name the first prompt of the file too long for the model, before any is generated: the batch's own error
    said only "the prompt is 403 tokens", for which of hundreds of lines it did not say."""
    for number, (prompt, question) in enumerate(zip(prompts, asked, strict=True), 1):
        n = len(encode_prompt(tokenizer, question, chat)[0])
        if n > context:
            start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
            raise ConfigError(f"prompt {number} of prompt_file={path} ({start!r}) is {n} tokens, more than the model's "
                              f"context of {context}; shorten it")


def read_stdin_prompts() -> Iterator[str]:
    """Prompts typed (or piped) on stdin, one per line, until EOF (Ctrl-D)."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\r\n")  # a Windows line end too: its \r was part of the prompt


def fit_context(chat: ChatFormat, messages: list[Message], max_seq_len: int) -> list[Message]:
    """``messages`` without their oldest exchanges (a system message stays) until the prompt leaves room to reply;
    the newest message always stays (if it alone is too long, generation says so)."""
    system, turns = ([messages[0]], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
    while len(turns) > 1 and len(chat.prompt_ids(system + turns)) >= max_seq_len:
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
    return system + turns


def generate(node: DictConfig) -> list[str]:
    """Print, and return, the continuation of each prompt."""
    cfg = to_dataclass(node, GenerateConfig)  # the schema's checks run here, before any loading
    prompts = read_prompt_file(cfg.prompt_file) if cfg.prompt_file is not None else None  # a typo fails before loading
    model, tokenizer, draft = load_models(cfg)
    chat = ChatFormat(tokenizer) if cfg.chat else None
    options = dict(
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty, seed=cfg.seed, stop=list(cfg.stop), chat=chat,
    )
    texts: list[str] = []
    system = [{"role": "system", "content": cfg.system}] if cfg.chat and cfg.system else []
    if prompts is not None:  # batch mode: batch_size prompts at a time, one JSON line each
        # chat: each prompt a conversation of its own, opened by the system message if there is one
        asked = [[*system, {"role": "user", "content": p}] for p in prompts] if chat is not None else prompts
        _check_prompt_lengths(cfg.prompt_file, prompts, asked, tokenizer, chat, model.config.max_seq_len)
        for i in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[i : i + cfg.batch_size]
            outputs = generate_text_batch(model, tokenizer, asked[i : i + cfg.batch_size], cfg.max_new_tokens,
                                          **options)
            for prompt, text in zip(chunk, outputs, strict=True):
                print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False), flush=True)
                texts.append(text)
        return texts
    stats = SpeculativeStats()
    if draft is not None:
        options.update(draft_model=draft, draft_tokens=cfg.draft_tokens, stats=stats)
    history = system
    for number, prompt in enumerate(read_stdin_prompts() if cfg.interactive else [cfg.prompt]):
        # A seed of each prompt's own: with one for all, a prompt typed again got the same sample, every time.
        # (modulo 2**64, torch's seeds, where a negative seed is the same as seed + 2**64)
        options["seed"] = None if cfg.seed is None else (cfg.seed + number) % 2**64
        try:
            answer = _answer(model, tokenizer, chat, history, prompt, cfg, options)
        except ConfigError as e:
            if not cfg.interactive:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)  # interactive: say so, and wait for the next prompt
            continue
        if answer is None:  # stopped with Ctrl-C
            continue
        asked, text = answer
        texts.append(text)
        if chat is not None:
            history = [*asked, {"role": "assistant", "content": text}]
    if draft is not None:
        print(f"speculative decoding: {stats.accepted}/{stats.proposed} draft tokens accepted "
              f"({stats.acceptance_rate:.0%}) in {stats.target_calls} passes of the model", file=sys.stderr)
    return texts


def _answer(model: Transformer, tokenizer: Tokenizer, chat: ChatFormat | None, history: list[Message], prompt: str,
            cfg: GenerateConfig, options: dict) -> tuple[Prompt, str] | None:
    """Print the answer to ``prompt`` (with ``chat``, the reply to it after ``history``); return what the model was
    asked and the answer. A prompt the model cannot take raises :class:`ConfigError` before anything is printed.

    Interactive, Ctrl-C while the answer is generated stops it and returns None (the session waits for the next
    prompt, as chat programs do; it used to end, and a chat's history with it); so does the device running out of
    memory. Once the answer is printed whole, Ctrl-C ends the session, as at the prompt."""
    check_encodable(prompt, "the prompt")  # a line typed in another encoding than UTF-8 (GBK), say
    # chat: the conversation so far, oldest turns dropped if it outgrows the context; kept as it was if this prompt
    # cannot be answered (a message too long for the context alone would have cleared it)
    asked = fit_context(chat, [*history, {"role": "user", "content": prompt}], model.config.max_seq_len) \
        if chat is not None else prompt
    deltas = stream_text(model, tokenizer, asked, cfg.max_new_tokens, **options)
    try:
        text = next(deltas, "")  # the prompt's checks run here
        # One path for both modes: with stream=true each delta is printed as it comes, else the whole text at the
        # end. A chat shows the reply alone; plain text shows the prompt it continues.
        print(("" if chat else prompt) + (text if cfg.stream else ""), end="", flush=True)
        for delta in deltas:
            text += delta
            if cfg.stream:
                print(delta, end="", flush=True)
    except KeyboardInterrupt:
        if not cfg.interactive:
            raise
        return _drop_answer(deltas, "stopped (left out of the conversation); Ctrl-C at the prompt, or Ctrl-D, ends "
                                    "the session")
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not cfg.interactive or (what := out_of_memory(e)) is None:
            raise
        return _drop_answer(deltas, f"error: out of memory: {what}; the answer is left out (the conversation before "
                                    "it is kept); a shorter prompt or conversation, or a lower max_new_tokens, "
                                    "needs less")
    print("" if cfg.stream else text, flush=True)
    return asked, text


def _drop_answer(deltas: Generator[str, None, None], message: str) -> None:
    """End an interactive answer cut short (Ctrl-C, or the device out of memory, as a long chat on an 8 GB GPU may
    run into): the generation is closed, the line ended and ``message`` said; the session goes on."""
    deltas.close()
    print(flush=True)
    print(message, file=sys.stderr, flush=True)
