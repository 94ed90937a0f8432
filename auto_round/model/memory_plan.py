"""Memory planner for the SignRound block walk: predict the peak, pick a micro-batch that fits, or refuse early.

What the walk keeps alive at its peak (compressor_walk.py `quantize_signround`, model/block_run.py `run_batched`):

    cached chains   fp_in, targets, q_in (old) and q_in (new) [n, T, H] in the model dtype, plus the torch.cat
                    of run_batched, which holds the per-batch pieces and the joined tensor at once: 5 chains
                    (3 without enable_quanted_input: fp_in, targets and the targets being joined). On the CPU
                    by default (low_gpu_mem_usage): capture_block_inputs stores them there and run_batched keeps
                    outputs where its inputs are, so on an accelerator they take no device memory. With
                    low_gpu_mem_usage=False they stay on the accelerator when they fit beside the block's work
                    (no host-device copy per micro-batch), else on the CPU: the same results either way.
    call args       per-sample block arguments captured once (a 4-D mask [n, 1, T, T] with eager attention,
                    else a 2-D mask [n, T] at most); shared rotary tables are negligible. Stored with the chains.
    weights         every parameter of the model, resident the whole run (host, or the device when loaded there).
    block state     one block's tunables (algorithms/tunable.py): the fp32 grouped weight copy, V, its grad, the
                    best-iteration snapshot, the fake-quantized weight the matmul keeps for its backward (5 x 4
                    bytes per weight), and what the qdq keeps for the backward (`QDQ_GRAPH_BYTES` per weight by
                    type, measured with saved_tensors_hooks: int codes, bf16 elements + mask of the MX / NVFP4 /
                    FP8 node, the ggml node's small state); min/max scales alpha/beta per group with grads and
                    snapshots. With recompute_qdq the MX / NVFP4 / FP8 layers keep nothing; only the largest of
                    them has its graph, while its backward rebuilds it. Signed SGD keeps no optimizer moments, so
                    there is no optimizer state beyond the grad (and its sign, transient), unless momentum > 0:
                    then one fp32 buffer per weight (two with enable_adam: AdamW's moments).
    activations     one micro-batch forward + backward of one block: `ACT_PER_HIDDEN` tensors of [b, T, H] and
                    `ACT_PER_INTERMEDIATE` of [b, T, I] in fp32 (plus an amp-dtype copy when autocast is on), and
                    with eager attention the scores and probabilities [b, heads, T, T] (x `ACT_SCORES`).
    packed output   with immediate packing the packed codes and scales of every quantized layer (bits/8 per weight,
                    two fp16 values per group) accumulate while the float weights are released.

The counts are estimates (within a factor 2 of measured peaks on tiny Llamas, tests/test_memory_plan.py), not
bounds. Everything is in bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

logger = logging.getLogger("auto_round")

ACT_PER_HIDDEN = 14  # norms, q/o/residuals, loss temporaries (out, diff, mask products) per [b, T, H]
ACT_PER_INTERMEDIATE = 5  # gate, up, act(gate), act*up, its grad per [b, T, I]
ACT_SCORES = 3  # eager attention: scores, softmax probabilities, their grad
# bytes per weight that a layer's qdq keeps from the forward for the backward, beyond the weight itself (measured:
# int 1.2 at 2-4 bits and 2.2 at 8; the float node 3 plus ~0.8 of per-group values; ggml ~0.2)
QDQ_GRAPH_BYTES = {"int": 2, "float": 4, "gguf": 1}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MemoryPlanError(ValueError):
    """The predicted peak memory of the tuning does not fit in the memory available, whatever batch is used."""


@dataclass(frozen=True)
class MemoryShape:
    """The numbers the estimate needs (all counts, not bytes, except the *_bytes fields)."""

    nsamples: int
    seqlen: int
    hidden: int
    intermediate: int
    heads: int
    dtype_bytes: int  # bytes per element of the cached hidden states (the model dtype)
    weight_bytes: int  # all parameters of the model
    block_weight_elems: int  # quantized weight elements of the largest block
    block_groups: int  # quantization groups of that block (alpha/beta are [rows, n_groups])
    packed_bytes: int  # packed codes + scales of all quantized layers
    eager_attention: bool = False
    enable_quanted_input: bool = True
    amp: bool = False
    # bytes the largest block's qdq keeps for the backward (None: all integer, QDQ_GRAPH_BYTES["int"] per weight),
    # the part recompute_qdq drops (MX / NVFP4 / FP8 layers), and the largest such layer's part (it exists again
    # while that layer's backward runs)
    block_qdq_graph_bytes: Optional[int] = None
    block_recomputable_graph_bytes: int = 0
    largest_recomputable_graph_bytes: int = 0
    momentum_bytes_per_weight: int = 0  # optimizer state: SignSGD momentum 4 (momentum > 0), AdamW 8 (enable_adam)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes of each component at the peak of the block walk (module docstring)."""

    cached_inputs: int
    call_args: int
    model_weights: int
    block_state: int
    activations: int
    packed_output: int
    batch_size: int
    gradient_accumulate_steps: int
    recompute_qdq: bool = False
    chains_on_device: bool = False  # the cached chains and call args live on the accelerator (module docstring)

    @property
    def chains(self) -> int:
        return self.cached_inputs + self.call_args

    @property
    def host(self) -> int:
        """What stays in host memory on an accelerator: the packed output, the cached chains and call args
        unless they are on the device (and the weights off device)."""
        return self.packed_output + (0 if self.chains_on_device else self.chains)

    @property
    def device_work(self) -> int:
        """What one block's tuning allocates where it computes: tunables and one micro-batch's activations
        (and the cached chains with call args when they are kept there)."""
        return self.block_state + self.activations + (self.chains if self.chains_on_device else 0)

    @property
    def tuning(self) -> int:
        """Peak added by the tuning on top of the loaded model (what a test can measure)."""
        return self.host + self.device_work

    @property
    def total(self) -> int:
        return self.tuning + self.model_weights

    def components(self) -> dict[str, int]:
        where = " (on the device)" if self.chains_on_device else ""
        return {"cached block inputs" + where: self.cached_inputs, "block call arguments" + where: self.call_args,
                "model weights": self.model_weights,
                "one block's tunables + grads" + (" (recompute_qdq)" if self.recompute_qdq else ""): self.block_state,
                f"activations (batch {self.batch_size})": self.activations, "packed output": self.packed_output}

    def table(self) -> str:
        rows = [f"  {k:<32} {format_bytes(v):>10}" for k, v in self.components().items()]
        return "\n".join(["predicted peak memory of the SignRound block walk:", *rows,
                          f"  {'total':<32} {format_bytes(self.total):>10}"])


