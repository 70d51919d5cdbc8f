"""Generation speed: our KV-cache decoding against Hugging Face ``transformers`` on the same weights.

    python recipes/benchmark_generate.py                      # CPU, ~4 minutes on 2 cores
    python recipes/benchmark_generate.py --device cuda
    python recipes/benchmark_generate.py --target-ckpt big.ckpt --draft-ckpt small.ckpt   # + speculative decoding

Measures, in one process and on one set of weights (the 16M-parameter Llama shape of docs/benchmarks.md: dim 384,
6 layers, 6 heads / 2 KV heads, vocab 8192, random weights unless --target-ckpt is given): new tokens/s of
greedy decoding at batch 1 and 8 (32-token prompts, 256 new tokens), and time to first token, for our
``generate_batch``, the same model under ``torch.compile`` (``lfpl-generate compile=true``; --no-compile skips
it), and ``LlamaForCausalLM.generate``.
Runs alternate between the contenders and the median of --repeats is reported, because a shared machine's
speed drifts by ±20% within minutes. With two checkpoints sharing a tokenizer it also measures speculative
decoding (batch 1): acceptance rate and speed-up over the target alone, on prompts taken from the bundled plays.
The last line printed is one JSON object of every figure. Needs transformers (pip install -e ".[dev]").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from llmfoundry_pl.cli.common import load_model
from llmfoundry_pl.config import ModelConfig
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.inference import SpeculativeStats, generate, generate_batch, speculative_stream
from llmfoundry_pl.interop.hf import to_hf_state_dict
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer

SHAPE = dict(vocab_size=8192, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=512)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip timing under torch.compile")
    p.add_argument("--target-ckpt", help="a model to time instead of random weights of the 16M shape (.ckpt or folder)")
    p.add_argument("--draft-ckpt", help="with --target-ckpt: measure speculative decoding with this draft")
    p.add_argument("--draft-tokens", type=int, default=4)
    return p.parse_args()


def hf_twin(model: Transformer):
    """A ``LlamaForCausalLM`` with exactly our weights (through the interop name table)."""
    import transformers

    cfg = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        # No end-of-text token: like ours (eos_id=None), it decodes the tokens asked for whatever it picks. With one,
        # generate needed min_new_tokens, which forbids that token: a row where ours picked it differed from there.
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=None, pad_token_id=3,
    ))
    hf.load_state_dict(to_hf_state_dict(model), strict=not cfg.tie_embeddings)
    return hf.to(next(model.parameters()).device).eval()


def timed(device: str, fn: Callable[..., object], *args: object) -> tuple[float, object]:
    """Seconds that ``fn(*args)`` takes (waiting for the GPU), and what it returned."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def new_tokens_that_fit(model: Transformer, args: argparse.Namespace) -> int:
    """--new-tokens, or fewer where prompt and reply would pass the model's context: there our decoder slides its
    window (about half the speed) while transformers decodes on past its positions, so the comparison said less
    than nothing (a 256-token model, 32 + 256 tokens: "identical for 0/1 rows", ours at 0.73x instead of 1.44x)."""
    room = model.config.max_seq_len - args.prompt_len
    if room < 1:
        raise SystemExit(f"error: --prompt-len {args.prompt_len} leaves no room in the model's context of "
                         f"{model.config.max_seq_len} tokens; lower it")
    return min(args.new_tokens, room)


