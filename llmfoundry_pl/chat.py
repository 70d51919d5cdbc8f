"""The project's one chat template: how a conversation becomes token ids, and which of them are trained.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``, rendered as::

    <|system|>You are terse.<|end|>
    <|user|>Which play is this passage from? ...<|end|>
    <|assistant|>The Tempest<|end|>

Each turn is ``<|role|>`` + content + ``<|end|>`` + a newline. The four markup tokens are reserved in every
tokenizer this project trains (``llmfoundry_pl.tokenizer.CHAT_TOKENS``), so fine-tuning needs no vocabulary surgery.
There is no ``<s>``: the role token opens the text. (Hugging Face's exported tokenizer reads a typed "<s>" as
characters, as SentencePiece does, so a template that wrote one would not give the id.)

Why this shape: every boundary between content and template sits next to a markup token, and SentencePiece never
merges across one: they are user-defined symbols, always one piece wherever they appear in text (unlike control
tokens such as ``<s>``, which typed text never produces). So encoding the whole rendered text at once gives
exactly the ids of encoding each piece apart — which is what lets training mark the assistant's tokens one turn at
a time, while ``lfpl-generate``, the exported Hugging Face tokenizer (:data:`HF_CHAT_TEMPLATE`) and the server
tokenize the rendered text and get the same ids.

Training computes the loss on the assistant's content and its closing ``<|end|>`` only (the model must learn to
stop); the prompt, the role tokens and the newlines get the label IGNORE_INDEX. Generation stops at ``<|end|>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.tokenizer import CHAT_TOKENS, Tokenizer, check_encodable

ROLES = ("system", "user", "assistant")
END = "<|end|>"
TURN_SEPARATOR = "\n"

# The same template in Jinja, for Hugging Face's ``tokenizer.apply_chat_template`` (written into
# tokenizer_config.json by lfpl-export); tests check that both give the same ids.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END + "' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

Message = dict[str, str]


def role_token(role: str) -> str:
    return f"<|{role}|>"


def check_messages(messages: object, where: str = "the conversation") -> list[Message]:
    """``messages`` as a list of {role, content} dicts, or a ConfigError naming what is wrong and where."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ConfigError(f"{where}: message {i} has no role; give each message a role among {', '.join(ROLES)}")
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {i} ({m['role']}) has no text content")
        check_encodable(m["content"], f"{where}: message {i}")
    return messages


def render(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text: what :meth:`ChatFormat.encode` tokenizes, and what HF_CHAT_TEMPLATE renders."""
    text = "".join(f"{role_token(m['role'])}{m['content']}{END}{TURN_SEPARATOR}" for m in messages)
    return text + (role_token("assistant") if add_generation_prompt else "")


class ChatFormat:
    """The chat template bound to a tokenizer: encodes conversations for training and prompts for generation."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in CHAT_TOKENS if tokenizer.sp.piece_to_id(t) == tokenizer.sp.unk_id()]
        if missing:
            raise ConfigError(
                f"the tokenizer has no {', '.join(missing)} token(s), which the chat template needs; fine-tune a "
                "model pretrained with this project's tokenizer (it reserves them), not an imported one"
            )
        self.tokenizer = tokenizer
        self.end_id = tokenizer.sp.piece_to_id(END)
        # What ends a generated reply: its <|end|>, or a </s> (the end of a document, which pretraining taught), at
        # which the exported generation_config.json stops transformers' generate too.
        self.stop_ids = (self.end_id, tokenizer.eos_id)
        self.role_ids = {role: tokenizer.sp.piece_to_id(role_token(role)) for role in ROLES}
        self.separator_ids = tokenizer.encode(TURN_SEPARATOR)

    def encode(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and for each id whether it is trained: True on the assistant's content
        and its ``<|end|>``, False elsewhere."""
        ids, trained = [], []
        for m in messages:
            content = self.tokenizer.encode(m["content"])
            is_reply = m["role"] == "assistant"
            ids += [self.role_ids[m["role"]], *content, self.end_id, *self.separator_ids]
            trained += [False] + [is_reply] * (len(content) + 1) + [False] * len(self.separator_ids)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            trained.append(False)
        return ids, trained

    def encode_to_last_reply(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """:meth:`encode` cut after its last trained token. What follows it (the separator after the last
        ``<|end|>``, a closing user turn) is no target, and no later target sees it: fed, it would only take places
        of the context, and an example whose replies fit would count as too long."""
        ids, trained = self.encode(messages)
        last = max((i for i, t in enumerate(trained) if t), default=-1)
        return ids[: last + 1], trained[: last + 1]

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """What the model continues to write the assistant's next turn."""
        return self.encode(messages, add_generation_prompt=True)[0]
