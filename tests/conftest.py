import os
import tempfile

import pytest  # noqa: E402
import torch  # noqa: E402

# The Triton kernels run on CPU tensors only under the interpreter, and pfp_kernels reads this
# flag at import time, so it is set before anything imports pfp_kernels. On a machine with a GPU
# the kernels run compiled instead (tests/test_cuda.py); the interpreter-only tests then skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# auto's measured choice (pfp_kernels._tuning) would time candidates on first use and write a cache
# in the home folder: the tests take the static order, except the tuning tests, which turn it on
# with their own cache file.
os.environ.setdefault("PFP_KERNELS_AUTOTUNE", "0")
os.environ.setdefault("PFP_KERNELS_CACHE", os.path.join(tempfile.mkdtemp(prefix="pfp-tuning-"), "tuning.json"))
# Deterministic mode (the NaN poison below) needs a fixed cuBLAS workspace on CUDA.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny ops: on a shared 2-core machine two OpenMP threads
    made the tiny Wan VAE calls ~30x slower than one (1.4 s vs 0.05 s per encode under load).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def wan_vae_dir(tmp_path_factory):
    """A folder with a tiny random diffusers AutoencoderKLWan (_tiny_pfp.save_tiny_wan_vae), saved
    once for the session: the tests only read it."""
    from _tiny_pfp import save_tiny_wan_vae
    path = tmp_path_factory.mktemp("wanvae") / "vae"
    save_tiny_wan_vae(path)
    return path


@pytest.fixture
def poison_uninitialised():
    """Deterministic mode with NaN-filled uninitialised memory: torch.empty (and the C++ kernels'
    at::empty) return NaNs, so an output element a kernel forgets to write shows up as NaN.
    Use with ``pytestmark = pytest.mark.usefixtures("poison_uninitialised")``."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
