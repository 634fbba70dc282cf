"""pfp_kernels: standalone fused kernels for PFP-style video memory compression.

Ops (each with C++ CPU, Triton CUDA and plain-PyTorch reference implementations):

- :func:`conv3d_act`, :func:`causal_conv3d_act`, :func:`project_tokens`
- :func:`joint_attention`, :func:`merge_attention`, :func:`attention_backends`; and
  :class:`JointKVBuffer`, the same attention for a loop over one fixed context, through a
  persistent ``[context ; target]`` buffer and a stock kernel

Each op family is one folder (``conv/``, ``attention/``): API, shapes and checks, reference,
autograd and Triton kernels; the C++ kernels are in ``csrc/``. Every op's implementations are
records in one registry (``pfp_kernels._registry.OPS``), each saying why it cannot run given
inputs; ``python -m pfp_kernels.info`` lists which run on this machine and why the others don't.
"""
from . import _extension  # noqa: F401  (loads pfp_kernels._C, or warns once and falls back)
from .attention import JointKVBuffer, attention_backends, joint_attention, merge_attention
from .conv import CausalConvState, causal_conv3d_act, conv3d_act, frozen_weights, project_tokens

__version__ = "0.1.0"

__all__ = [
    "conv3d_act",
    "causal_conv3d_act",
    "CausalConvState",
    "project_tokens",
    "frozen_weights",
    "joint_attention",
    "merge_attention",
    "attention_backends",
    "JointKVBuffer",
]
