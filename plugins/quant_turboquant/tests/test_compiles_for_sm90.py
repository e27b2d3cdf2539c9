"""The kernels compile for an H100 (sm_90) on any machine, GPU or not.

The CPU interpreter runs Python semantics and accepts code that the compiler
refuses (a plain global inside a kernel, branches returning different
types), so every decode and write variant is compiled here, in a process
without ``TRITON_INTERPRET`` (``benchmarks/count_sass.py --check``)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

COUNT_SASS = Path(__file__).resolve().parents[3] / "benchmarks" / "count_sass.py"


@pytest.mark.skipif(not COUNT_SASS.exists() or importlib.util.find_spec("triton") is None,
                    reason="needs the repository's benchmarks/ and Triton")
def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(COUNT_SASS), "--check"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    from kernelplane_quant_turboquant import gluon_decode

    assert run.stdout.count("compiled") == 21 + (6 if gluon_decode.gluon is not None else 0)
