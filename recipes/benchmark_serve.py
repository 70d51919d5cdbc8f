"""How much continuous batching buys: the same load against lfpl-serve with 16 slots and with 1 slot.

    python recipes/benchmark_serve.py                       # tiny preset, random weights: ~2 min on a 2-core CPU
    python recipes/benchmark_serve.py --ckpt outputs/.../last.ckpt --clients 16 --requests 128 --max-tokens 64
    python recipes/benchmark_serve.py --soak 60 --clients 64     # load test: 5xx, hung requests, memory

Starts the server on loopback (a real ``lfpl-serve`` process), runs ``--clients`` concurrent streaming clients
(the official ``openai`` client, one thread each) until ``--requests`` requests of ``--max-tokens`` new tokens
(fewer where prompt and reply would pass the model's context) are done, and prints time to first
token (p50, p95), inter-token latency (p50), aggregate generated tokens/s and failed requests. Then the same load
against a server that decodes one request at a time (``max_batch=1``: requests wait in its queue), and the ratio of
the two aggregate rates. The last line is one JSON object with the figures.

Without ``--ckpt`` the model is the ``tiny`` preset with random weights and the bundled corpus's tokenizer: speed
does not depend on the weights, and greedy decoding (``temperature=0``) of random weights rarely stops early.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROMPTS = ["ROMEO:", "To be, or not to be", "Full fathom five thy father lies", "If music be the food of love"]


def tiny_model_folder(out: Path) -> Path:
    """The tiny preset with random weights, saved as a model folder lfpl-serve loads."""
    import torch
    from hydra import compose, initialize_config_module

    from llmfoundry_pl.cli.common import to_dataclass
    from llmfoundry_pl.config import DataConfig, ModelConfig, register_configs
    from llmfoundry_pl.data import prepare_corpus
    from llmfoundry_pl.interop import save_safetensors
    from llmfoundry_pl.model import Transformer

    register_configs()
    with initialize_config_module(config_module="llmfoundry_pl.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hardware=cpu"])
    tokenizer, _ = prepare_corpus(to_dataclass(cfg.data, DataConfig))  # cached after the first run
    model_cfg = to_dataclass(cfg.model, ModelConfig)
    model_cfg.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    folder = out / "tiny"
    save_safetensors(Transformer(model_cfg), tokenizer, folder)
    return folder


def start_server(model: str, max_batch: int, queue_limit: int) -> tuple[subprocess.Popen, str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmfoundry_pl.serve", f"ckpt_path={model}", f"port={port}",
                             f"max_batch={max_batch}", f"queue_limit={queue_limit}", "device=cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            name = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=1).read())["data"][0]["id"]
            return proc, base, name
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"lfpl-serve did not start: {proc.stderr.read()}") from None
            time.sleep(0.2)
    raise SystemExit("lfpl-serve did not answer within 2 minutes")


def tokens_that_fit(base: str, name: str, max_tokens: int) -> int:
    """``max_tokens``, or fewer where the longest prompt and its reply would pass the model's context: the server
    refuses such a request (400), so a short-context model measured nothing but refusals (a 32-token model under
    --soak: half the requests). The server tells its context (``/health``) and each prompt's length (``usage``)."""
    context = json.loads(urllib.request.urlopen(f"{base}/health", timeout=10).read())["context"]
    longest = 0
    for prompt in PROMPTS:
        body = json.dumps({"model": name, "prompt": prompt, "max_tokens": 1}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        usage = json.loads(urllib.request.urlopen(request, timeout=60).read())["usage"]
        longest = max(longest, usage["prompt_tokens"])
    if context - longest < 1:
        raise SystemExit(f"error: the model's context of {context} tokens leaves no room after a {longest}-token "
                         "prompt")
    return min(max_tokens, context - longest)


def run_load(base: str, name: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads stream requests until ``requests`` are done; per-request timings and totals."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    lock, counter = threading.Lock(), iter(range(requests))
    ttft, gaps, tokens, failed = [], [], [0], [0]

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                start = last = time.perf_counter()
                first = None
                stream = client.completions.create(model=name, prompt=PROMPTS[i % len(PROMPTS)], stream=True,
                                                   stream_options={"include_usage": True}, max_tokens=max_tokens,
                                                   temperature=0)
                for chunk in stream:
                    now = time.perf_counter()
                    if chunk.choices and chunk.choices[0].text:
                        if first is None:
                            first = now - start
                        else:
                            with lock:
                                gaps.append(now - last)
                        last = now
                    if chunk.usage is not None:
                        with lock:
                            tokens[0] += chunk.usage.completion_tokens
                with lock:
                    ttft.append(first if first is not None else time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - a benchmark counts failures instead of stopping
                with lock:
                    failed[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    q = statistics.quantiles(ttft, n=20) if len(ttft) > 1 else ttft * 19
    return {"ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p95_ms": 1000 * q[18],
            "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else 0.0,
            "tokens_per_s": tokens[0] / seconds, "tokens": tokens[0], "seconds": seconds, "failed": failed[0]}


def soak(base: str, name: str, clients: int, seconds: float, pid: int, longest: int) -> dict:
    """``clients`` threads send requests of up to ``longest`` new tokens for ``seconds`` — streaming or not, and one
    in four hangs up after its first chunk — counting server errors (5xx), other failures and hung requests (no
    answer within 60 s); the server's resident memory before, right after and 5 s after the load."""
    import random

    from openai import APIStatusError, APITimeoutError, OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    counts = {"requests": 0, "disconnects": 0, "errors_5xx": 0, "errors_4xx": 0, "hung": 0, "other": 0}
    lock, deadline = threading.Lock(), time.monotonic() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            outcome = "requests"
            try:
                kwargs = dict(model=name, prompt="ROMEO:", max_tokens=rng.randint(1, longest), temperature=0.8)
                if rng.random() < 0.5:
                    client.completions.create(**kwargs)
                else:
                    hang_up = rng.random() < 0.25
                    stream = client.completions.create(**kwargs, stream=True)
                    for _ in stream:
                        if hang_up:
                            stream.close()  # hang up after the first chunk
                            outcome = "disconnects"
                            break
            except APIStatusError as e:
                outcome = "errors_5xx" if e.status_code >= 500 else "errors_4xx"
            except APITimeoutError:
                outcome = "hung"
            except Exception:  # noqa: BLE001 - counted, not raised
                outcome = "other"
            with lock:
                counts[outcome] += 1

    rss = [_rss_mib(pid)]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss.append(_rss_mib(pid))
    time.sleep(5)
    rss.append(_rss_mib(pid))
    return {**counts, "rss_before_mib": rss[0], "rss_after_mib": rss[1], "rss_idle_mib": rss[2]}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(model: str, max_batch: int, args: argparse.Namespace) -> tuple[int, dict]:
    """The load against a server with ``max_batch`` slots: the new tokens per request used, and the figures."""
    proc, base, name = start_server(model, max_batch, queue_limit=max(64, args.clients))
    try:
        max_tokens = tokens_that_fit(base, name, args.max_tokens)
        run_load(base, name, args.clients, args.clients, 4)  # warm-up: first calls allocate and fill caches
        return max_tokens, run_load(base, name, args.clients, args.requests, max_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="model to serve (any form lfpl-serve takes); default: tiny, random weights")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--soak", type=float, metavar="SECONDS",
                        help="instead: a load test of --clients clients for SECONDS (errors, hangs, memory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.ckpt or str(tiny_model_folder(Path(tmp)))
        if args.soak:
            proc, base, name = start_server(model, max_batch=16, queue_limit=max(64, args.clients))
            try:
                result = soak(base, name, args.clients, args.soak, proc.pid, tokens_that_fit(base, name, 48))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(json.dumps({"clients": args.clients, "seconds": args.soak, **result}))
            return
        max_tokens, batched = measure(model, max_batch=args.clients, args=args)
        _, one_at_a_time = measure(model, max_batch=1, args=args)
    for label, r in (("continuous batching", batched), ("one at a time", one_at_a_time)):
        print(f"{label:>20}: {r['tokens_per_s']:8.1f} tokens/s | TTFT p50 {r['ttft_p50_ms']:7.1f} ms, "
              f"p95 {r['ttft_p95_ms']:7.1f} ms | inter-token p50 {r['itl_p50_ms']:6.1f} ms | "
              f"{r['tokens']} tokens in {r['seconds']:.1f} s | failed {r['failed']}")
    ratio = batched["tokens_per_s"] / one_at_a_time["tokens_per_s"]
    print(f"continuous batching / one at a time: {ratio:.2f}x ({args.clients} concurrent streams)")
    print(json.dumps({"clients": args.clients, "requests": args.requests, "max_tokens": max_tokens,
                      **{f"batched_{k}": round(v, 2) for k, v in batched.items()},
                      **{f"single_{k}": round(v, 2) for k, v in one_at_a_time.items()}, "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
