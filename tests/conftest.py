"""Session-wide settings, applied before any test imports jax.

Many tests start the command-line programs in subprocesses, which compile the same tiny
programs again and again; a persistent compilation cache, fresh for each session and
inherited by the subprocesses, turns those recompilations into cache reads."""
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gpt-jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data_dir per test module: its prepared corpus (and learned BPE) shared by its tests."""
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(params=["xla", "cpu"])
def ops(request):
    """The model's compute: gpt.ops' reference (what GPUs and TPUs run) and gpt/cpu's kernels."""
    from gpt import cpu, ops
    return ops.REFERENCE if request.param == "xla" else cpu.ops()