def estimate_signround_memory(shape: MemoryShape, batch_size: int, gradient_accumulate_steps: int = 1,
                              recompute_qdq: bool = False, chains_on_device: bool = False) -> MemoryBreakdown:
    """The predicted peak of a SignRound run of `shape` with micro-batch `batch_size` (pure arithmetic)."""
    n, t, h = shape.nsamples, shape.seqlen, shape.hidden
    b = min(batch_size, n)
    chain = n * t * h * shape.dtype_bytes
    chains = 5 if shape.enable_quanted_input else 3
    call_args = n * t * t * shape.dtype_bytes if shape.eager_attention else n * t * 8
    # per weight element: grouped fp32 copy, V, grad V, best V, the matmul's fake-quantized weight, and the qdq
    # graph; per group: wmin, wmax, alpha, beta, their grads and snapshots
    graph = shape.block_qdq_graph_bytes
    if graph is None:
        graph = shape.block_weight_elems * QDQ_GRAPH_BYTES["int"]
    if recompute_qdq:
        graph -= shape.block_recomputable_graph_bytes - shape.largest_recomputable_graph_bytes
    block_state = (shape.block_weight_elems * (4 * 5 + shape.momentum_bytes_per_weight) + graph
                   + shape.block_groups * 4 * 10)
    per_token = ACT_PER_HIDDEN * h + ACT_PER_INTERMEDIATE * shape.intermediate
    act_bytes = 4 + (2 if shape.amp else 0)
    activations = b * t * per_token * act_bytes
    if shape.eager_attention:
        activations += ACT_SCORES * b * shape.heads * t * t * 4
    return MemoryBreakdown(
        cached_inputs=chains * chain, call_args=call_args, model_weights=shape.weight_bytes, block_state=block_state,
        activations=activations, packed_output=shape.packed_bytes, batch_size=b,
        gradient_accumulate_steps=gradient_accumulate_steps, recompute_qdq=recompute_qdq,
        chains_on_device=chains_on_device,
    )


