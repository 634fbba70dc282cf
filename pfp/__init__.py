"""pfp: the thin training / inference layer over :mod:`pfp_kernels`.

Memory compression (PFP section 3.2):

- :class:`MemoryCompressor` - dual-branch causal compressor; ``compressor(hr, lr) -> Context``,
  ``compressor.stream(batch_size).append(hr_chunk, lr_chunk) -> Context`` (new tokens only);
- :class:`Context` - tokens ``[B, N, C]``, positions ``[N, 3]`` (t, h, w), optional mask ``[B, N]``;
- :func:`mix_contexts` - concatenate contexts of several compressors (e.g. 4x4x2 + 2x2x8);
- :func:`parse_rate` / :class:`Rate` - ``"HxWxT"`` compression rates; :data:`RATE_PRESETS`;
- :func:`plan_inputs` - what to feed each branch for a given video, VAE, patch and rate.
"""
from .compressor import COMPRESSOR_KINDS, CompressorStream, Context, MemoryCompressor, mix_contexts
from .rates import RATE_PRESETS, InputPlan, Rate, parse_rate, plan_inputs, token_positions

__all__ = [
    "MemoryCompressor",
    "COMPRESSOR_KINDS",
    "CompressorStream",
    "Context",
    "mix_contexts",
    "Rate",
    "RATE_PRESETS",
    "parse_rate",
    "plan_inputs",
    "InputPlan",
    "token_positions",
]
