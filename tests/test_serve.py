"""Serving: the continuous-batching engine against solo generation, and lfpl-serve as a real server process driven
by the official ``openai`` client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from llmfoundry_pl.cli.serve import server_url
from llmfoundry_pl.config import ModelConfig
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.inference import generate_stream
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.serve.engine import Engine, QueueFull, Request, SamplingParams
from llmfoundry_pl.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import run_cli

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

API_KEY = "test-key"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = (bundled_corpus_dir() / "tempest_gut.txt").read_text().splitlines()
    return train_tokenizer([line for line in lines if line], vocab_size=400)


@pytest.fixture(scope="module")
def model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=96)).eval()


def solo(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Greedy tokens of one prompt generated alone, ending at end-of-text as the server's completions do."""
    return list(generate_stream(model, tokenizer.encode(prompt, bos=True), max_tokens, eos_id=tokenizer.eos_id,
                                temperature=0))


def run_engine(engine: Engine, arrivals: dict[int, list[Request]], steps: int) -> None:
    """Drive the engine by hand: before step s, submit arrivals[s]."""
    for s in range(steps):
        for request in arrivals.get(s, []):
            engine.submit(request)
        engine.step()


def make_request(tokenizer, prompt: str, events: list | None = None, **params) -> Request:
    events = [] if events is None else events
    return Request(tokenizer.encode(prompt, bos=True), SamplingParams(**params), (tokenizer.eos_id,), tokenizer,
                   lambda delta, reason: events.append((delta, reason)))


PROMPTS = ["ROMEO:", "Hello there my friend, ", "A", "To be or not to be, that is", "Full fathom five", "Ariel"]


def test_engine_greedy_outputs_equal_solo_generation_under_interleaved_arrivals(model, tokenizer):
    alone = [solo(model, tokenizer, p, 12) for p in PROMPTS]
    requests = [make_request(tokenizer, p, max_tokens=12, temperature=0) for p in PROMPTS]
    # 3 slots for 6 requests arriving at different steps: some wait, rows are freed and reused mid-flight.
    engine = Engine(model, tokenizer, max_batch=3, queue_limit=8)
    run_engine(engine, {0: requests[:1], 2: requests[1:3], 5: requests[3:]}, steps=60)
    assert [r.output_ids for r in requests] == alone
    assert [r.finish_reason for r in requests] == ["length" if len(a) == 12 else "stop" for a in alone]
    assert not engine.running and not engine.waiting