# ------------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class MemoryDecision:
    """What the planner chose: the breakdown at the chosen batch, and whether it changed the settings."""

    breakdown: MemoryBreakdown
    available: Optional[int]
    adjusted: bool


def plan_batches(shape: MemoryShape, batch_size: int, gradient_accumulate_steps: int, available: Optional[int],
                 *, device_available: Optional[int] = None, auto_adjust: bool = True,
                 recompute_qdq: bool = False, chains_on_device: bool = False) -> MemoryDecision:
    """Keep the settings when they fit; else move the cached chains to the host if they were asked on the device
    (same results); else turn recompute_qdq on where the block has MX / NVFP4 / FP8 layers (same results,
    whatever auto_adjust says); else halve the micro-batch (doubling gradient_accumulate_steps, so the effective
    batch is kept) until they do; raise MemoryPlanError when even batch 1 does not fit. The decision's breakdown
    says whether recompute_qdq is on and where the chains are.

    available: host bytes free for the run (None: unknown, nothing is checked). device_available: bytes free on
    the accelerator, or None when tuning on the CPU (then everything counts against `available`).
    chains_on_device: try the cached chains on the accelerator first (low_gpu_mem_usage=False).
    """
    def fits(br: MemoryBreakdown) -> bool:
        if device_available is None:
            return available is None or br.total <= available
        host_ok = available is None or br.host <= available
        return host_ok and br.device_work + br.model_weights <= device_available

    b, gas = batch_size, gradient_accumulate_steps
    br = estimate_signround_memory(shape, b, gas, recompute_qdq, chains_on_device)
    if fits(br):
        return MemoryDecision(br, available, adjusted=False)
    if chains_on_device:
        br = estimate_signround_memory(shape, b, gas, recompute_qdq)
        if fits(br):
            return MemoryDecision(br, available, adjusted=False)
    if not recompute_qdq and shape.block_recomputable_graph_bytes:
        recompute_qdq = True
        br = estimate_signround_memory(shape, b, gas, recompute_qdq)
        if fits(br):
            return MemoryDecision(br, available, adjusted=False)
    while auto_adjust and b > 1:
        if b % 2:  # an odd batch cannot be split evenly: the effective batch would change
            break
        b, gas = b // 2, gas * 2
        br = estimate_signround_memory(shape, b, gas, recompute_qdq)
        if fits(br):
            return MemoryDecision(br, available, adjusted=True)
    where = "host" if device_available is None else "host / device"
    limit = format_bytes(available) if device_available is None else \
        f"{format_bytes(available) if available is not None else '?'} / {format_bytes(device_available)}"
    tried = f"even at batch_size={b}" if auto_adjust else "(auto_adjust_memory is off)"
    raise MemoryPlanError(
        f"the tuning needs about {format_bytes(br.total)} ({format_bytes(br.cached_inputs)} of cached block "
        f"inputs, {format_bytes(br.model_weights)} of weights) {tried}, more than the {limit} available ({where}); "
        "use fewer or shorter samples (--nsamples, --seqlen), a smaller --batch_size, keep --low_cpu_mem_usage "
        "on, or raise --memory_limit if the limit is wrong")


