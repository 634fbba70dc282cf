import os

# The Triton kernels run on CPU tensors only under the interpreter, and pfp_kernels reads this
# flag at import time, so it is set before anything imports pfp_kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