def test_engine_seeded_sampling_does_not_depend_on_the_batch(model, tokenizer):
    def sampled(batch_mates: int) -> list[int]:
        engine = Engine(model, tokenizer, max_batch=4)
        mine = make_request(tokenizer, "ROMEO:", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
        others = [make_request(tokenizer, p, max_tokens=10, temperature=1.0, seed=i) for i, p in
                  enumerate(PROMPTS[1 : 1 + batch_mates])]
        run_engine(engine, {0: others, 1: [mine]}, steps=30)
        return mine.output_ids

    assert sampled(0) == sampled(3)


def test_engine_samples_anew_for_each_unseeded_request(model, tokenizer):
    # Requests without a seed (the OpenAI default) each draw their own sample; with one, the draw repeats.
    engine = Engine(model, tokenizer, max_batch=4)
    unseeded = [make_request(tokenizer, "ROMEO:", max_tokens=12, temperature=1.0) for _ in range(3)]
    seeded = [make_request(tokenizer, "ROMEO:", max_tokens=12, temperature=1.0, seed=5) for _ in range(2)]
    run_engine(engine, {0: unseeded + seeded[:1], 1: seeded[1:]}, steps=30)
    assert len({tuple(r.output_ids) for r in unseeded}) == 3  # a fixed default seed gave three equal samples
    assert seeded[0].output_ids == seeded[1].output_ids


@pytest.mark.parametrize("options", [{"top_k": 5}, {"min_p": 0.2}, {"top_p": 0.8}])
def test_engine_samples_as_generate_does_with_each_sampling_option(model, tokenizer, options):
    # Same seed, same options: the engine's draw equals lfpl-generate's, so each option reaches the sampler.
    prompt = tokenizer.encode("ROMEO:", bos=True)
    expected = list(generate_stream(model, prompt, 12, eos_id=tokenizer.eos_id, temperature=1.0, seed=3, **options))
    request = make_request(tokenizer, "ROMEO:", max_tokens=12, temperature=1.0, seed=3, **options)
    run_engine(Engine(model, tokenizer, max_batch=2), {0: [request]}, steps=15)
    assert request.output_ids == expected


def test_engine_stop_strings_timeouts_cancellation_and_queue_limit(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, queue_limit=2)
    free = make_request(tokenizer, "ROMEO:", max_tokens=20, temperature=0)
    run_engine(engine, {0: [free]}, steps=25)
    text = tokenizer.decode(free.output_ids)
    stop = text[5:7]  # a stop string that occurs in the greedy text
    events = []
    stopped = make_request(tokenizer, "ROMEO:", events, max_tokens=20, temperature=0, stop=[stop])
    run_engine(engine, {0: [stopped]}, steps=25)
    assert "".join(d for d, _ in events) == text[: text.index(stop)] and events[-1][1] == "stop"

    late = make_request(tokenizer, "ROMEO:", max_tokens=20, temperature=0, timeout_s=60)
    run_engine(engine, {0: [late]}, steps=3)
    late.deadline = time.monotonic() - 1  # its time runs out mid-generation
    engine.step()
    assert late.finish_reason == "length" and len(late.output_ids) == 5 and not engine.running  # 2 + 1 + 1, then 1
    waited_too_long = make_request(tokenizer, "ROMEO:", max_tokens=20, temperature=0, timeout_s=0.0)
    run_engine(engine, {0: [waited_too_long]}, steps=1)
    assert waited_too_long.finish_reason == "length" and waited_too_long.output_ids == []  # never admitted

    cancelled = make_request(tokenizer, "ROMEO:", max_tokens=50, temperature=0)
    run_engine(engine, {0: [cancelled]}, steps=3)
    assert engine.running == [cancelled]
    engine.cancel(cancelled)
    engine.step()
    assert not engine.running and cancelled.finish_reason is None  # its slot is free; nothing more is sent

    engine.submit(make_request(tokenizer, "A", max_tokens=1))
    engine.submit(make_request(tokenizer, "B", max_tokens=1))
    with pytest.raises(QueueFull):
        engine.submit(make_request(tokenizer, "C", max_tokens=1))


# ----------------------------------------------------------------------------------------------------------------
# lfpl-serve as users run it
# ----------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model, tokenizer):
    from llmfoundry_pl.interop import save_safetensors

    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    save_safetensors(model, tokenizer, folder)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmfoundry_pl.serve", f"ckpt_path={folder}", f"port={port}", f"api_key={API_KEY}",
         "max_batch=4", "queue_limit=16", "max_body_bytes=4000", "device=cpu",
         "cors_origins=['http://localhost:3000']"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=1)
            break
        # OSError: a timeout too. The port is bound before the model loads, so a check that connects meanwhile
        # waits for its answer, and under load (other tests beside) it timed out: TimeoutError failed the fixture.
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read()) from None
            time.sleep(0.2)
    else:
        raise AssertionError("lfpl-serve did not answer /health within the minute and more it was given")
    yield base, folder.name
    proc.terminate()
    proc.wait(timeout=30)


def client(base: str):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)


