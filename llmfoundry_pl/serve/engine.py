"""Continuous batching: one thread owns the model and advances every running request by one token per step.

The naive server generates one request at a time, so a second user waits for the first to finish. Static batching
waits to collect a batch and then holds every row until the longest is done. Continuous batching (Yu et al., 2022,
"Orca") does neither: each step decodes one token for every running request together — one forward pass of B rows
costs little more than one row, because at batch 1 the time goes to reading the weights — a new request joins at
the next step after its own prefill, and a finished one leaves at once, freeing its slot.

How the rows stay independent:
- KV cache: preallocated, one row per slot (``max_batch`` rows of the model's context). The running requests hold
  rows 0 .. B-1; when one finishes, the last row moves into its place, so a step always reads the first B rows.
- Positions: each row continues at its own length (``Transformer.forward`` with a tensor ``start_pos``) and
  attends to its own slots only, so its tokens are the ones it would get alone (greedy: identical — tested).
- Sampling: each request has its own settings and its own seeded generator.

Requests talk to the outside through a callback ``on_event(delta, finish_reason)``, called on the engine thread;
the server turns it into an asyncio queue per request.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmfoundry_pl.config import ConfigError, check_sampling, one_line
from llmfoundry_pl.inference.generate import EndIds, end_ids
from llmfoundry_pl.inference.kv_cache import new_kv_cache
from llmfoundry_pl.inference.sampling import check_finite, sample_next, seeded_generator
from llmfoundry_pl.inference.text import StopStringStreamer
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer


class QueueFull(Exception):
    """More requests are waiting than the engine's queue limit allows: the client should retry later."""


