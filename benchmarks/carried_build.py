"""A build of moe_kernels._C made on another machine, carried to the GPU machine so that a
short device session does not spend its first minutes compiling.

`CARRY=1 PYTHON=python3.12 bash benchmarks/cuda_build_check.sh` builds the extension
against the GPU machine's torch and python and leaves the .so in moe_kernels/ with a stamp
(`moe_kernels/_C.build-stamp`: a digest of the sources it was built from, the torch
version, the file name). On the GPU machine `python3 benchmarks/carried_build.py check`
exits 0 when that .so stands in for a build there: the sources and torch match and it
loads with its CUDA kernels; gpu_check.sh then skips its build stage, and builds when the
check says why not.

Usage: python3 benchmarks/carried_build.py write SO_PATH | check
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAMP = ROOT / "moe_kernels" / "_C.build-stamp"
BUILD_INPUTS = ("setup.py", "pyproject.toml")


def source_digest(root: pathlib.Path = ROOT) -> str:
    """sha256 over the path and bytes of every file the build reads."""
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    files += [root / name for name in BUILD_INPUTS]
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def write(so_path: str) -> None:
    import torch
    STAMP.write_text(json.dumps({"digest": source_digest(), "torch": torch.__version__,
                                 "so": pathlib.Path(so_path).name}, indent=1))
    print(f"carried_build: stamp for {pathlib.Path(so_path).name} (torch {torch.__version__})")


def why_not_usable() -> str | None:
    """None when the carried .so stands in for a build here, else why not."""
    if not STAMP.exists():
        return "no carried build"
    stamp = json.loads(STAMP.read_text())
    if not (ROOT / "moe_kernels" / stamp["so"]).exists():
        return f"{stamp['so']} is missing"
    if stamp["digest"] != source_digest():
        return "the sources changed since it was built"
    import torch
    if stamp["torch"] != torch.__version__:
        return f"built against torch {stamp['torch']}, this is {torch.__version__}"
    from moe_kernels import _library
    if not _library.extension_loaded():
        return f"{stamp['so']} does not load here"
    if torch.cuda.is_available() and not _library.extension_has_cuda():
        return f"{stamp['so']} has no CUDA kernels"
    return None


def main(argv) -> int:
    if argv[:1] == ["write"] and len(argv) == 2:
        write(argv[1])
        return 0
    if argv == ["check"]:
        reason = why_not_usable()
        print(f"carried_build: {reason or 'usable'}")
        return 0 if reason is None else 1
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
