"""Reading (sharded) safetensors checkpoints one layer at a time, with the `safetensors`
package (an optional dependency: `pip install safetensors`, what every HF user has).

Sharded checkpoints add `model.safetensors.index.json` with `{"weight_map": {name: shard
file}}`. Only the requested tensors are read, lazily per tensor (`safe_open`), so loading
one DeepSeek-V3 layer reads its ~11 GB, not the 690 GB checkpoint. The package checks what
a hand-written reader would have to: the header length against the file size, every
tensor's byte range against the data section, shape x dtype against that range, and
overlapping ranges; a file failing any of these raises `ValueError` naming the file.
"""

from __future__ import annotations

import json
import os

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safetensors():
    try:
        import safetensors
    except ImportError:
        raise ImportError("moe_kernels: reading safetensors checkpoints needs the safetensors "
                          "package: pip install safetensors (or moe_kernels[safetensors])") \
            from None
    return safetensors


def _open(path: str):
    """safe_open(path) with a corrupt file reported as ValueError naming it."""
    st = _safetensors()
    try:
        return st.safe_open(path, framework="pt", device="cpu")
    except st.SafetensorError as exc:
        raise ValueError(f"{path}: not a valid safetensors file ({exc})") from None


def read_tensors(path: str, names) -> dict[str, torch.Tensor]:
    """The named tensors of one .safetensors file."""
    st = _safetensors()
    out = {}
    with _open(path) as f:
        present = set(f.keys())
        for name in names:
            if name not in present:
                raise KeyError(f"{path}: no tensor {name!r}")
            try:
                out[name] = f.get_tensor(name)
            except st.SafetensorError as exc:
                raise ValueError(f"{path}: tensor {name!r} cannot be read ({exc})") from None
    return out


def weight_map(directory: str) -> dict[str, str]:
    """name -> shard file name: from the index of a sharded checkpoint, or the single file."""
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    single = os.path.join(directory, SINGLE)
    if os.path.exists(single):
        with _open(single) as f:
            return {name: SINGLE for name in f.keys()}
    raise FileNotFoundError(f"{directory}: neither {INDEX} nor {SINGLE}")


def load_prefix(directory: str, prefix: str, keep=None) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with prefix (and, given keep, for which keep(name) is
    true), reading only those tensors."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map(directory).items():
        if name.startswith(prefix) and (keep is None or keep(name)):
            by_shard.setdefault(shard, []).append(name)
    out = {}
    for shard, names in by_shard.items():
        out.update(read_tensors(os.path.join(directory, shard), names))
    return out