@dataclass
class SamplingParams:
    """A request's own generation settings (the OpenAI fields, and vLLM's top_k and min_p)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    timeout_s: float | None = None


class Request:
    """One generation: its prompt, settings, output so far, and how it reports (``on_event(delta, finish_reason)``:
    text deltas with finish_reason None, then one last call with OpenAI's reason: stop (end token or stop string)
    or length (max_tokens, the context, or the request's timeout); or ``error`` (not OpenAI's) when its step
    failed, with what went wrong in ``error``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, ends: EndIds, tokenizer: Tokenizer,
                 on_event: Callable[[str, str | None], None]) -> None:
        self.prompt_ids, self.params, self.end_ids, self.on_event = prompt_ids, params, end_ids(ends), on_event
        self.output_ids: list[int] = []
        self.text = StopStringStreamer(tokenizer, prompt_ids[-1], params.stop)
        self.generator: torch.Generator | None = None  # made on the engine's device by Engine.submit
        self.cancelled = False
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.deadline = None if params.timeout_s is None else time.monotonic() + params.timeout_s

    @property
    def length(self) -> int:
        """Tokens in its KV-cache row: the prompt and every output token but the last (not yet fed back)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


class Engine:
    """The continuous-batching loop over ``model`` (in eval mode, on its device). ``step()`` runs one iteration
    (admit waiting requests, decode one token for all running ones); ``start()`` runs it on a background thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 16, queue_limit: int = 64) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.queue_limit = max_batch, queue_limit
        self.cache = new_kv_cache(model, batch_size=max_batch)
        self.device = model.tok_embeddings.weight.device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] owns cache row i
        self.wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters for /metrics.
        self.requests_total = 0
        self.tokens_total = 0
        self.failed_total = 0  # requests ended by a failed step
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the steps of the last 10 s

    # ---------------------------------------------------------------------------------------------------------
    # The outside: submit, cancel, start, stop (any thread)
    # ---------------------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request (checked by the caller: prompt + max_tokens fit the context); QueueFull past the limit.
        Its settings are checked here, on the caller's thread: one that fails inside a step would fail every request
        running with it."""
        p = request.params
        check_sampling(p.temperature, p.top_k, p.top_p, p.min_p, 1.0)
        request.generator = seeded_generator(self.device, p.seed)
        with self.wakeup:
            if len(self.waiting) >= self.queue_limit:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.requests_total += 1
            self.wakeup.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): a running one's slot is freed at the next step; a waiting one
        leaves the queue at once (it held a place of queue_limit until a slot came, and others were answered 429)."""
        request.cancelled = True
        with self.wakeup:
            if request in self.waiting:
                self.waiting.remove(request)
            self.wakeup.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lfpl-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self._stopping = True
            self.wakeup.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 seconds."""
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - 10:
            self.recent.popleft()
        # A copy first (list() of a deque runs without yielding to other threads): the engine's thread appends to it
        # while /metrics reads it, and iterating it directly raised "deque mutated during iteration".
        return sum(n for _, n in list(self.recent)) / 10

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not (self._stopping or self.waiting or self.running):
                    self.wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # out of memory, NaN probabilities from a diverged model, a bug, ...
                # The thread must live on: if it died, every request, running or still to come, would wait forever.
                self._fail(self.running, error)
                self.running.clear()  # their cache rows are free: the next prefill overwrites them

    def _fail(self, requests: list[Request], error: Exception) -> None:
        """End ``requests`` (the failed step was theirs) with finish_reason ``error``; the others go on. Called while
        handling ``error``, whose traceback it prints for whoever runs the server."""
        traceback.print_exc()
        reason = one_line(error, 200)
        what = reason if isinstance(error, ConfigError) else f"{type(error).__name__}: {reason}"  # ours say it all
        # one that finished in the step that failed has had its answer: a second, final event of error miscounted it
        requests = [r for r in requests if r.finish_reason is None]
        self.failed_total += len(requests)
        for request in requests:
            request.error = what
            request.finish_reason = "error"
            request.on_event("", "error")

    # ---------------------------------------------------------------------------------------------------------
    # One iteration (the engine thread)
    # ---------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill, first token), then decode one token for every running
        request in one forward pass, then let finished requests go."""
        while len(self.running) < self.max_batch:
            with self.wakeup:
                request = self.waiting.popleft() if self.waiting else None
            if request is None:
                break
            if request.cancelled:
                continue
            if request.deadline is not None and time.monotonic() > request.deadline:
                self._finish(request, "length")  # its time ran out while it waited: nothing generated
            else:
                self._prefill(request)
        self._release_finished()
        if not self.running:
            return
        tokens = torch.tensor([[r.output_ids[-1]] for r in self.running], device=self.device)  # (B, 1)
        start_pos = torch.tensor([r.length for r in self.running], device=self.device)  # (B,)
        logits = self.model(tokens, self.cache, start_pos)[:, -1]  # (B, V)
        for row, request in enumerate(self.running):
            self._accept_or_fail(request, logits[row : row + 1])
        self.recent.append((time.monotonic(), len(self.running)))
        self._release_finished()

    def _prefill(self, request: Request) -> None:
        """Run the prompt into the next free cache row and take the first token."""
        row = len(self.running)
        try:
            tokens = torch.tensor([request.prompt_ids], device=self.device)
            logits = self.model(tokens, [_Row(layer, row) for layer in self.cache], 0)[:, -1]
            check_finite(logits, self.model)  # NaN weights: a 500 saying so, not greedy answers of token 0s
        except Exception as error:  # this prompt's pass alone (out of memory on a long one): it failed every request
            self._fail([request], error)
            return
        self.running.append(request)
        self._accept_or_fail(request, logits)

    def _accept_or_fail(self, request: Request, logits: torch.Tensor) -> None:
        """:meth:`_accept`, a failure of which (its own sampling settings) fails this request alone: raised out of
        the step, it failed every request running beside it."""
        try:
            self._accept(request, logits)
        except Exception as error:  # noqa: BLE001 - reported to the request's client and printed, as in _loop
            self._fail([request], error)  # its row is let go with the finished ones

    def _accept(self, request: Request, logits: torch.Tensor) -> None:
        """Sample the request's next token from its (1, V) logits and report it, or finish the request."""
        p = request.params
        token = int(sample_next(logits, request.generator, p.temperature, p.top_k, p.top_p, p.min_p)[0])
        self.tokens_total += 1
        if token in request.end_ids:
            return self._finish(request, "stop")
        request.output_ids.append(token)
        if delta := request.text.push(token):
            request.on_event(delta, None)
        if request.text.stopped:
            return self._finish(request, "stop")
        full = request.length >= self.model.config.max_seq_len  # no cache slot left to feed this token back
        if len(request.output_ids) >= p.max_tokens or full:
            return self._finish(request, "length")
        if request.deadline is not None and time.monotonic() > request.deadline:
            return self._finish(request, "length")  # past its timeout: cut short, as by max_tokens

    def _finish(self, request: Request, reason: str) -> None:
        if tail := request.text.finish():
            request.on_event(tail, None)
        request.finish_reason = "stop" if request.text.stopped else reason  # the tail may complete a stop string
        request.on_event("", request.finish_reason)

    def _release_finished(self) -> None:
        """Drop finished and cancelled requests; the last running row moves into each freed row."""
        row = 0
        while row < len(self.running):
            request = self.running[row]
            if request.finish_reason is None and not request.cancelled:
                row += 1
                continue
            last = len(self.running) - 1
            if row != last:
                moved = self.running[last]
                for layer in self.cache:  # copy the slots the moved request has filled
                    layer.k[row, : moved.length] = layer.k[last, : moved.length]
                    layer.v[row, : moved.length] = layer.v[last, : moved.length]
                self.running[row] = moved
            self.running.pop()


class _Row:
    """One row of a layer's KV cache, seen as a batch-of-one cache: a prompt's prefill writes straight into the
    slot it will decode from."""

    def __init__(self, layer, row: int) -> None:
        self.layer, self.row = layer, row

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.size(1)
        self.layer.k[self.row, start_pos:end], self.layer.v[self.row, start_pos:end] = k[0], v[0]
        return self.layer.k[self.row : self.row + 1, :end], self.layer.v[self.row : self.row + 1, :end]
