"""The manifest written last into every output directory: what the files are and how they were made.

`quantization_manifest.json` lists every file with its size and SHA-256, the versions of the packages
that wrote it, and the run's settings (seed, scheme, tuning, the calibration data's hash). It holds no
timestamps or output paths, so two runs with the same seed and inputs write byte-identical directories,
manifest included. A directory without it was not finished by us.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "quantization_manifest.json"
MANIFEST_VERSION = 1
# the run log (export/report.py): timings differ between identical runs, so these are not part of the artifact
RUN_LOG_FILES = frozenset({"events.jsonl", "report.md", "loss_per_block.png", "layer_error.png"})
_PACKAGES = ("torch", "transformers", "safetensors", "gguf", "compressed-tensors")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ("auto-round", *_PACKAGES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def write_manifest(directory: Path, fmt: str, run_info: dict[str, Any]) -> dict:
    """Hash every file under `directory` (except the manifest) and write the manifest; returns it."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                   and p.relative_to(directory).as_posix() not in RUN_LOG_FILES)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "versions": package_versions(),
        "run": run_info,
        "files": {p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                  for p in files},
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
    return manifest


def verify_manifest(directory: Path) -> list[str]:
    """Problems found comparing `directory` with its manifest ([] when every file matches)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return [f"{MANIFEST_NAME} is missing"]
    manifest = json.loads(path.read_text())
    problems = []
    for rel, entry in manifest.get("files", {}).items():
        f = Path(directory) / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != entry["bytes"] or file_sha256(f) != entry["sha256"]:
            problems.append(f"{rel}: contents differ from the manifest")
    listed = set(manifest.get("files", {}))
    extra = sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*")
                   if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(directory).as_posix() not in listed
                   and p.relative_to(directory).as_posix() not in RUN_LOG_FILES)
    problems += [f"{rel}: not in the manifest" for rel in extra]
    return problems
