"""Run in a fresh process by tests/test_memory_plan.py: args nsamples seqlen batch attn; prints measured/predicted."""
import json, resource, sys, psutil, torch, transformers as tf
from auto_round import AutoRound
from auto_round.model.blocks import iter_blocks
from auto_round.model.memory_plan import estimate_signround_memory, memory_shape
n, t, b, attn = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=t, attn_implementation=attn)
model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
ids = torch.randint(0, 260, (n, t), generator=torch.Generator().manual_seed(0))
ar = AutoRound(model, dataset=ids, iters=2, nsamples=n, seqlen=t, batch_size=b, amp=False, device="cpu")
shape = memory_shape(model, ar.layer_schemes, list(iter_blocks(model, ar.block_groups)), nsamples=n, seqlen=t,
                     enable_quanted_input=True, amp=False)
br = estimate_signround_memory(shape, b)
def vm_hwm() -> int:
    """Peak RSS in bytes since the last reset (VmHWM of /proc/self/status)."""
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


try:  # reset the high-water mark so that transients before quantize() (imports, model init) do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak_of = vm_hwm
except OSError:
    peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
base = psutil.Process().memory_info().rss
ar.quantize()
peak = peak_of()
print(json.dumps({"measured": peak - base, "predicted": br.tuning, "parts": br.components()}))
