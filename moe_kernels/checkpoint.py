"""Reading safetensors checkpoints without the safetensors package (one layer at a time).

The format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}`, then the
tensor bytes (offsets relative to the end of the header). Sharded checkpoints add
`model.safetensors.index.json` with `{"weight_map": {name: shard file}}`. Only the
requested tensors are read (a DeepSeek-V3 layer is ~11 GB of a 690 GB checkpoint).
Writing is provided for tests and tools (`save_file`).
"""

from __future__ import annotations

import json
import os
import struct

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_header(path: str) -> tuple[dict, int]:
    """(tensor entries by name, byte offset of the data section)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: str, names) -> dict[str, torch.Tensor]:
    """The named tensors of one .safetensors file, read with one seek each."""
    header, base = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name in names:
            if name not in header:
                raise KeyError(f"{path}: no tensor {name!r}")
            entry = header[name]
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
            begin, end = entry["data_offsets"]
            f.seek(base + begin)
            data = bytearray(f.read(end - begin))
            dtype = DTYPES[entry["dtype"]]
            t = (torch.frombuffer(data, dtype=torch.uint8) if data
                 else torch.empty(0, dtype=torch.uint8))
            out[name] = t.view(dtype).reshape(entry["shape"])
    return out


def weight_map(directory: str) -> dict[str, str]:
    """name -> shard file name: from the index of a sharded checkpoint, or the single file."""
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return json.load(f)["weight_map"]
    single = os.path.join(directory, SINGLE)
    if os.path.exists(single):
        return {name: SINGLE for name in read_header(single)[0]}
    raise FileNotFoundError(f"{directory}: neither {INDEX} nor {SINGLE}")


def load_prefix(directory: str, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with prefix, reading only their shards' byte ranges."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map(directory).items():
        if name.startswith(prefix):
            by_shard.setdefault(shard, []).append(name)
    out = {}
    for shard, names in by_shard.items():
        out.update(read_tensors(os.path.join(directory, shard), names))
    return out


def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Writes tensors (CPU, any strides) as one .safetensors file."""
    header, blobs, at = {}, [], 0
    for name, t in tensors.items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)       # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
