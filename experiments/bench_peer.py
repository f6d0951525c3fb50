"""The benchmark's peer: Hugging Face's PyTorch GPT-2 on the shapes and data `experiments.bench`
measures, so that its ratios are measured in one run on one machine.

python -m experiments.bench_peer train --layers=12 --d_model=768 --heads=12 --seq=512 --batch=4
python -m experiments.bench_peer train --compile ...  (forward+backward under torch.compile)
python -m experiments.bench_peer sample --layers=12 --d_model=768 --heads=12 --prompt=32 --new=128

Prints one JSON line: tokens/s, each timed repetition, and peak memory (the process's peak RSS;
on a GPU, torch's peak allocation). The train step is ours: the loss over `seq` next tokens of a
batch from `random_tokens`, AdamW with the optimizer settings given, clipping to a global norm;
dropout is off. `--device=cuda` runs it on the GPU (synchronised before each time is taken),
`--dtype=bfloat16` under bf16 autocast with float32 parameters, as ours computes in bf16. `experiments.bench` starts
it in a subprocess, so that torch and jax never share a process. Needs torch and transformers
(requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import numpy as np


def random_tokens(vocab_size: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Uniform token ids, the benchmark's data on both sides: speed does not depend on the text."""
    return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def timed(fn, warmup: int, repeats: int, sync=lambda: None) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` calls; `sync()` waits for the
    device's queued work (fn must block, or sync must)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _device(args):
    """(torch device, its sync, the autocast context for --dtype)."""
    import contextlib

    import torch  # pylint: disable=import-outside-toplevel
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    return device, sync, autocast


def _model(args):
    import torch  # pylint: disable=import-outside-toplevel
    from transformers import GPT2Config, GPT2LMHeadModel  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.d_model, n_head=args.heads,
                        n_inner=args.d_ff or None, vocab_size=args.vocab,
                        n_positions=args.max_len,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(args.device)


def train(args) -> dict:
    """tokens/s of forward, backward, clipping and AdamW's update on one batch, as ours."""
    import torch  # pylint: disable=import-outside-toplevel
    device, sync, autocast = _device(args)
    model = _model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.b1, args.b2),
                                  eps=args.eps, weight_decay=args.weight_decay)
    tokens_BxT1 = torch.from_numpy(random_tokens(args.vocab, (args.batch, args.seq + 1))).long()
    inputs_BxT, targets_BxT = tokens_BxT1[:, :-1].to(device), tokens_BxT1[:, 1:].to(device)

    def forward_backward(inputs_BxT, targets_BxT):
        with autocast:
            logits_BxTxV = model(input_ids=inputs_BxT).logits
        loss = torch.nn.functional.cross_entropy(logits_BxTxV.float().flatten(0, 1), targets_BxT.flatten())
        loss.backward()
        return loss

    if args.compile:
        forward_backward = torch.compile(forward_backward)  # compiles in the warm-up

    def step():
        forward_backward(inputs_BxT, targets_BxT)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed(step, args.warmup, args.repeats, sync)
    return {"peer": "hf-torch" + ("-compile" if args.compile else ""), "what": "train",
            "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_step": args.batch * args.seq, "times_s": times}


def sample(args) -> dict:
    """Greedy new tokens/s of `generate` with its KV cache for one prompt, prefill included."""
    import torch  # pylint: disable=import-outside-toplevel
    device, sync, autocast = _device(args)
    model = _model(args).eval()
    prompt_1xP = torch.from_numpy(random_tokens(args.vocab, (1, args.prompt))).long().to(device)

    def generate():
        with torch.no_grad(), autocast:
            model.generate(prompt_1xP, max_new_tokens=args.new, min_new_tokens=args.new,
                           do_sample=False, pad_token_id=0, use_cache=True)

    times = timed(generate, args.warmup, args.repeats, sync)
    return {"peer": "hf-torch", "what": "sample", "params": sum(p.numel() for p in model.parameters()),
            "new_tokens": args.new, "times_s": times}


def peak_rss_mb() -> float:
    """This process's peak RSS since exec. getrusage's would include the parent's size at
    fork, which Linux carries into the child: a process started from a large one reads high."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "sample"])
    for name, default in (("layers", 12), ("d_model", 768), ("heads", 12), ("d_ff", 0),
                          ("vocab", 50257), ("max_len", 1024), ("seq", 512), ("batch", 4), ("prompt", 32),
                          ("new", 128), ("warmup", 2), ("repeats", 5), ("threads", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("lr", 6e-4), ("b1", 0.9), ("b2", 0.95), ("eps", 1e-8),
                          ("weight_decay", 0.1), ("grad_clip", 1.0)):
        parser.add_argument(f"--{name}", type=float, default=default)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16: the forward under bf16 autocast, float32 parameters")
    parser.add_argument("--compile", action="store_true",
                        help="train: forward+backward under torch.compile (the stronger peer)")
    args = parser.parse_args(argv)
    import torch  # pylint: disable=import-outside-toplevel
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(args) if args.what == "train" else sample(args)
    units = result["tokens_per_step"] if args.what == "train" else args.new
    median_s = statistics.median(result["times_s"])
    on_gpu = args.device.startswith("cuda")
    result.update(median_s=median_s, tokens_per_s=units / median_s, device=args.device,
                  dtype=args.dtype, torch_threads=torch.get_num_threads(),
                  peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_mb(),
                  memory_source="torch.cuda.max_memory_allocated" if on_gpu else "process peak RSS (VmHWM)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