def post(base: str, path: str, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}{path}", data, headers), timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_openai_client_completions_chat_streaming_and_models(server, model, tokenizer):
    base, name = server
    c = client(base)
    assert [m.id for m in c.models.list().data] == [name]
    tokens = solo(model, tokenizer, "ROMEO:", 10)
    expected, reason = tokenizer.decode(tokens), "length" if len(tokens) == 10 else "stop"
    done = c.completions.create(model=name, prompt="ROMEO:", max_tokens=10, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == reason
    assert done.usage.completion_tokens == len(tokens)
    assert done.usage.prompt_tokens == len(tokenizer.encode("ROMEO:", bos=True))
    chunks = list(c.completions.create(model=name, prompt="ROMEO:", max_tokens=10, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected and chunks[-1].choices[0].finish_reason == reason
    assert all(ch.usage is None for ch in chunks)  # usage only when asked for, as OpenAI's
    # as OpenAI's: asked for, the usage comes in a last chunk with no choices (clients look for it there)
    counted = list(c.completions.create(model=name, prompt="ROMEO:", max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == len(tokens)
    assert counted[-2].choices[0].finish_reason == reason and all(ch.usage is None for ch in counted[:-1])

    messages = [{"role": "user", "content": "Which play is this passage from?"}]
    reply = c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
    streamed = list(c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                              stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.object == "chat.completion"


def test_request_forms_other_clients_send(server, model, tokenizer):
    base, name = server
    c = client(base)
    greedy = tokenizer.decode(solo(model, tokenizer, "ROMEO:", 6))
    # LangChain and others send the fields of features they do not use, at values that ask for nothing.
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": None, "echo": False,
               "tool_choice": "auto", "user": "someone"}
    code, body, _ = post(base, "/v1/completions", {"model": name, "prompt": "ROMEO:", "max_tokens": 6,
                                                   "temperature": 0, **neutral})
    assert code == 200 and body["choices"][0]["text"] == greedy
    top_1 = c.completions.create(model=name, prompt="ROMEO:", max_tokens=6, temperature=1.0, extra_body={"top_k": 1})
    assert top_1.choices[0].text == greedy  # vLLM's top_k (a draw among one token: the greedy one)

    question = "Which play is this passage from?"
    reply = c.chat.completions.create(model=name, messages=[{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": question}],
                                      max_tokens=8, temperature=0).choices[0].message.content
    # OpenAI's newer forms: max_completion_tokens (the limit of a chat reply), the developer role, and content as a
    # list of text parts
    newer = c.chat.completions.create(
        model=name, max_completion_tokens=8, temperature=0,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": question}]}])
    assert newer.choices[0].message.content == reply and newer.usage.completion_tokens <= 8


def test_concurrent_greedy_requests_get_their_solo_outputs(server, model, tokenizer):
    base, name = server
    c = client(base)
    prompts = PROMPTS * 2  # 12 clients on 4 slots: the rest wait in the queue
    alone = [tokenizer.decode(solo(model, tokenizer, p, 16)) for p in prompts]
    results: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        stream = c.completions.create(model=name, prompt=prompts[i], max_tokens=16, temperature=0, stream=True)
        results[i] = "".join(ch.choices[0].text for ch in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.01 * (i % 3))  # staggered arrivals
    for t in threads:
        t.join(timeout=120)
    assert results == alone


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": "M"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "M", "prompt": "hi"}, 400, "messages"),
    ("/v1/completions", {"model": "M", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", b'{"model": "M", "prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 500, "max_tokens": 2}, 400, "max_completion_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "seed": 2**64}, 400, "seed"),  # over torch's seeds
    ("/v1/completions", {"model": "M", "prompt": "hi " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": "other", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}, 400, "messages.0.content.0.type"),
    ("/v1/completions", b"[]", 400, None),
    # an emoji cut in two, as JavaScript's JSON.stringify sends it (a lone \\ud83d): the tokenizer's 500
    ("/v1/completions", {"model": "M", "prompt": "表情\ud83d"}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "表情\ud83d"}]}, 400,
     "messages.0.content"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 4, "stop": ["A", ""]}, 400, "stop"),
    # each token is checked against each stop string on the engine's one thread: 50,000 slowed every stream 25-fold
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 4, "stop": list("ABCDE")}, 400, "stop"),
    # OpenAI features this server lacks are refused, not ignored
    ("/v1/completions", {"model": "M", "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}],
                              "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    # strict types: these were taken as max_tokens=1, temperature 0.5 and a stream
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "n": True}, 400, "n"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    # Starlette's own refusals, which answered {"detail": ...}: a body that is not UTF-8, a path that is not there
    ("/v1/completions", b'{"model": "M", "prompt": "\xff\xfe"}', 400, None),
    ("/v1/embeddings", {"model": "M", "input": "hi"}, 404, None),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param):
    base, name = server
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": name}
    elif isinstance(body, bytes):
        body = body.replace(b'"M"', json.dumps(name).encode())
    code, error, _ = post(base, path, body)
    assert code == status and error["error"]["param"] == param and error["error"]["message"]
    assert urllib.request.urlopen(f"{base}/health").status == 200  # still serving


def test_nulls_mean_the_defaults_and_top_k_minus_one_means_no_limit(server):
    """As OpenAI's API reads null (its clients send it), and vLLM top_k=-1; both were a 400."""
    base, name = server
    ask = {"model": name, "prompt": "ROMEO:", "max_tokens": 6, "seed": 7}
    code, plain, _ = post(base, "/v1/completions", ask)
    assert code == 200
    for extra in ({"temperature": None, "top_p": None, "n": None, "stream": None, "stream_options": None},
                  {"top_k": -1}, {"top_k": 0}):
        code, same, _ = post(base, "/v1/completions", {**ask, **extra})
        assert code == 200 and same["choices"][0]["text"] == plain["choices"][0]["text"], extra
    # another method on an endpoint: OpenAI's error object too, with the methods it takes
    wrong = urllib.request.Request(f"{base}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(wrong, timeout=30)
    assert answer.value.code == 405 and answer.value.headers["allow"] == "POST"
    assert json.loads(answer.value.read())["error"]["message"] == "GET is not allowed on /v1/completions"


def test_without_max_tokens_a_request_fills_what_the_context_leaves(server, tokenizer):
    # Before, a missing max_tokens meant default_max_tokens (128), and any request in this 96-token context was
    # refused "plus max_tokens (128) exceed the model's context": blaming a field the client never sent.
    base, name = server
    prompt = "To be or not to be, that is the question " * 3
    prompt_tokens = len(tokenizer.encode(prompt, bos=True))
    code, body, _ = post(base, "/v1/completions", {"model": name, "prompt": prompt, "temperature": 0})
    assert code == 200 and body["usage"]["prompt_tokens"] == prompt_tokens < 96
    assert body["choices"][0]["finish_reason"] == "stop" or body["usage"]["total_tokens"] == 96


def test_api_key_body_limit_metrics_and_playground(server):
    base, name = server
    code, error, _ = post(base, "/v1/completions", {"model": name, "prompt": "hi"}, key=None)
    assert code == 401 and error["error"]["type"] == "authentication_error"
    code, _, _ = post(base, "/v1/completions", {"model": name, "prompt": "hi"}, key="wrong")
    assert code == 401
    code, error, _ = post(base, "/v1/completions", {"model": name, "prompt": "x" * 5000})  # limit: 4000 bytes
    assert code == 413
    # the same body sent in chunks, with no Content-Length to check: counted as it arrives
    chunked = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    body = json.dumps({"model": name, "prompt": "x" * 5000}).encode()
    chunked.request("POST", "/v1/completions", body=(body[i : i + 1000] for i in range(0, len(body), 1000)),
                    headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
                    encode_chunked=True)
    response = chunked.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["message"].startswith("request body")
    # a browser's pre-flight carries no key: it got the key's 401 without CORS headers, and no page could call
    origin = {"Origin": "http://localhost:3000"}
    preflight = urllib.request.Request(f"{base}/v1/chat/completions", method="OPTIONS", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    answer = urllib.request.urlopen(preflight, timeout=30)
    assert answer.status == 200 and answer.headers["access-control-allow-origin"] == origin["Origin"]
    refused = urllib.request.Request(f"{base}/v1/completions", data=b"{}", headers=origin)
    with pytest.raises(urllib.error.HTTPError) as answer:  # and a page can read why it was refused
        urllib.request.urlopen(refused, timeout=30)
    assert answer.value.code == 401 and answer.value.headers["access-control-allow-origin"] == origin["Origin"]
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    for metric in ("lfpl_requests_total", "lfpl_generated_tokens_total", "lfpl_failed_requests_total",
                   "lfpl_tokens_per_second", "lfpl_queue_depth", "lfpl_running_batch_size"):
        assert f"\n{metric} " in metrics
    page = urllib.request.urlopen(f"{base}/").read().decode()
    assert "/v1/chat/completions" in page and "<script>" in page


def test_playground_streams_a_reply_in_a_real_browser(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs a Chromium browser (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    base, name = server
    question = "Which play is this passage from?"
    expected = client(base).chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                    max_tokens=12, temperature=0).choices[0].message.content
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{base}/")
        page.fill("#key", API_KEY)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "12")
        page.fill("#prompt", question)
        # Stop is enabled only while the reply streams, which can be a few milliseconds: an observer records that
        # it was, rather than a poll that might fall before and after it.
        page.evaluate("""const stop = document.getElementById('stop');
                         new MutationObserver(() => { if (!stop.disabled) window.streamed = true; })
                             .observe(stop, {attributes: true})""")
        page.click("#send")
        page.wait_for_function("window.streamed === true && document.getElementById('send').disabled === false",
                               timeout=60_000)  # streaming began, and ended
        page.screenshot(path=str(tmp_path / "playground.png"))
        reply = page.text_content("#log .assistant")
        model_shown = page.text_content("#model")
        server_shown = page.text_content("#server")
        browser.close()
    assert reply == f"model: {expected}" and model_shown == name and "context 96 tokens" in server_shown
    assert (tmp_path / "playground.png").stat().st_size > 1000


def test_a_client_that_disconnects_frees_its_slot(server):
    base, name = server
    body = json.dumps({"model": name, "prompt": "ROMEO:", "max_tokens": 80, "temperature": 0, "stream": True})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    response = urllib.request.urlopen(urllib.request.Request(f"{base}/v1/completions", body.encode(), headers))
    assert response.readline().startswith(b"data: ")
    response.close()  # hang up mid-stream

    def running() -> int:
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        return int(float(text.split("\nlfpl_running_batch_size ")[1].split()[0]))

    deadline = time.monotonic() + 20
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running() == 0


def test_a_client_that_hangs_up_before_its_whole_answer_frees_its_slot(model, tokenizer):
    # A request without "stream" waits for its whole answer; its client hanging up must cancel it as a streaming
    # one's does. Before, it ran to max_tokens. A real server (uvicorn) in this process, with a model slowed to
    # 20 ms a step so that the answer takes longer than the hang-up.
    import uvicorn

    from llmfoundry_pl.config import ServeConfig
    from llmfoundry_pl.serve.app import create_app

    engine = Engine(model, tokenizer, max_batch=2)
    engine.model = slowed_model(model, seconds=0.02)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServeConfig(ckpt_path="x"), "m"), port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/completions", body=json.dumps(
            {"model": "m", "prompt": "ROMEO:", "max_tokens": 80, "temperature": 0}),
            headers={"Content-Type": "application/json"})
        time.sleep(0.3)  # a dozen tokens in
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.running and engine.tokens_total < 60  # cancelled, not run to its 80 tokens
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_bad_seed_fails_at_submit_and_the_running_requests_go_on(model, tokenizer):
    # The engine's own check, for a caller that is not the HTTP API (which refuses the seed first): a seed torch
    # cannot take used to raise inside the step that admitted it, and failed every request running with it.
    engine = Engine(model, tokenizer, max_batch=2)
    running = make_request(tokenizer, "ROMEO:", max_tokens=6, temperature=0)
    engine.submit(running)
    engine.step()
    with pytest.raises((ValueError, RuntimeError)):
        engine.submit(make_request(tokenizer, "A", max_tokens=6, temperature=1.0, seed=2**64))
    run_engine(engine, {}, steps=8)
    assert running.finish_reason in ("stop", "length") and running.output_ids == solo(model, tokenizer, "ROMEO:", 6)


def slowed_model(model, seconds: float):
    """``model`` taking ``seconds`` longer for each forward pass, as a larger one would."""

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return model(*args, **kwargs)

    forward.config = model.config
    return forward


def test_queue_full_is_429_with_retry_after(model, tokenizer):
    from fastapi.testclient import TestClient

    from llmfoundry_pl.config import ServeConfig
    from llmfoundry_pl.serve.app import create_app

    engine = Engine(model, tokenizer, max_batch=1, queue_limit=1)

    def full(request):
        raise QueueFull("1 requests are already waiting")

    engine.submit = full
    with TestClient(create_app(engine, ServeConfig(ckpt_path="x"), "m")) as http:
        response = http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def failing_model(model, fail_calls: set[int]):
    """``model``, except that the forward passes numbered in ``fail_calls`` (from 1) run out of memory."""
    calls = 0

    def forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls in fail_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return model(*args, **kwargs)

    forward.config = model.config
    return forward


def wait_for(*requests: Request, deadline: float) -> None:
    """Until each of ``requests`` has finished (or ``deadline`` has passed)."""
    while any(r.finish_reason is None for r in requests) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(model, tokenizer, capsys):
    engine = Engine(model, tokenizer, max_batch=2)
    engine.model = failing_model(model, {3})  # 1, 2: the prefills of a and b; 3: their first decode step
    events = {name: [] for name in "abc"}
    a, b, c = (make_request(tokenizer, p, events[n], max_tokens=8, temperature=0)
               for n, p in (("a", "ROMEO:"), ("b", "A"), ("c", "ROMEO:")))
    engine.submit(a)
    engine.submit(b)  # both before the engine starts: forward passes 1 and 2 are their prefills
    engine.start()
    try:
        deadline = time.monotonic() + 30
        wait_for(a, b, deadline=deadline)
        # before, the engine thread died here, and every request, these and later ones, waited forever
        engine.submit(c)
        wait_for(c, deadline=deadline)
    finally:
        engine.stop()
    assert (a.finish_reason, b.finish_reason) == ("error", "error") and events["a"][-1] == ("", "error")
    assert a.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert c.output_ids == solo(model, tokenizer, "ROMEO:", 8) and not engine.running
    assert "OutOfMemoryError" in capsys.readouterr().err  # the traceback, for whoever runs the server


def test_a_request_whose_sampling_fails_fails_alone(model, tokenizer, capsys):
    # Raised out of the step, one request's failure (a top_p of 1e-300 dropped every token) failed every request
    # beside it, and those that had finished in that step got a second, final event of error
    engine = Engine(model, tokenizer, max_batch=3)
    events = []
    broken = make_request(tokenizer, "A", max_tokens=8, temperature=0)
    broken.on_event = lambda delta, reason: (_ for _ in ()).throw(RuntimeError("boom")) if delta else None
    short = make_request(tokenizer, "ROMEO:", events, max_tokens=3, temperature=0)
    tiny_p = make_request(tokenizer, "ROMEO:", max_tokens=8, temperature=1.0, top_p=1e-300)  # the most likely kept
    run_engine(engine, {0: [short, broken, tiny_p]}, steps=10)
    assert broken.finish_reason == "error" and broken.error == "RuntimeError: boom" and engine.failed_total == 1
    assert short.output_ids == solo(model, tokenizer, "ROMEO:", 3) and [r for _, r in events if r] == ["length"]
    assert tiny_p.finish_reason == "length" and tiny_p.output_ids == solo(model, tokenizer, "ROMEO:", 8)
    assert not engine.running and "RuntimeError: boom" in capsys.readouterr().err


def test_a_stop_string_the_flushed_end_completes_is_the_final_events_reason(model, tokenizer):
    # finish_reason said "stop", the client's last event (and the HTTP answer) "length"
    engine, events = Engine(model, tokenizer), []
    request = make_request(tokenizer, "A", events, max_tokens=2, stop=["\ufffd"])
    for token in tokenizer.encode("A 表")[:-1]:  # the last of its three byte tokens missing: flushed as U+FFFD
        request.text.push(token)
    engine._finish(request, "length")
    assert request.finish_reason == "stop" and events[-1] == ("", "stop")


def test_a_cancelled_waiting_request_gives_up_its_place_in_the_queue(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, queue_limit=2)  # not started: every request waits
    first, second = make_request(tokenizer, "A", max_tokens=2), make_request(tokenizer, "B", max_tokens=2)
    engine.submit(first)
    engine.submit(second)
    with pytest.raises(QueueFull):
        engine.submit(make_request(tokenizer, "C", max_tokens=2))
    engine.cancel(first)  # its client hung up while it waited: it was 429 for others until a slot came
    engine.submit(make_request(tokenizer, "C", max_tokens=2))
    assert len(engine.waiting) == 2 and first not in engine.waiting


def test_a_prompt_whose_prefill_fails_fails_alone(model, tokenizer, capsys):
    """Out of memory on one long prompt's pass ended every running request with it; their cache rows are intact."""
    engine = Engine(model, tokenizer, max_batch=2)
    engine.model = failing_model(model, {2})  # 1: a's prefill; 2: b's prefill
    a, b = (make_request(tokenizer, prompt, max_tokens=8, temperature=0) for prompt in ("ROMEO:", "A"))
    engine.submit(a)
    engine.submit(b)  # both before the engine starts: forward passes 1 and 2 are their prefills
    engine.start()
    try:
        wait_for(a, b, deadline=time.monotonic() + 30)
    finally:
        engine.stop()
    assert b.finish_reason == "error" and b.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert a.finish_reason in ("stop", "length") and a.output_ids == solo(model, tokenizer, "ROMEO:", 8)
    assert engine.failed_total == 1 and not engine.running and "OutOfMemoryError" in capsys.readouterr().err


def test_a_failed_generation_is_a_500_or_an_error_event(model, tokenizer):
    from fastapi.testclient import TestClient

    from llmfoundry_pl.config import ServeConfig
    from llmfoundry_pl.serve.app import create_app

    engine = Engine(model, tokenizer, max_batch=2)
    engine.model = failing_model(model, {1, 2})  # each request's prefill
    body = {"model": "m", "prompt": "hi", "max_tokens": 4}
    with TestClient(create_app(engine, ServeConfig(ckpt_path="x"), "m")) as http:
        whole = http.post("/v1/completions", json=body)
        streamed = http.post("/v1/completions", json={**body, "stream": True}).text
        after = http.post("/v1/completions", json={**body, "temperature": 0})
        metrics = http.get("/metrics").text
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    assert whole.json()["error"]["message"] == "generation failed: OutOfMemoryError: CUDA out of memory. Tried to " \
                                               "allocate 2.00 GiB"
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["type"] == "server_error" and streamed.endswith("data: [DONE]\n\n")
    assert after.status_code == 200  # the server goes on
    assert "\nlfpl_failed_requests_total 2\n" in metrics and "\nlfpl_requests_total 3\n" in metrics


def test_a_model_with_nan_weights_answers_500_saying_so(model, tokenizer):
    from fastapi.testclient import TestClient

    from llmfoundry_pl.config import ServeConfig
    from llmfoundry_pl.serve.app import create_app

    diverged = Transformer(model.config).eval()
    diverged.load_state_dict({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()})
    with TestClient(create_app(Engine(diverged, tokenizer), ServeConfig(ckpt_path="x"), "m")) as http:
        greedy = http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4, "temperature": 0})
    message = greedy.json()["error"]["message"]
    assert greedy.status_code == 500 and message.startswith("generation failed: the model's next-token scores are NaN")


def test_serve_refuses_a_port_that_is_no_tcp_port_a_timeout_that_is_no_time_and_an_empty_key():
    from llmfoundry_pl.config import ConfigError, ServeConfig

    with pytest.raises(ConfigError, match="port=70000 is not a TCP port: give one from 1 to 65535"):
        ServeConfig(ckpt_path="x", port=70000)
    with pytest.raises(ConfigError, match="request_timeout_s=0 must be positive"):  # cut every generation short
        ServeConfig(ckpt_path="x", request_timeout_s=0)
    with pytest.raises(ConfigError, match="api_key is empty .* which would leave /v1/ open to anyone"):
        ServeConfig(ckpt_path="x", api_key="")  # LFPL_API_KEY=$UNSET_VARIABLE


def test_a_body_sent_without_its_json_content_type_is_told_so(server):
    base, name = server
    data = json.dumps({"model": name, "prompt": "hi", "max_tokens": 2}).encode()  # curl -d without -H
    request = urllib.request.Request(f"{base}/v1/completions", data, {"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=30)
    assert answer.value.code == 400 and "Content-Type: application/json" in json.loads(answer.value.read())[
        "error"]["message"]


def test_serve_cli_mistakes_are_one_line(tmp_path):
    proc = run_cli("serve", "ckpt_path=missing.ckpt", cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2 and "ckpt_path=missing.ckpt does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and Path(tmp_path).exists()
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use: said before the model loads
        port = taken.getsockname()[1]
        proc = run_cli("serve", "ckpt_path=missing.ckpt", f"port={port}", cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another port=" in proc.stderr


def test_the_address_printed_for_an_ipv6_host_is_a_url():
    assert server_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert server_url("::1", 8000) == "http://[::1]:8000"  # was http://::1:8000, which no browser opens
