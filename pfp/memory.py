"""Memory planner: where each part of a model lives so that every phase of a chunk fits a GPU budget.

``python -m pfp.memory --config wan22-ti2v-5b-480p --vram 12GiB [--seconds S] [--history S]``

How it estimates. The real modules (the diffusers Wan transformer and VAE, transformers' UMT5, our
compressor) are built under ``FakeTensorMode`` (shapes and dtypes, no storage, no weights, no GPU),
and each phase of one chunk runs through the real code under PyTorch's
``torch.distributed._tools.mem_tracker.MemTracker``, which records the peak of the tensors the phase
creates. A phase's peak on the GPU is then:

    allowance + the weights resident in that phase (per the plan) + what stays resident across
    phases (context K/V, the VAE's causal cache) + the phase's traced transient peak

The phases of a generated chunk: ``text`` (prompt encoding), ``compress`` (the compressor's append),
``context_kv`` (the new tokens' K/V, attending to the cached ones; the old and new cache coexist
until the old is dropped), ``denoise`` (one sampler step, CFG batch 2) and ``decode`` (the VAE's
streamed decode, its causal cache included).

The allowance, a stated constant, covers what tensors don't show: the CUDA context and cuBLAS
workspaces (``ALLOWANCE_BYTES``) and the caching allocator's rounding and fragmentation
(``ALLOWANCE_FRACTION`` of the rest).

The choices, and the plan it picks: every combination of

- ``weights``: ``bf16``, or ``fp8`` (the transformer's linear weights stored in float8, upcast per
  layer as they run: diffusers' layerwise casting);
- ``offload``: ``none``, or ``block`` (the transformer's blocks on the CPU, each brought in before it
  runs with the next one prefetched on a side stream: diffusers' block-level group offload);
- ``swap``: the VAE off the GPU while the transformer runs, and the transformer off it while the
  VAE decodes;
- ``text``: ``gpu`` (the encoder resident), ``free`` (on the GPU for the storyboard's prompts, which
  are encoded once, then freed) or ``cpu``;
- ``kv``: the context K/V in ``bf16`` or ``fp8``;

is estimated, and the one that fits with the least estimated time lost to the choices themselves
(transfers at ``PCIE_BYTES_PER_S``, fp8 upcasts at ``HBM_BYTES_PER_S``; half a prefetched block's
transfer assumed hidden behind compute) wins. A budget that nothing fits is refused with one line
naming the smallest budget that does.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import re
import sys
import weakref
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

GIB = 1 << 30
ALLOWANCE_BYTES = 768 << 20      # CUDA context (~500 MiB with torch's kernels loaded) + cuBLAS workspaces
ALLOWANCE_FRACTION = 0.05        # allocator rounding and fragmentation, of everything else
PCIE_BYTES_PER_S = 25e9          # host <-> device, pinned memory, PCIe 4 x16 in practice
HBM_BYTES_PER_S = 1e12           # on-device reads + writes (fp8 -> bf16 upcasts)
PHASES = ("text", "compress", "context_kv", "denoise", "decode")


# ------------------------------------------------------------------------------------------------
# presets: the real models' architectures (no weights, no folder needed to plan)
# ------------------------------------------------------------------------------------------------
WAN22_5B_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                            out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)


@dataclass(frozen=True)
class Preset:
    """A real model's shapes: its transformer, VAE and text encoder configs, and the video it makes."""

    name: str
    video_size: tuple          # (height, width)
    fps: float
    chunk_frames: int          # video frames per chunk (1 s)
    rate: str
    transformer: dict = field(default_factory=lambda: dict(WAN22_5B_TRANSFORMER))
    vae: dict = field(default_factory=lambda: dict(WAN22_VAE))
    text: dict = field(default_factory=lambda: dict(UMT5_XXL))
    text_length: int = 512
    compressor_hidden: tuple = (64, 128, 256, 512)


