"""How fast the command line answers when it only parses, and what `import mxd_lens` costs.

    python benchmarks/bench_startup.py

Prints the best of 5 wall times of `mxd-lens --help`, `--version`, two usage errors and
`python -c "import mxd_lens"`, beside `python -c "import torch"` (the cost the fast path
avoids) and a bare `python -c pass` (the interpreter's own start), in one run so the
ratios are comparable on a shared machine. The goal for the parse-only paths is < 1.5 s.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "mxd-lens"
CLI = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "mxd_lens"]
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import mxd_lens": [sys.executable, "-c", "import mxd_lens"],
    "mxd-lens --help": [*CLI, "--help"],
    "mxd-lens --version": [*CLI, "--version"],
    "mxd-lens frontier --methods bogus": [*CLI, "frontier", "--methods", "bogus", "--out", "unused"],
    "mxd-lens frontier --ks 1,x": [*CLI, "frontier", "--ks", "1,x", "--out", "unused"],
    "mxd-lens circuit --help": [*CLI, "circuit", "--help"],
    "import torch": [sys.executable, "-c", "import torch"],
    "import mxd_lens; mxd_lens.MxD (torch, TL, SAE-Lens)": [sys.executable, "-c", "import mxd_lens; mxd_lens.MxD"],
}


def best_of(cmd: list[str], n: int = 5) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, timeout=300)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    width = max(map(len, CASES))
    for name, cmd in CASES.items():
        print(f"{name:<{width}}  {best_of(cmd):6.3f} s")


if __name__ == "__main__":
    main()
