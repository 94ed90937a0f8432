"""Equally valid FP8 RTN realizations of an FP8_STATIC auto_round export (per-channel scales, fp32 source weights).

    .venv/bin/python bench/fp8_rtn_perturbations.py EXPORT_DIR SOURCE_MODEL_DIR K

W' = W * (1 + eps * u), u ~ U(-1, 1) per weight (seed 0..K-1), eps = 2^-9 (half a bf16 ulp: the size of the
reference's detour through bf16 copies), rounded to e4m3 with the export's own per-channel scales; activation
scales untouched. Writes /tmp/s34-perturb<seed> (copies of EXPORT_DIR without the manifest), to be scored with
bench/paired_ppl.py against the export: the spread of those scores is the spread of equally accurate roundings.
"""
import shutil, sys, torch
from safetensors.torch import load_file, save_file
ours_dir, src, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
ours = load_file(ours_dir + "/model.safetensors"); fp = load_file(src + "/model.safetensors")
for seed in range(k):
    g = torch.Generator().manual_seed(seed)
    t = dict(ours); changed = total = 0
    for name, q in ours.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        w = fp[name].float(); s = ours[name.replace(".weight", ".weight_scale")].float().reshape(-1, 1)
        u = torch.rand(w.shape, generator=g) * 2 - 1
        new = (w * (1 + u * 2 ** -9) / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        changed += (new.view(torch.uint8) != q.view(torch.uint8)).sum().item(); total += q.numel()
        t[name] = new
    d = f"/tmp/s34-perturb{seed}"  # scratch copies, not artifacts
    shutil.rmtree(d, ignore_errors=True); shutil.copytree(ours_dir, d)
    (__import__("pathlib").Path(d) / "quantization_manifest.json").unlink()
    save_file(t, d + "/model.safetensors", metadata={"format": "pt"})
    print(d, f"{changed / total:.4%} codes changed")