PRESETS = {
    "wan22-ti2v-5b-480p": Preset("wan22-ti2v-5b-480p", (480, 832), 24.0, 24, "4x4x2"),
    "wan22-ti2v-5b-720p": Preset("wan22-ti2v-5b-720p", (704, 1280), 24.0, 24, "4x4x2"),
}


def preset(name: str, rate: Optional[str] = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--config {name!r} is not a preset; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    if rate is not None:
        from pfp.rates import parse_rate
        parse_rate(rate)
        p = Preset(**{**asdict(p), "rate": rate, "video_size": tuple(p.video_size),
                      "compressor_hidden": tuple(p.compressor_hidden)})
    return p


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, name: str = "--vram") -> int:
    """``"12GiB"``, ``"8 GB"``, ``"512MiB"`` -> bytes. A unit is required; the value must be > 0."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} must be a positive size with a unit (B, KB, MB, GB, KiB, MiB, GiB, ...), "
                         f"e.g. 12GiB; got {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {text!r}")
    return int(value)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ------------------------------------------------------------------------------------------------
# tracing
# ------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """What the trace found, in bytes (weights at their traced dtype, bf16 for the presets)."""

    target_tokens: int
    context_tokens: int
    transformer: int              # all transformer weights
    transformer_linear: int       # of which the blocks' linear weights (what fp8 halves)
    largest_block: int
    blocks: int                   # all block weights (what block offload moves)
    vae: int
    text: int
    compressor: int               # its own weights (the patch embedding is the transformer's)
    kv: int                       # the context K/V of the whole history, all layers
    vae_cache: int                # the VAE's causal cache between chunks
    transient: dict               # phase -> traced peak of what the phase creates


class _PeakMemory(TorchDispatchMode):
    """Live bytes of the storages that ops create under it, and their peak. A storage counts once,
    from the op that made it until it is freed; storages that existed before (weights, inputs, the
    previous cache) are resident, not counted. Works on fake tensors: their storages have sizes.
    (PyTorch's MemTracker does this per module too, but refuses modules called more than once in
    one trace, as the VAE's causal decode does.)"""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int, _ref) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    self._seen[st] = None  # resident: existed before the trace
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    nbytes = st.nbytes()
                    self._seen[st] = weakref.ref(st, functools.partial(self._freed, nbytes))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def _tracked_peak(fn) -> int:
    """Peak bytes of the tensors ``fn`` creates (activations and temporaries), traced."""
    tracker = _PeakMemory()
    with tracker:
        fn()
    return int(tracker.peak)


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _linear_bytes(module: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if isinstance(m, nn.Linear))


def trace_preset(p: Preset, history_seconds: float, dtype: torch.dtype = torch.bfloat16) -> Trace:
    """Trace one chunk of preset ``p`` after ``history_seconds`` of history, in ``dtype``, under
    FakeTensorMode (seconds on a CPU; nothing is allocated)."""
    from diffusers import AutoencoderKLWan
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import UMT5Config, UMT5EncoderModel

    from pfp.backbones import WanBackbone
    from pfp.compressor import MemoryCompressor
    from pfp.vae import WanVAE

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    previous = torch.get_default_dtype()
    # Token positions are real (tiny) tensors: the backbone reads them to find the context's frames.
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        torch.set_default_dtype(dtype)  # modules are built in dtype without ever holding fp32 copies
        try:
            backbone = WanBackbone.from_config(context_mode="cached", **p.transformer)
            vae = WanVAE(AutoencoderKLWan(**p.vae))
            text_model = UMT5EncoderModel(UMT5Config(**p.text))
            compressor = MemoryCompressor(backbone.patch_embed, backbone.latent_channels, backbone.inner_dim,
                                          rate=p.rate, hidden=p.compressor_hidden)
        finally:
            torch.set_default_dtype(previous)
        s, tf = vae.spatial_factor, vae.temporal_factor
        h, w = p.video_size[0] // s, p.video_size[1] // s
        n = p.chunk_frames // tf
        c = backbone.latent_channels
        chunk = torch.randn(1, c, n, h, w, dtype=dtype)
        target_tokens = math.prod(backbone.token_grid(n, h, w))
        history_chunks = max(0, int(round(history_seconds * p.fps / p.chunk_frames)))

        # the context: the history's tokens, as the stream makes them, plus one chunk's new ones
        hist_t = history_chunks * n
        context_tokens = (math.prod(compressor.token_grid((hist_t, h, w))) if hist_t else 0)
        new_tokens = math.prod(compressor.token_grid((hist_t + n, h, w))) - context_tokens
        inner, layers = backbone.inner_dim, len(backbone.blocks)
        heads, head_dim = backbone.num_heads, backbone.head_dim
        elem = torch.tensor([], dtype=dtype).element_size()

        transient = {}
        ids = torch.zeros(1, p.text_length, dtype=torch.long)
        transient["text"] = _tracked_peak(lambda: text_model(input_ids=ids))

        lr_chunk = torch.randn(compressor.expected_lr_shape(chunk.shape), dtype=dtype)
        transient["compress"] = _tracked_peak(lambda: compressor.stream(1).append(chunk, lr_chunk))

        from pfp.backbones.wan_style import ContextKV
        from pfp.compressor import Context

        def fake_cache(tokens: int):
            if tokens == 0:
                return None
            shape = (1, tokens, heads, head_dim)
            with unset_fake_temporarily():
                pos = torch.zeros(tokens, 3)
            return ContextKV([torch.empty(shape, dtype=dtype) for _ in range(layers)],
                             [torch.empty(shape, dtype=dtype) for _ in range(layers)], pos)

        old = fake_cache(context_tokens)
        t0 = float(hist_t)
        with unset_fake_temporarily():
            new_pos = torch.full((new_tokens, 3), t0)
        new_ctx = Context(torch.randn(1, new_tokens, inner, dtype=dtype), new_pos)
        transient["context_kv"] = _tracked_peak(lambda: backbone.cache_context(new_ctx, old))

        cache = fake_cache(context_tokens + new_tokens)
        x = torch.randn(2, c, n, h, w, dtype=dtype)
        text = torch.randn(2, p.text_length, p.text["d_model"], dtype=dtype)
        ts = torch.full((2,), 0.5)
        transient["denoise"] = _tracked_peak(lambda: backbone(x, ts, text, cache, t_start=t0))

        decoder = vae.decode_stream()
        decoder.decode(chunk)  # the first chunk fills the causal cache
        cache_bytes = _decoder_cache_bytes(decoder)
        transient["decode"] = _tracked_peak(lambda: decoder.decode(chunk))

        blocks = list(backbone.blocks)
        return Trace(
            target_tokens=target_tokens, context_tokens=context_tokens + new_tokens,
            transformer=_nbytes(backbone), transformer_linear=sum(_linear_bytes(b) for b in blocks),
            largest_block=max(_nbytes(b) for b in blocks), blocks=sum(_nbytes(b) for b in blocks),
            vae=_nbytes(vae), text=_nbytes(text_model),
            compressor=_nbytes(compressor) - _nbytes(backbone.patch_embed),
            kv=2 * layers * (context_tokens + new_tokens) * inner * elem,
            vae_cache=cache_bytes, transient=transient)


def _decoder_cache_bytes(decoder) -> int:
    """Bytes of the tensors a decode stream keeps between chunks."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk([v for k, v in vars(decoder).items() if k != "vae"])
    return total


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------
CHOICES = {
    "weights": ("bf16", "fp8"),
    "offload": ("none", "block"),
    "swap": (False, True),
    "text": ("gpu", "free", "cpu"),
    "kv": ("bf16", "fp8"),
}


@dataclass
class PhaseEstimate:
    name: str
    peak_bytes: int
    resident: list
    bytes_moved: int = 0   # host -> device in this phase, per chunk


@dataclass
class Plan:
    fits: bool
    budget_bytes: int
    phases: list
    choices: dict
    bytes_moved_per_chunk: int
    seconds_lost_per_chunk: float
    context_tokens: int
    target_tokens: int

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)

    def to_json(self) -> dict:
        return {"fits": self.fits, "budget_bytes": self.budget_bytes, "peak_bytes": self.peak_bytes,
                "phases": [asdict(p) for p in self.phases], "choices": dict(self.choices),
                "bytes_moved_per_chunk": self.bytes_moved_per_chunk,
                "seconds_lost_per_chunk": self.seconds_lost_per_chunk,
                "context_tokens": self.context_tokens, "target_tokens": self.target_tokens,
                "allowance": {"fixed_bytes": ALLOWANCE_BYTES, "fraction": ALLOWANCE_FRACTION}}

    def table(self) -> str:
        lines = ["| phase | resident | peak | bytes moved per chunk |", "| --- | --- | ---: | ---: |"]
        for p in self.phases:
            lines.append(f"| {p.name} | {', '.join(p.resident) or '-'} | {_gib(p.peak_bytes)} | "
                         f"{_gib(p.bytes_moved) if p.bytes_moved else '0'} |")
        return "\n".join(lines)


def _with_allowance(n: float) -> int:
    return int(ALLOWANCE_BYTES + n * (1 + ALLOWANCE_FRACTION))


def estimate(trace: Trace, choices: dict, budget: int, steps: int = 20) -> Plan:
    """The phases' peaks and the transfers of one plan."""
    fp8 = choices["weights"] == "fp8"
    transformer = trace.transformer - (trace.transformer_linear // 2 if fp8 else 0)
    block_scale = transformer / trace.transformer  # fp8 shrinks the blocks too
    if choices["offload"] == "block":
        # the non-block parts, the running block and the prefetched next one
        transformer_gpu = int(transformer - trace.blocks * block_scale + 2 * trace.largest_block * block_scale)
    else:
        transformer_gpu = transformer
    kv = trace.kv // 2 if choices["kv"] == "fp8" else trace.kv
    upcast = trace.largest_block * block_scale if fp8 else 0  # one layer's bf16 copy at a time
    swap = choices["swap"]

    def phase(name, parts: dict, transient: float) -> PhaseEstimate:
        return PhaseEstimate(name, _with_allowance(sum(parts.values()) + transient), sorted(parts))

    always = {"compressor": trace.compressor, "vae_cache": trace.vae_cache, "context_kv": kv}
    dit = {"transformer" + ("(fp8)" if fp8 else "") + ("(offloaded)" if choices["offload"] == "block" else ""):
           transformer_gpu}
    vae = {"vae": trace.vae}
    text_gpu = {"text_encoder": trace.text} if choices["text"] == "gpu" else {}
    # what is on the GPU while the transformer runs, and while the VAE decodes
    with_dit = {**always, **text_gpu, **dit, **({} if swap else vae)}
    with_vae = {**always, **text_gpu, **vae, **({} if swap else dit)}
    # "free": the encoder comes in for the storyboard's prompts before anything else is loaded;
    # "cpu": the prompts are encoded off the GPU
    text_parts = {"text_encoder": trace.text} if choices["text"] == "free" else with_dit
    kv_transient = trace.transient["context_kv"] * (0.5 if choices["kv"] == "fp8" else 1.0)
    phases = [phase("text", text_parts, 0 if choices["text"] == "cpu" else trace.transient["text"]),
              phase("compress", with_dit, trace.transient["compress"]),
              phase("context_kv", with_dit, kv_transient + upcast),
              phase("denoise", with_dit, trace.transient["denoise"] + upcast),
              phase("decode", with_vae, trace.transient["decode"])]

    by_name = {p.name: p for p in phases}
    hidden = 0.0
    if choices["offload"] == "block":
        per_pass = int(trace.blocks * block_scale)
        by_name["denoise"].bytes_moved += steps * per_pass   # every step's forward streams the blocks
        by_name["context_kv"].bytes_moved += per_pass        # and so does the new tokens' K/V pass
        hidden += 0.5 * (steps + 1) * per_pass                # prefetch overlaps about half behind compute
    if swap:  # each comes back once per chunk (a CPU copy stays, so nothing is copied out)
        by_name["context_kv"].bytes_moved += transformer_gpu
        by_name["decode"].bytes_moved += trace.vae
    moved = sum(p.bytes_moved for p in phases)
    seconds = (moved - hidden) / PCIE_BYTES_PER_S
    if fp8:
        seconds += (steps + 1) * 3 * trace.transformer_linear / 2 / HBM_BYTES_PER_S  # read fp8, write+read bf16
    if choices["kv"] == "fp8":
        seconds += steps * 3 * trace.kv / 2 / HBM_BYTES_PER_S
    fits = all(p.peak_bytes <= budget for p in phases)
    return Plan(fits, budget, phases, dict(choices), int(moved), round(seconds, 4), trace.context_tokens,
                trace.target_tokens)


def all_plans(trace: Trace, budget: int, steps: int = 20) -> list:
    names = list(CHOICES)
    return [estimate(trace, dict(zip(names, combo)), budget, steps) for combo in itertools.product(*CHOICES.values())]


def _departures(choices: dict) -> int:
    defaults = {name: values[0] for name, values in CHOICES.items()}
    return sum(choices[k] != v for k, v in defaults.items())


def choose(trace: Trace, budget: int, steps: int = 20) -> Plan:
    """The plan with the least time lost that fits ``budget`` (fewest departures from the plain run
    on ties); the smallest-peak plan, with ``fits=False``, when none does."""
    plans = all_plans(trace, budget, steps)
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(fitting, key=lambda p: (p.seconds_lost_per_chunk, _departures(p.choices), p.peak_bytes))
    return min(plans, key=lambda p: p.peak_bytes)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from pfp._cli import Parser
    ap = Parser(prog="python -m pfp.memory", description="Plan a model's memory for a GPU budget: which "
                "parts stay on the GPU in each phase of a chunk, traced on the meta/fake device "
                "(no weights, no GPU needed).")
    ap.add_argument("--config", required=True, help=f"a preset: {', '.join(PRESETS)}")
    ap.add_argument("--vram", required=True, help="the budget, with a unit: 12GiB, 8GB, 80GiB")
    ap.add_argument("--rate", default=None, help="override the preset's compression rate, e.g. 2x2x2")
    ap.add_argument("--history", type=float, default=20.0, help="seconds of history before the chunk (default 20)")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps per chunk (default 20)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def main(argv: Optional[list] = None) -> int:
    from pfp._cli import UsageError, run_cli

    def run() -> int:
        args = _parser().parse_args(argv)
        try:
            budget = parse_bytes(args.vram)
            p = preset(args.config, args.rate)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.history < 0 or args.steps < 1:
            raise UsageError(f"--history must be >= 0 and --steps >= 1, got {args.history} and {args.steps}")
        trace = trace_preset(p, args.history)
        plan = choose(trace, budget, args.steps)
        if not plan.fits:
            need = plan.peak_bytes
            raise UsageError(f"--vram {args.vram} is too small for {p.name}: no plan fits; the smallest needs "
                             f"{need / GIB:.2f} GiB ({need} bytes)")
        if args.json:
            print(json.dumps(plan.to_json()))
        else:
            print(f"{p.name}, rate {p.rate}, {args.history:g} s of history: {plan.context_tokens} context tokens, "
                  f"{plan.target_tokens} target tokens per chunk; budget {_gib(budget)}")
            print("choices: " + ", ".join(f"{k}={v}" for k, v in plan.choices.items()))
            print(plan.table())
            print(f"allowance in every peak: {ALLOWANCE_BYTES >> 20} MiB + {ALLOWANCE_FRACTION:.0%}; "
                  f"time lost to the choices ~{plan.seconds_lost_per_chunk:.2f} s per chunk (estimate)")
        return 0

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
