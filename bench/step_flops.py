"""How close one SignRound step is to this machine's matmul limit.

    .venv/bin/python bench/step_flops.py [--model smollm2|tiny|DIR] [--block 5] [--iters 20] [--profile]

Measures (1) sgemm GFLOP/s of torch.mm on fp32 (a 2048^3 product and the step's own largest shape),
(2) the wall time of one SignRound step (qdq of every layer + block forward + backward + signed update,
i.e. `tune_block` run for `--iters` steps, divided by the steps) on real captured block inputs,
(3) the step's FLOP count, and prints achieved GFLOP/s and its ratio to sgemm.

FLOP count (multiply-add = 2): forward = sum over quantized linears of 2*T*in*out plus attention
4*B*H*S^2*d (QK^T and AV); the backward is counted as 2x the forward for every linear (grad of the
weight, which V and alpha/beta need, and grad of the input) except the first layers after the input norm,
whose input gradient is not needed, and 2x for attention. Element-wise work (qdq, norms, loss) is not
counted: it is overhead against this limit. Writes `bench/results/step_flops-<model>.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from auto_round import AutoRound  # noqa: E402
from auto_round.compressor_walk import calibration_set  # noqa: E402
from auto_round.algorithms.act_quant import act_max_hooks  # noqa: E402
from auto_round.algorithms.signround import SignRoundConfig, loss_mask_from_attention, tune_block  # noqa: E402
from auto_round.model.block_run import block_runner, run_batched  # noqa: E402
from auto_round.model.block_inputs import capture_block_inputs  # noqa: E402
from auto_round.model.blocks import iter_blocks  # noqa: E402
from auto_round.model.memory import freed_memory_reused  # noqa: E402
from auto_round.model.tuning_attention import tuning_attention  # noqa: E402


def sgemm_gflops(m: int, k: int, n: int, repeats: int = 10) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(layers: dict, config, batch: int, seqlen: int) -> float:
    tokens = batch * seqlen
    linear_fwd = sum(2 * tokens * m.in_features * m.out_features for m, _ in layers.values())
    no_input_grad = sum(2 * tokens * m.in_features * m.out_features for name, (m, _) in layers.items()
                        if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attn_fwd = 4 * batch * heads * seqlen * seqlen * head_dim
    return 3 * linear_fwd - no_input_grad + 3 * attn_fwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--scheme", default="W4A16", help="any preset; e.g. NVFP4 / MXFP4 time their qdq overhead")
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast the tuning matmuls")
    p.add_argument("--amp_attention", action="store_true", help="with --amp bf16: attention in bf16 too (opt-in)")
    p.add_argument("--compile", action="store_true", help="torch.compile the MX / NVFP4 activation qdq (compile_act_qdq)")
    p.add_argument("--compile_block", action="store_true", help="experiment: torch.compile the whole block forward")
    p.add_argument("--no_heap_reuse", action="store_true",
                   help="time the steps without reuse_freed_memory (glibc unmaps freed big blocks: page faults)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators for 5 steps")
    args = p.parse_args()
    from compare import model_folder, write_calibration  # same model/data as the comparison
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ar-flops-"))
    folder = model_folder(args.model, work)
    calib_file = write_calibration(work, args.nsamples)
    ar = AutoRound(str(folder), scheme=args.scheme, iters=args.iters, lr=5e-3, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=str(calib_file))
    calib = calibration_set(ar)
    blocks = list(iter_blocks(ar.model, ar.block_groups))
    captured = capture_block_inputs(ar.model, [b for _, b in blocks[: args.block + 1]], calib.input_ids,
                                    calib.attention_mask, device="cpu")
    name, block = blocks[args.block]
    call, inputs = captured.calls[args.block], captured.hidden_states
    if args.block:  # walk the fp chain to this block's real inputs
        fp = inputs
        for (_, b), c in zip(blocks[: args.block], captured.calls):
            fp = run_batched(b, fp, c, args.batch_size, "cpu")
        inputs = fp
    layers = ar._block_layers(name)
    with act_max_hooks(layers) as act_max:  # static activation ranges (NVFP4's global input scale)
        targets = run_batched(block, inputs, call, args.batch_size, "cpu")
    mask = loss_mask_from_attention(calib.attention_mask)
    config = SignRoundConfig(iters=args.iters, lr=5e-3, batch_size=args.batch_size, seed=42,
                             amp_dtype=torch.bfloat16 if args.amp == "bf16" else None, compile_act_qdq=args.compile)
    run = block_runner(torch.compile(block) if args.compile_block else block, inputs, call, "cpu")
    snapshot = {n: m.weight.detach().clone() for n, (m, _) in layers.items()}

    def tune(iters: int) -> float:
        for n, (m, _) in layers.items():  # every run starts from the same fp weights
            m.weight.data.copy_(snapshot[n])
        cfg = SignRoundConfig(**{**config.__dict__, "iters": iters})
        with tuning_attention(block, enabled=args.amp_attention and cfg.amp_dtype is not None):
            # as quantize() runs it (reuse_freed_memory, the default): freed memory kept for the next step
            with freed_memory_reused(not args.no_heap_reuse):
                return _timed(lambda: tune_block(layers, run, targets, mask, cfg, block_name=name, act_max=act_max))

    warmup_s = tune(2)  # warm-up (includes the compilation with --compile)
    step_s = (tune(args.iters) - tune(1)) / (args.iters - 1)  # excludes per-block setup and finalize
    flops = step_flops(layers, ar.model.config, args.batch_size, args.seqlen)
    big = max((m for m, _ in layers.values()), key=lambda m: m.in_features * m.out_features)
    peak = max(sgemm_gflops(2048, 2048, 2048), sgemm_gflops(args.batch_size * args.seqlen, big.in_features, big.out_features))
    result = {
        "heap_reuse": not args.no_heap_reuse, "model": args.model, "scheme": args.scheme, "block": name, "amp": args.amp, "amp_attention": args.amp_attention, "batch": args.batch_size, "seqlen": args.seqlen,
        "step_s": step_s, "warmup_2_steps_s": warmup_s, "compile_act_qdq": args.compile, "compile_block": args.compile_block, "step_gflop": flops / 1e9, "achieved_gflops": flops / step_s / 1e9,
        "sgemm_gflops": peak, "ratio": flops / step_s / 1e9 / peak, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stem = args.model if args.model in ("smollm2", "tiny") else Path(args.model).name
    tag = ("-" + args.scheme.lower() if args.scheme != "W4A16" else "") + ("-" + args.amp if args.amp != "none" else "")
    tag += "-compiled" if args.compile else ""
    tag += "-compiled-block" if args.compile_block else ""
    tag += "-no-heap-reuse" if args.no_heap_reuse else ""
    (out / f"step_flops-{stem}{tag}.json").write_text(
        json.dumps(result, indent=1))
    if args.profile:
        with torch.profiler.profile(record_shapes=True) as prof:
            tune(5)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40))


if __name__ == "__main__":
    main()
