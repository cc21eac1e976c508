"""Peak memory of one phase, measured in a fresh subprocess (VmHWM after resetting it, minus VmRSS before)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent('''
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)

    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def measure(fn):
        """(result, seconds, peak bytes over the RSS just before ``fn``)."""
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status("VmRSS")
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t, _status("VmHWM") - base
''')


def run_phase(body: str, env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run ``PRELUDE + body`` in a subprocess; ``body`` prints one JSON line last, which is returned."""
    code = PRELUDE + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=os.getcwd())
    if r.returncode != 0:
        raise RuntimeError(f"phase failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
