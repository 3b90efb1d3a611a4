"""Installs a CPU build of torch into the running interpreter's environment, or says why not.

    python .ci/torch_cpu.py [VERSION]       # exit 0: a CPU torch is installed; 3: none to be had

torch is only needed for the reference checks against transformers. On a plain package index
`pip install torch` resolves to the CUDA build (gigabytes of nvidia-* wheels), so this asks pip
for its resolution first (`--dry-run --report`) with PyTorch's CPU wheel index added, and
installs only when that resolution holds no CUDA package. A torch already installed is kept
(a GPU machine's CUDA build included: the user chose it).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DEFAULT_VERSION = "2.13.0"
# wheels that only a CUDA build of torch pulls in
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")


def cuda_packages(report: dict) -> list[str]:
    """Names in a pip installation report that belong to a CUDA build of torch."""
    names = [item["metadata"]["name"].lower().replace("_", "-") for item in report.get("install", [])]
    return [n for n in names if n.startswith(CUDA_PREFIXES)]


def main(argv: list[str]) -> int:
    version = argv[0] if argv else DEFAULT_VERSION
    if importlib.util.find_spec("torch") is not None:
        print("torch is already installed here; keeping it", file=sys.stderr)
        return 0
    pip = [sys.executable, "-m", "pip", "install", "-q", "--extra-index-url", CPU_INDEX,
           "--timeout", "20", "--retries", "1", f"torch=={version}"]
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        dry = subprocess.run([*pip, "--dry-run", "--report", str(report_path)], capture_output=True, text=True)
        if dry.returncode != 0:
            print(f"pip could not resolve torch=={version}:\n{dry.stderr.strip()}", file=sys.stderr)
            return 3
        report = json.loads(report_path.read_text())
    cuda = cuda_packages(report)
    if cuda:
        print(f"pip would install a CUDA build of torch=={version} (with {', '.join(cuda[:4])}, ...): "
              f"PyTorch's CPU index ({CPU_INDEX}) could not be reached and no CPU wheel is on this "
              "machine. Not installing it.", file=sys.stderr)
        return 3
    done = subprocess.run(pip, capture_output=True, text=True)  # its unreachable-index warnings are noise
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
