"""Quantized and half-precision inference: weight size, decode speed and held-out bits per byte of each
``quantize=`` mode (and ``precision=``), on one trained checkpoint.

    python recipes/benchmark_quantize.py --ckpt outputs/.../checkpoints/last.ckpt   # CPU: ~3 min (3.2M), ~6 (12.6M)
    python recipes/benchmark_quantize.py --ckpt ... --modes none int8 --compile      # + each under torch.compile
    python recipes/benchmark_quantize.py --ckpt ... --precisions 32-true bf16-true   # + each mode on bf16 weights

For each mode of ``llmfoundry_pl/inference/quantize.py`` (none = fp32), in each of --precisions (rows named
``bf16-true+int8_weight`` etc.; int8 runs on fp32 only): the bytes of the model's weights as they
lie in memory (quantized ones with their scales), new tokens/s of greedy decoding at batch 1 (a prompt of
--prompt-len tokens from the bundled plays, --new-tokens new ones, as ``lfpl-generate quantize=...`` runs it), the
number of tokens decoded before the first one that differs from fp32's, and the held-out bits per byte that
``lfpl-eval quantize=...`` reports (the checkpoint's own validation split, through the same ``evaluate``), with its
change against fp32. Timed runs alternate between the modes and the median of --repeats is reported, because a
shared machine's speed drifts by ±20% within minutes. The last line printed is one JSON object of every figure.
Needs torchao for the *_weight modes (pip install -e ".[quant]").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import time
from collections.abc import Callable

import torch
from hydra import compose, initialize_config_module

from llmfoundry_pl.cli.common import load_model
from llmfoundry_pl.cli.eval import evaluate
from llmfoundry_pl.config import INFERENCE_PRECISIONS, QUANTIZE_MODES, register_configs
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.inference import generate_batch
from llmfoundry_pl.inference.quantize import for_inference, weight_bytes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="the model to quantize: a .ckpt (or last) or a model folder")
    p.add_argument("--modes", nargs="+", default=list(QUANTIZE_MODES), choices=QUANTIZE_MODES)
    p.add_argument("--precisions", nargs="+", default=["32-true"], choices=INFERENCE_PRECISIONS,
                   help="the model's dtype before quantizing (lfpl-generate precision=); fp32 is always the reference")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time each mode under torch.compile(dynamic=True)")
    p.add_argument("--no-eval", dest="eval", action="store_false",
                   help="size and speed only: for an untrained model of a bigger shape, or where evaluating takes too "
                        "long (int4_weight on a 124M model: over 15 minutes on a 2-core CPU)")
    return p.parse_args()


def held_out_bpb(ckpt: str, precision: str, mode: str, device: str) -> float:
    """val/bpb from ``lfpl-eval ckpt_path=ckpt precision=precision quantize=mode`` run in this process (its printout
    swallowed)."""
    register_configs()
    with initialize_config_module(config_module="llmfoundry_pl.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", f"precision={precision}", f"quantize={mode}",
                                         f"accelerator={device}"])
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate(cfg)["val/bpb"]


def main() -> None:
    args = parse_args()
    args.modes = ["none", *(mode for mode in args.modes if mode != "none")]  # changes are measured against fp32
    args.precisions = ["32-true", *(p for p in args.precisions if p != "32-true")]
    fp32, tokenizer, _ = load_model(args.ckpt)
    fp32 = fp32.to(args.device).eval()
    settings = {_name(precision, mode): (precision, mode) for precision in args.precisions for mode in args.modes
                if precision == "32-true" or mode != "int8"}  # int8's kernels take fp32 activations
    models = {name: for_inference(copy.deepcopy(fp32), torch.device(args.device), *setting)
              for name, setting in settings.items()}
    play = sorted(bundled_corpus_dir().glob("*.txt"))[0].read_text()
    prompt = tokenizer.encode(play[10_000:20_000], bos=True)[: args.prompt_len]  # mid-play, past the cast list
    n_new = min(args.new_tokens, fp32.config.max_seq_len - len(prompt))
    if n_new < 1:  # a model of a short context: nothing to decode, and each speed divided by 0 seconds
        raise SystemExit(f"error: --prompt-len {len(prompt)} leaves no room in the model's context of "
                         f"{fp32.config.max_seq_len} tokens; lower it")
    print(f"model: {args.ckpt}, {fp32.num_params() / 1e6:.1f}M parameters, device {args.device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; batch 1, {len(prompt)}-token prompt, "
          f"{n_new} new tokens, greedy", flush=True)

    def decoder(model: torch.nn.Module) -> Callable[[int], list[int]]:
        return lambda n: generate_batch(model, [prompt], n, temperature=0)[0]

    contenders = {name: decoder(model) for name, model in models.items()}
    if args.compile:  # dynamic: the cache grows by one slot per step, as lfpl-generate compile=true does it
        contenders.update({f"{name}+compile": decoder(torch.compile(model, dynamic=True))
                           for name, model in models.items()})
    reference = contenders["none"](n_new)
    agree = {}
    for name, fn in contenders.items():  # warm-up (and, under torch.compile, compilation); greedy agreement
        tokens = fn(n_new)
        agree[name] = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), n_new)
    speed: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn(n_new)
            speed[name].append(n_new / (time.perf_counter() - start))
    results: dict[str, float] = {}
    for name in contenders:  # printed as they come: a long run stopped later keeps these
        tps = statistics.median(speed[name])
        results.update({f"{name}_tokens_per_s": tps, f"{name}_vs_fp32": tps / statistics.median(speed["none"]),
                        f"{name}_same_greedy_tokens": agree[name]})
        print(f"decode {name}: {tps:,.1f} tokens/s, {agree[name]} tokens as fp32's", flush=True)
    for name, model in models.items():
        results[f"{name}_weight_bytes"] = weight_bytes(model)
        if args.eval:
            results[f"{name}_bpb"] = held_out_bpb(args.ckpt, *settings[name], args.device)
            results[f"{name}_bpb_change"] = results[f"{name}_bpb"] - results["none_bpb"]
            print(f"held-out bits per byte {name}: {results[f'{name}_bpb']:.4f}", flush=True)

    print("\n| mode | weights | decode tokens/s (vs fp32) | same greedy tokens as fp32 | held-out bpb (change) |\n"
          "|---|---|---|---|---|")
    for name in contenders:
        size = bpb = "(as above)"  # a compiled model has the weights and numbers of its eager self
        if name in models:
            nbytes = results[f"{name}_weight_bytes"]
            size = f"{nbytes / 1e6:.2f} MB ({nbytes / results['none_weight_bytes']:.0%})"
            bpb = "not measured"
            if args.eval:
                change = results[f"{name}_bpb_change"]
                bpb = f"{results[f'{name}_bpb']:.4f} ({change:+.4f}, {change / results['none_bpb']:+.2%})"
        print(f"| {name} | {size} | {results[f'{name}_tokens_per_s']:,.0f} ({results[f'{name}_vs_fp32']:.2f}×) | "
              f"{agree[name]}/{n_new} | {bpb} |")
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


def _name(precision: str, mode: str) -> str:
    """A row's name: the quantize mode on fp32 weights (none, int8, ...), else precision+mode (bf16-true alone for
    none)."""
    if precision == "32-true":
        return mode
    return precision if mode == "none" else f"{precision}+{mode}"


if __name__ == "__main__":
    main()
