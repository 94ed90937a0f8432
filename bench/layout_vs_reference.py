"""Compare our auto_round export with the reference's (auto-round 0.16.1 in .venv-peer) on a tiny Llama.

    ../shared/peer/setup.sh .venv-peer && .venv/bin/python bench/layout_vs_reference.py

Both run RTN (iters 0) W4A16 and W2A16 at group size 32. Checks: identical tensor names, dtypes and
shapes, identical qzeros, and identical codes/scales when our RTN is fed the weights cast to bf16 (the
reference computes in bf16 on CPU). Not part of the test suite: it needs the reference installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from auto_round.packing import unpack_qweight  # noqa: E402
from auto_round.quant.int_qdq import quantize_weight_rtn  # noqa: E402
from tiny_models import tiny_model, tiny_tokenizer  # noqa: E402


def run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)


def compare(work: Path, scheme: str, bits: int, peer_bin: Path) -> dict:
    src = work / "tinyllama"
    run([str(peer_bin / "auto-round-rtn"), "--model", str(src), "--scheme", scheme, "--group_size", "32",
         "--device_map", "cpu", "--output_dir", str(work / f"ref_{scheme}")], cwd=work)
    run([str(ROOT / ".venv/bin/auto-round-rtn"), "--model", str(src), "--scheme", scheme, "--group_size", "32",
         "--output_dir", str(work / f"ours_{scheme}")], cwd=work)
    ref_dir = next((work / f"ref_{scheme}").iterdir())
    ref, ours = load_file(str(ref_dir / "model.safetensors")), load_file(str(work / f"ours_{scheme}/model.safetensors"))
    weights = load_file(str(src / "model.safetensors"))
    layers = [k[: -len(".qweight")] for k in ref if k.endswith(".qweight")]
    identical = 0
    for name in layers:
        w = weights[f"{name}.weight"].to(torch.bfloat16).float()
        _, res, layout = quantize_weight_rtn(w, bits, 32, True)
        codes = unpack_qweight(ref[f"{name}.qweight"], bits, w.shape[1])
        identical += torch.equal(layout.from_groups(res.q).int(), codes) and torch.equal(res.scale.t().half(), ref[f"{name}.scales"])
    return {
        "scheme": scheme,
        "same_tensor_names": sorted(ref) == sorted(ours),
        "same_dtypes_and_shapes": all(ref[k].dtype == ours[k].dtype and ref[k].shape == ours[k].shape for k in ref),
        "same_qzeros": all(torch.equal(ref[k], ours[k]) for k in ref if k.endswith(".qzeros")),
        "layers_bit_identical_on_bf16_weights": f"{identical}/{len(layers)}",
        "reference_packing": json.loads((ref_dir / "config.json").read_text())["quantization_config"]["packing_format"],
    }


def main() -> None:
    peer_bin = ROOT / ".venv-peer/bin"
    if not (peer_bin / "auto-round-rtn").exists():
        sys.exit("reference not installed: run ../shared/peer/setup.sh .venv-peer first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny_model("llama").save_pretrained(work / "tinyllama")
        tiny_tokenizer().save_pretrained(work / "tinyllama")
        for scheme, bits in (("W4A16", 4), ("W2A16", 2)):
            print(json.dumps(compare(work, scheme, bits, peer_bin)))


if __name__ == "__main__":
    main()
