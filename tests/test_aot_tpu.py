"""The sharded train step of full-size configs compiles for a TPU v5e slice on this CPU: SmolLM2-135M
here, the 1B Llama by the README's own command.

libtpu compiles for a described topology without the hardware. It lives outside the test venv
(``$JAXTOK_LIBTPU_DIR``, set by .ci/run) so that no other JAX process here tries to start a TPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _lowering import tpu_env
from test_readme import blocks_of

pytestmark = pytest.mark.slow

V5E_HBM_BYTES = 16 * 2**30

SCRIPT = """
import json, sys
from jaxtok.train.aot import tpu_devices, compile_train_step
devices = tpu_devices("v5e:2x2")
# no remat: it would double the compile time here, and SmolLM2 fits without
print("AOT " + json.dumps(compile_train_step("smollm2-135m", devices, "fsdp=4", 8, 1024, remat=False).summary()))
"""


def test_full_size_train_steps_compile_for_tpu_v5e():
    env = tpu_env()
    if env is None:
        pytest.skip("libtpu not installed (pip install --target DIR libtpu; export JAXTOK_LIBTPU_DIR=DIR)")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the README's `python`
    (readme_block,) = blocks_of("aot")
    (command,) = readme_block.lines()
    assert "--model llama-1b" in command
    report = {}
    for model, args in (("smollm2-135m", [sys.executable, "-c", SCRIPT]), ("llama-1b", ["bash", "-c", command])):
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(("AOT ", "{"))]
        assert proc.returncode == 0 and lines, proc.stderr[-3000:]
        report[model] = json.loads(lines[-1].removeprefix("AOT "))
    for model, expected_params in (("smollm2-135m", 134_515_008), ("llama-1b", None)):
        r = report[model]
        print(f"{model}: {json.dumps(r)}")
        if expected_params:
            assert r["num_params"] == expected_params
        # params + two Adam moments in float32, split over 4 chips by FSDP (norms stay replicated)
        sharded_state = 3 * 4 * r["num_params"] / 4
        assert 0.9 * sharded_state < r["argument_size_in_bytes"] < 1.5 * sharded_state
        assert r["argument_size_in_bytes"] + r["temp_size_in_bytes"] < V5E_HBM_BYTES
    assert 0.9e9 < report["llama-1b"]["num_params"] < 1.3e9