# ------------------------------------------------------------------------------------------- the model side


def parse_memory(value: "int | str | None") -> Optional[int]:
    """'12GB' / '500MiB' / 10**9 -> bytes; None -> None."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"memory_limit must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"cannot parse memory_limit {value!r}; use e.g. '12GB', '500MiB' or a number of bytes "
                         "(CLI: --memory_limit 12GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def host_available() -> Optional[int]:
    """Free host memory (psutil's `available`, else MemAvailable of /proc/meminfo), or None where unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_free(device: str) -> Optional[int]:
    """Free memory of a CUDA device (torch.cuda.mem_get_info), None for the CPU and devices we cannot ask."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(dev)[0])
    return None


def memory_shape(model: nn.Module, layer_schemes: Mapping[str, Any], blocks: list[tuple[str, nn.Module]], *,
                 nsamples: int, seqlen: int, enable_quanted_input: bool, amp: bool) -> MemoryShape:
    """MemoryShape of a model about to be tuned: config dimensions, weight bytes, the largest block's layers."""
    from ..layers import layer_shape

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0))
    inter = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden)
    heads = int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1))
    params = {id(p): p for p in model.parameters()}.values()
    weight_bytes = sum(p.numel() * p.element_size() for p in params if not p.is_meta)
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    elems, groups, packed, graph, recomputable, largest_recomputable = 0, 0, 0, 0, 0, 0
    for name, scheme in layer_schemes.items():
        if not scheme.is_quantized:
            continue
        out_f, in_f = layer_shape(model.get_submodule(name))
        gs = scheme.group_size if isinstance(scheme.group_size, int) and scheme.group_size > 0 else in_f
        packed += out_f * in_f * scheme.bits // 8 + out_f * -(-in_f // gs) * 4
    for bname, _ in blocks:
        b_elems, b_groups, b_graph, b_recomputable = 0, 0, 0, 0
        for name, scheme in layer_schemes.items():
            if scheme.is_quantized and name.startswith(bname + "."):
                out_f, in_f = layer_shape(model.get_submodule(name))
                gs = scheme.group_size if isinstance(scheme.group_size, int) and scheme.group_size > 0 else in_f
                b_elems, b_groups = b_elems + out_f * in_f, b_groups + out_f * -(-in_f // gs)
                kind = "gguf" if scheme.gguf is not None else "int" if scheme.is_int else "float"
                layer_graph = out_f * in_f * QDQ_GRAPH_BYTES[kind]
                b_graph += layer_graph
                if kind == "float":  # the graphs recompute_qdq drops
                    b_recomputable += layer_graph
                    largest_recomputable = max(largest_recomputable, layer_graph)
        elems, groups = max(elems, b_elems), max(groups, b_groups)
        graph, recomputable = max(graph, b_graph), max(recomputable, b_recomputable)
    attn = getattr(cfg, "_attn_implementation", None) or getattr(model.config, "_attn_implementation", None)
    return MemoryShape(
        nsamples=nsamples, seqlen=seqlen, hidden=hidden, intermediate=inter, heads=heads,
        dtype_bytes=torch.finfo(dtype).bits // 8, weight_bytes=weight_bytes, block_weight_elems=elems,
        block_groups=groups, packed_bytes=packed, eager_attention=attn == "eager",
        enable_quanted_input=enable_quanted_input, amp=amp, block_qdq_graph_bytes=graph,
        block_recomputable_graph_bytes=recomputable, largest_recomputable_graph_bytes=largest_recomputable,
    )


def optimizer_state_bytes(tuning: Any) -> int:
    """Optimizer state per tuned weight: AdamW's two fp32 moments (enable_adam) 8, SignSGD's momentum buffer 4,
    plain signed steps 0."""
    return 8 if tuning.enable_adam else 4 if tuning.momentum else 0


def plan_signround_memory(model: nn.Module, layer_schemes: Mapping[str, Any], blocks: list[tuple[str, nn.Module]],
                          tuning: Any, *, nsamples: int, seqlen: int, device: str, enable_quanted_input: bool,
                          memory_limit: "int | str | None" = None, auto_adjust: bool = True,
                          low_gpu_mem_usage: bool = True) -> tuple[Any, bool, bool]:
    """Log the predicted peak; returns (`tuning`, a SignRoundConfig with a smaller micro-batch if needed,
    whether the host has room for `large_blocks_reused`, whether the cached chains stay on `device`).

    memory_limit overrides the detected free memory (host, or device when tuning on CUDA). low_gpu_mem_usage
    False asks for the chains on an accelerator (kept on the host when they do not fit there). Raises
    MemoryPlanError before any heavy work when nothing fits.
    """
    shape = memory_shape(model, layer_schemes, blocks, nsamples=nsamples, seqlen=seqlen,
                         enable_quanted_input=enable_quanted_input, amp=tuning.amp_dtype is not None)
    shape = dataclasses.replace(shape, momentum_bytes_per_weight=optimizer_state_bytes(tuning))
    limit = parse_memory(memory_limit)
    dev_free = device_free(device)
    if dev_free is not None:
        host, dev = host_available(), (limit if limit is not None else dev_free)
    else:
        host, dev = (limit if limit is not None else host_available()), None
    want_device = not low_gpu_mem_usage and torch.device(device).type != "cpu"
    decision = plan_batches(shape, tuning.batch_size, tuning.gradient_accumulate_steps, host,
                            device_available=dev, auto_adjust=auto_adjust, recompute_qdq=tuning.recompute_qdq,
                            chains_on_device=want_device)
    br = decision.breakdown
    if want_device and not br.chains_on_device:
        logger.warning("memory: the cached block inputs (%s) do not fit on %s beside the tuning: they stay in host "
                       "memory as with low_gpu_mem_usage=True (same results, a copy per micro-batch)",
                       format_bytes(br.chains), device)
    avail = format_bytes(host) if host is not None else "unknown"
    logger.info("%s\n  %-32s %10s%s", br.table(), "available", avail,
                f" host, {format_bytes(dev)} on {device}" if dev is not None else "")
    if br.recompute_qdq and not tuning.recompute_qdq:
        logger.warning("memory: recompute_qdq on (the MX / NVFP4 / FP8 qdq graphs are rebuilt in the backward "
                       "pass: same results, a few %% slower) so the predicted peak fits")
        tuning = dataclasses.replace(tuning, recompute_qdq=True)
    roomy = room_for_large_block_reuse(br, host)
    if not decision.adjusted:
        return tuning, roomy, br.chains_on_device
    logger.warning("memory: batch_size %d -> %d with gradient_accumulate_steps %d -> %d (same effective batch of %d) "
                   "so the predicted peak fits; losses are summed in a different order, so results differ slightly "
                   "from a run with batch_size %d (auto_adjust_memory=False / --disable_auto_adjust_memory keeps "
                   "the settings and fails instead)", tuning.batch_size, br.batch_size,
                   tuning.gradient_accumulate_steps, br.gradient_accumulate_steps,
                   tuning.batch_size * tuning.gradient_accumulate_steps, tuning.batch_size)
    adjusted = dataclasses.replace(tuning, batch_size=br.batch_size,
                                   gradient_accumulate_steps=br.gradient_accumulate_steps)
    return adjusted, roomy, br.chains_on_device


def room_for_large_block_reuse(breakdown: MemoryBreakdown, host_available: Optional[int]) -> bool:
    """Whether the host can afford keeping freed blocks above 32 MiB in the heap (model/memory.py
    `large_blocks_reused`): the holes they leave cost +10-14 % of the peak measured, all of it activation-sized,
    so one more micro-batch of activations must fit on top of the predicted peak. True when the free memory is
    unknown (nothing is checked then, as for the plan itself)."""
    return host_available is None or breakdown.total + breakdown.activations <= host_available


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