def main() -> None:
    args = parse_args()
    if args.draft_ckpt and not args.target_ckpt:
        raise SystemExit("error: --draft-ckpt needs --target-ckpt (a draft only helps a model it was trained beside)")
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.target_ckpt) if args.target_ckpt else (Transformer(ModelConfig(**SHAPE)),
                                                                                   None, None)
    model = model.to(args.device).eval()
    hf = hf_twin(model)
    V, n_new = model.config.vocab_size, new_tokens_that_fit(model, args)
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.prompt_len}-token prompts, {n_new} new tokens")

    contenders: dict[str, Callable[[torch.Tensor, int], list[list[int]]]] = {
        "ours": lambda ids, n: generate_batch(model, ids.tolist(), n, temperature=0),
        "hf": lambda ids, n: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                         do_sample=False)[:, ids.size(1):].tolist(),
    }
    compile_s = None
    if args.compile:
        compiled = torch.compile(model, dynamic=True)
        contenders["ours_compiled"] = lambda ids, n: generate_batch(compiled, ids.tolist(), n, temperature=0)

    results: dict[str, float] = {}
    for batch in args.batch_sizes:
        prompts = torch.randint(4, V, (batch, args.prompt_len), device=args.device)
        outputs = {}
        for name, fn in contenders.items():  # warm-up (and, for torch.compile, compilation)
            seconds, outputs[name] = timed(args.device, fn, prompts, n_new)
            if name == "ours_compiled" and compile_s is None:
                compile_s = seconds
        same = sum(a == b for a, b in zip(outputs["ours"], outputs["hf"], strict=True))
        print(f"batch {batch}: greedy outputs identical to Hugging Face's for {same}/{batch} rows")
        results[f"same_as_hf_b{batch}"] = same / batch
        speed = {name: [] for name in contenders}
        ttft = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                seconds, _ = timed(args.device, fn, prompts, n_new)
                speed[name].append(batch * n_new / seconds)
                ttft[name].append(timed(args.device, fn, prompts, 1)[0])
        for name in contenders:
            results[f"{name}_b{batch}_tokens_per_s"] = statistics.median(speed[name])
            results[f"{name}_b{batch}_ttft_ms"] = 1000 * statistics.median(ttft[name])
        for name in contenders:
            if name != "hf":
                results[f"{name}_vs_hf_b{batch}"] = results[f"{name}_b{batch}_tokens_per_s"] / results[
                    f"hf_b{batch}_tokens_per_s"]
        print(f"batch {batch}: " + " | ".join(
            f"{name} {results[f'{name}_b{batch}_tokens_per_s']:,.0f} new tok/s, "
            f"TTFT {results[f'{name}_b{batch}_ttft_ms']:.1f} ms" for name in contenders))
    if compile_s is not None:
        results["compile_warmup_s"] = compile_s

    if args.draft_ckpt:
        results.update(speculative(model, tokenizer, args))
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


def speculative(model: Transformer, tokenizer: Tokenizer, args: argparse.Namespace) -> dict[str, float]:
    """Speculative decoding against the target alone, greedy, batch 1, on prompts from the bundled plays."""
    draft, draft_tokenizer, _ = load_model(args.draft_ckpt)
    if draft_tokenizer.sha256 != tokenizer.sha256:
        raise SystemExit("error: --draft-ckpt uses a different tokenizer than --target-ckpt")
    draft = draft.to(args.device).eval()
    n_new = new_tokens_that_fit(model, args)
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:4]
             for line in f.read_text().splitlines() if len(line) > 40]
    prompts = [tokenizer.encode(line, bos=True)[: args.prompt_len] for line in lines[:: max(1, len(lines) // 5)][:5]]
    plain_s = spec_s = 0.0
    stats = SpeculativeStats()
    for prompt in prompts:
        seconds, plain = timed(args.device, lambda p: generate(model, p, n_new, temperature=0), prompt)
        plain_s += seconds
        seconds, spec = timed(args.device, lambda p: list(speculative_stream(
            model, draft, p, n_new, draft_tokens=args.draft_tokens, temperature=0, stats=stats)), prompt)
        spec_s += seconds
        assert spec == plain, "speculative greedy output differs from the target's own"
    print(f"speculative (draft {draft.num_params() / 1e6:.1f}M, {args.draft_tokens} guesses per pass): "
          f"acceptance {stats.acceptance_rate:.0%}, {plain_s / spec_s:.2f}× the target alone "
          f"({len(prompts) * n_new / spec_s:,.0f} vs {len(prompts) * n_new / plain_s:,.0f} new tok/s)")
    return {"speculative_acceptance": stats.acceptance_rate, "speculative_speedup": plain_s / spec_s}


if __name__ == "__main__":
    main()
