"""One implementation's SignRound on a model folder prepared by `tuning_vs_reference.py`; run by that script
with each implementation's own venv python (so `auto_round` is ours or the reference's, never both).

    python bench/block_trace.py --impl ours|reference --model DIR --scheme W2A16G64 --iters 200 --out F.json
        [--lr 5e-3] [--amp]

Reads DIR/calib_ids.pt ([n, seqlen] token ids, the same for both) and DIR/heldout_ids.pt. Writes F.json:
    losses      every iteration's batch loss, all blocks in order (the plain masked MSE in both)
    hidden_mse  per decoder layer, mean squared difference between the quantized and the fp model's hidden
                states on the held-out ids (the last entry is after the final norm)
    seconds     quantize() wall time
--quant_from K keeps layers 0..K-1 in fp, so block K's inputs are the fp hidden states on both sides and its
iteration-0 loss must agree (fp32). Without --amp both run fp32 (the reference's amp=False); with it each takes its own default.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def record_losses(impl: str, losses: list) -> None:
    """Collect every iteration's loss: ours through its per-iteration callback, the reference's through its
    MSE loss module (one call per iteration at gradient_accumulate_steps 1)."""
    if impl == "ours":
        from auto_round.model.run_log import RunLog

        RunLog.on_iter = lambda self, it, loss: losses.append(float(loss))
    else:
        forward = torch.nn.MSELoss.forward

        def logged(self, a, b):
            out = forward(self, a, b)
            losses.append(float(out))
            return out

        torch.nn.MSELoss.forward = logged


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    return [h.float() for h in model(ids, output_hidden_states=True).hidden_states[1:]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["ours", "reference"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--scheme", required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1, help="torch threads (another summation order: a chaos check)")
    p.add_argument("--quant_from", type=int, default=0,
                   help="keep decoder layers below this index in fp (bits 16), so the first tuned block sees the "
                        "same fp inputs in both implementations")
    p.add_argument("--compile", action="store_true",
                   help="enable_torch_compile=True (the reference's CLI default; ours: the activation qdq)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    losses: list = []
    record_losses(args.impl, losses)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    heldout = torch.load(f"{args.model}/heldout_ids.pt")
    fp_hidden = hidden_states(model, heldout)
    ids = torch.load(f"{args.model}/calib_ids.pt")
    from auto_round import AutoRound

    kw = dict(iters=args.iters, nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=args.batch_size,
              seed=args.seed, scheme=args.scheme)
    if args.lr is not None:
        kw["lr"] = args.lr
    if args.quant_from:
        kw["layer_config"] = {name: {"bits": 16} for name, mod in model.named_modules()
                              if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.")
                              and int(name.split(".")[2]) < args.quant_from}
    if args.impl == "ours":
        kw.update(dataset=ids, device="cpu")
        if not args.amp:
            kw["amp"] = False
    else:  # a list of [1, seqlen] tensors: taken as they are (no re-tokenizing, no filtering)
        kw.update(dataset=[ids[i : i + 1] for i in range(ids.shape[0])], device_map="cpu")
        if not args.amp:
            kw.update(amp=False, enable_torch_compile=False)
    if args.compile:
        kw["enable_torch_compile"] = True
    ar = AutoRound(model, tokenizer=tok, **kw)
    t0 = time.perf_counter()
    ar.quantize()
    seconds = time.perf_counter() - t0
    quantized = ar.model.float()
    mse = [float(((a - b) ** 2).mean()) for a, b in zip(hidden_states(quantized, heldout), fp_hidden)]
    with open(args.out, "w") as f:
        json.dump({"impl": args.impl, "losses": losses, "hidden_mse": mse, "seconds": seconds}, f)


if __name__ == "__main__":
    main()
