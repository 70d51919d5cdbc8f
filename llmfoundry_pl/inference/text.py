"""Text in, text out: streaming deltas that never split a character, stop strings, and batches of prompts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from llmfoundry_pl.chat import ChatFormat, Message, check_messages
from llmfoundry_pl.config import check_stop_strings
from llmfoundry_pl.inference.generate import generate_batch, generate_stream
from llmfoundry_pl.inference.speculative import speculative_stream
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer, check_encodable


class TextStreamer:
    """Turns token ids, pushed one at a time, into text deltas that join up to exactly the decoded text.

    A character outside the vocabulary arrives as several byte tokens; until its last byte is in, decoding shows
    U+FFFD, so the streamer holds back a trailing U+FFFD and never emits half a character (Chinese, emoji). The
    ids continue a prompt whose last token is ``previous`` (see :meth:`Tokenizer.decode_after`)."""

    def __init__(self, tokenizer: Tokenizer, previous: int) -> None:
        self.tokenizer, self.previous, self.ids, self.emitted = tokenizer, previous, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(self.tokenizer.decode_after(self.previous, self.ids).rstrip("\ufffd"))

    def flush(self) -> str:
        """What is left at the end (a genuinely unfinished byte sequence comes out as U+FFFD)."""
        return self._delta(self.tokenizer.decode_after(self.previous, self.ids))

    def _delta(self, text: str) -> str:
        if not text.startswith(self.emitted):  # decoding is prefix-stable with this tokenizer; guard anyway
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta


Prompt = str | Sequence[Message]


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, chat: ChatFormat | None) -> tuple[list[int], tuple[int, ...]]:
    """The ids to continue and the ids that end the answer. Plain text starts after ``<s>``, as every training
    document did, and ends at ``</s>``. With ``chat``, the prompt is a user message (a string) or a conversation
    (messages), put in the chat template with the assistant's turn opened; the reply ends at ``<|end|>`` (or
    ``</s>``: ``ChatFormat.stop_ids``)."""
    if chat is None:
        if not isinstance(prompt, str):
            raise TypeError("a conversation (list of messages) needs chat=ChatFormat(tokenizer)")
        check_encodable(prompt, "the prompt")
        return tokenizer.encode(prompt, bos=True), (tokenizer.eos_id,)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    check_messages(messages, "the prompt")  # a role the template lacks (OpenAI's "developer") was a bare KeyError
    return chat.prompt_ids(messages), chat.stop_ids


def stream_text(
    model: Transformer, tokenizer: Tokenizer, prompt: Prompt, max_new_tokens: int, stop: Sequence[str] = (),
    draft_model: Transformer | None = None, chat: ChatFormat | None = None, **kwargs
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text deltas while it is generated (see :class:`TextStreamer`),
    ending just before the first of the ``stop`` strings; with ``chat``, the assistant's reply to it (see
    :func:`encode_prompt`). Takes the sampling options of :func:`~llmfoundry_pl.inference.generate.generate_steps`;
    with a ``draft_model`` (same tokenizer), tokens come from speculative decoding (and ``draft_tokens``, ``stats``
    of :func:`~llmfoundry_pl.inference.speculative.speculative_stream` apply)."""
    prompt_ids, end_ids = encode_prompt(tokenizer, prompt, chat)
    if draft_model is None:
        ids = generate_stream(model, prompt_ids, max_new_tokens, eos_id=end_ids, **kwargs)
    else:
        ids = speculative_stream(model, draft_model, prompt_ids, max_new_tokens, eos_id=end_ids, **kwargs)
    text = StopStringStreamer(tokenizer, prompt_ids[-1], stop)
    for token_id in ids:
        if delta := text.push(token_id):
            yield delta
        if text.stopped:
            ids.close()  # stop generating
            return
    if tail := text.finish():
        yield tail


class StopStringStreamer:
    """A :class:`TextStreamer` that also ends just before the first of the ``stop`` strings: it holds back a tail
    of text that may be the start of a stop string until the next tokens tell. ``push`` returns the next delta
    (possibly empty) and sets ``stopped`` once a stop string is complete; ``finish`` returns what is left (and sets
    ``stopped`` if the flushed end completed one)."""

    def __init__(self, tokenizer: Tokenizer, previous: int, stop: Sequence[str] = ()) -> None:
        check_stop_strings(stop)
        self.streamer, self.stop = TextStreamer(tokenizer, previous), list(stop)
        self.text, self.emitted, self.stopped = "", 0, False  # text decoded so far; how much of it went out

    def push(self, token_id: int) -> str:
        self.text += self.streamer.push(token_id)
        cut = _first_stop(self.text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._emit(cut)
        # Hold back the longest end of the text that may start a stop string. Only text not yet emitted can (what
        # went out was no such start), which bounds the search: over every length of a long stop string, it took
        # seconds per token (a 300,000-character one, 2.4 s), on the thread that serves every request.
        pending = len(self.text) - self.emitted
        keep = max((k for s in self.stop for k in range(1, min(len(s), pending + 1)) if self.text.endswith(s[:k])),
                   default=0)
        return self._emit(len(self.text) - keep)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.text += self.streamer.flush()
        cut = _first_stop(self.text, self.stop)
        self.stopped = cut is not None  # the flushed tail (a character cut short) completed a stop string
        return self._emit(len(self.text) if cut is None else cut)

    def _emit(self, upto: int) -> str:
        delta, self.emitted = self.text[self.emitted : upto], max(self.emitted, upto)
        return delta


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string starts in ``text``, if any is there."""
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


def generate_text(model: Transformer, tokenizer: Tokenizer, prompt: Prompt, max_new_tokens: int, **kwargs) -> str:
    """The decoded continuation of ``prompt`` (the prompt itself not included): :func:`stream_text`, joined."""
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens, **kwargs))


def generate_text_batch(
    model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Prompt], max_new_tokens: int, stop: Sequence[str] = (),
    chat: ChatFormat | None = None, **kwargs,
) -> list[str]:
    """The continuations of several prompts (with ``chat``, the replies), generated together as one batch (see
    :func:`~llmfoundry_pl.inference.generate.generate_batch`), each cut before its first ``stop`` string."""
    check_stop_strings(stop)
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompts]
    ids = generate_batch(model, [prompt_ids for prompt_ids, _ in encoded], max_new_tokens, eos_id=encoded[0][1],
                         **kwargs)
    texts = [tokenizer.decode_after(prompt_ids[-1], row) for (prompt_ids, _), row in zip(encoded, ids, strict=True)]
    return [text[: _first_stop(text, stop)] for text in texts]
