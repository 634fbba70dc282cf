"""Two denoising experts switched by timestep: Wan 2.2 A14B.

Wan 2.2's A14B models are two transformers of one architecture: the high-noise expert
(diffusers' ``transformer``) denoises the steps with ``t >= boundary`` and the low-noise expert
(``transformer_2``) the rest, ``boundary`` being ``WanPipeline``'s ``boundary_ratio`` (t in [0, 1]
here, ``t * 1000`` there). :class:`ExpertPair` holds both as backbones and routes each call:

- the sampler asks :meth:`ExpertPair.route` for one step's expert on the host (no device sync);
- ``forward`` routes each sample by its own timestep (the largest of a per-frame or per-token
  timestep), so training batches with mixed noise levels reach both experts;
- ``cache_context`` keeps the context K/V of both experts, extended incrementally per chunk
  (:class:`ExpertKV`); each expert reads its own.

The compressor's low-res branch reuses one patch embedding: the expert named by
``lr_patch_embed`` (default ``"high"``). LoRA targets the same module names in both experts, so
peft gives each expert its own adapters.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .wan_style import ContextKV, check_context_mode

EXPERTS = ("high", "low")


@dataclass
class ExpertKV:
    """Context K/V of an :class:`ExpertPair`: one :class:`ContextKV` (or None) per expert.

    With the pair's ``kv_policy="switch"`` only the running expert's K/V are held; ``context``
    keeps every context token so far, from which the other expert's K/V are rebuilt at the switch.
    """

    high: Optional[ContextKV]
    low: Optional[ContextKV]
    context: Optional[object] = None
    kv_storage: str = "native"

    def of(self, expert: str) -> Optional[ContextKV]:
        return getattr(self, expert)

    @property
    def num_tokens(self) -> int:
        held = self.high if self.high is not None else self.low
        return held.num_tokens if held is not None else 0

    @property
    def is_fp8(self) -> bool:
        return self.high is not None and self.high.is_fp8

    def nbytes(self) -> int:
        return sum(kv.nbytes() for kv in (self.high, self.low) if kv is not None)

    def viewed_in(self, longer: "ExpertKV") -> "ExpertKV":
        """Each expert's K/V as views of ``longer``'s, where it holds that expert
        (:meth:`ContextKV.viewed_in`); this cache's own otherwise. A cache made under
        ``kv_policy="switch"`` stays as it is: at the switch ``longer`` drops the expert it holds,
        which views would keep alive beside the other one's."""
        if longer.context is not None:
            return self

        def view(mine, theirs):
            return mine.viewed_in(theirs) if mine is not None and theirs is not None else mine
        return ExpertKV(view(self.high, longer.high), view(self.low, longer.low), self.context, self.kv_storage)

    def release_buffers(self) -> None:
        """Free each expert's [context ; target] buffers (:meth:`ContextKV.release_buffers`)."""
        for kv in (self.high, self.low):
            if kv is not None:
                kv.release_buffers()


class ExpertPair(nn.Module):
    """Two backbones of one architecture: ``high`` for ``t >= boundary``, ``low`` below.

    Both must share latent channels, width, heads, patch size and context mode. ``lr_patch_embed``
    names the expert whose patch embedding the compressor's low-res branch uses.
    """

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float, lr_patch_embed: str = "high"):
        super().__init__()
        if not (isinstance(boundary, (int, float)) and 0.0 < boundary < 1.0):
            raise ValueError(f"boundary must be in (0, 1) (Wan 2.2 A14B's boundary_ratio, e.g. 0.875), got {boundary!r}")
        if lr_patch_embed not in EXPERTS:
            raise ValueError(f"lr_patch_embed must be one of {EXPERTS}, got {lr_patch_embed!r}")
        for attr in ("latent_channels", "inner_dim", "num_heads", "patch_size", "context_mode",
                     "condition_channels", "image_dim"):
            if getattr(high, attr, None) != getattr(low, attr, None):
                raise ValueError(f"the two experts differ in {attr}: {getattr(high, attr, None)} vs {getattr(low, attr, None)}")
        self.high, self.low = high, low
        self.boundary = float(boundary)
        self.lr_patch_embed = lr_patch_embed
        self.lora_target_modules = getattr(high, "lora_target_modules", None)
        self._expert_hooks: OrderedDict = OrderedDict()  # RemovableHandle needs a weak-referenceable dict
        self.kv_policy = "both"

    def set_kv_policy(self, policy: str) -> None:
        """``"both"``: keep both experts' context K/V, each extended per chunk. ``"switch"``: keep only
        the running expert's; the other's are rebuilt from every context token when the sampler
        switches to it (half the K/V memory, two full context passes per chunk). A cache made
        under one policy stays complete under the other: one of both experts is extended as under
        "both"; one of a single expert gets the other's K/V built whole at the next
        :meth:`cache_context` under "both"."""
        if policy not in ("both", "switch"):
            raise ValueError(f"kv_policy must be 'both' or 'switch', got {policy!r}")
        self.kv_policy = policy

    def register_expert_hook(self, hook):
        """``hook(name)`` runs before an expert (``"high"`` or ``"low"``) is used: before a step it
        is routed to, and before its context K/V are computed (what moves an idle expert off the
        device, :class:`pfp.offload.Placement`). Returns a handle whose ``remove()`` takes it off."""
        from torch.utils.hooks import RemovableHandle
        handle = RemovableHandle(self._expert_hooks)
        self._expert_hooks[handle.id] = hook
        return handle

    def _use(self, name: str) -> nn.Module:
        for hook in list(self._expert_hooks.values()):
            hook(name)
        return getattr(self, name)

    # the attributes the compressor, the sampler and generate read, from the experts
    @property
    def context_mode(self) -> str:
        return self.high.context_mode

    @context_mode.setter
    def context_mode(self, mode: str) -> None:
        self.high.context_mode = self.low.context_mode = check_context_mode(mode)

    latent_channels = property(lambda self: self.high.latent_channels)
    inner_dim = property(lambda self: self.high.inner_dim)
    num_heads = property(lambda self: self.high.num_heads)
    head_dim = property(lambda self: self.high.head_dim)
    patch_size = property(lambda self: self.high.patch_size)
    compute_dtype = property(lambda self: self.high.compute_dtype)
    # Wan 2.2 I2V A14B: both experts read the same condition channels beside the latent
    condition_channels = property(lambda self: getattr(self.high, "condition_channels", 0))
    image_dim = property(lambda self: getattr(self.high, "image_dim", None))
    takes_image = property(lambda self: self.image_dim is not None)

    @property
    def patch_embed(self) -> nn.Module:
        return getattr(self, self.lr_patch_embed).patch_embed

    @property
    def blocks(self) -> list:
        """Both experts' blocks, the high-noise expert's first."""
        return list(self.high.blocks) + list(self.low.blocks)

    @property
    def block_groups(self) -> list:
        """The blocks as they run: one expert's, in order, per denoising call."""
        return [list(self.high.blocks), list(self.low.blocks)]

    def token_grid(self, t: int, h: int, w: int) -> tuple:
        return self.high.token_grid(t, h, w)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.high.set_gradient_checkpointing(enabled)
        self.low.set_gradient_checkpointing(enabled)

    def set_sequence_parallel(self, sp) -> None:
        self.high.set_sequence_parallel(sp)
        self.low.set_sequence_parallel(sp)

    def add_memory_attention(self, feature_dim: int) -> None:
        """Each expert's blocks get their own cross-attention over the compressor's features."""
        self.high.add_memory_attention(feature_dim)
        self.low.add_memory_attention(feature_dim)

    has_memory_attention = property(lambda self: self.high.has_memory_attention)

    def expert_at(self, t: float) -> str:
        """``"high"`` for ``t >= boundary``, else ``"low"`` (WanPipeline's rule)."""
        return "high" if t >= self.boundary else "low"

    @property
    def supports_context_kv_buffers(self) -> bool:
        return bool(self.high.supports_context_kv_buffers and self.low.supports_context_kv_buffers)

    @property
    def context_kv_buffers(self) -> bool:
        return bool(self.high.context_kv_buffers)

    def use_context_kv_buffers(self, enabled: bool = True) -> None:
        """Both experts' (see :meth:`WanStyleBackbone.use_context_kv_buffers`)."""
        for expert in (self.high, self.low):
            expert.use_context_kv_buffers(enabled)

    def route(self, t: float, context=None):
        """(expert module, its context) for a step at timestep ``t`` (a host float)."""
        name = self.expert_at(float(t))
        net = self._use(name)
        if isinstance(context, ExpertKV):
            if context.of(name) is None and context.context is not None:   # "switch": rebuild this one's
                setattr(context, "low" if name == "high" else "high", None)    # the other's go first
                setattr(context, name, net.cache_context(context.context, None, kv_storage=context.kv_storage))
            return net, context.of(name)
        return net, context

    @torch.no_grad()
    def cache_context(self, context, cache: Optional[ExpertKV] = None, kv_storage: str = "native"):
        """Each expert's K/V of the new context tokens after ``cache`` (see
        :meth:`WanStyleBackbone.cache_context`); None while the context is empty. The low-noise
        expert goes first: a chunk's denoising ends on it, so with only one expert on the device
        each chunk loads each expert once."""
        from .wan_style import context_parts
        if context_parts(context) is None:
            return cache
        from pfp.compressor import mix_contexts
        made_under_both = cache is not None and cache.context is None and (cache.high is not None
                                                                         or cache.low is not None)
        if self.kv_policy == "switch" and not made_under_both:   # a cache of both experts stays so
            every = context if cache is None or cache.context is None else mix_contexts(cache.context, context)
            # the expert held now is extended (the low-noise one, after a chunk); the other is rebuilt
            # from `every` token when the sampler switches to it
            name = "low" if cache is not None and cache.low is not None else "high"
            held = self._use(name).cache_context(context, cache.of(name) if cache is not None else None,
                                                 kv_storage=kv_storage)
            return ExpertKV(held if name == "high" else None, held if name == "low" else None, every, kv_storage)
        def extended(name):
            held = cache.of(name) if cache is not None else None
            if held is None and cache is not None and cache.context is not None:
                # a cache made under "switch" holds one expert's K/V: the other's is built whole
                return self._use(name).cache_context(mix_contexts(cache.context, context), None, kv_storage=kv_storage)
            return self._use(name).cache_context(context, held, kv_storage=kv_storage)
        low = extended("low")
        high = extended("high")
        return ExpertKV(high, low)

    def forward(self, x: Tensor, timesteps, text: Tensor, context=None, **kwargs) -> Tensor:
        """Velocity, each sample from the expert of its timestep (the largest of its per-frame or
        per-token timesteps). Arguments as :meth:`WanStyleBackbone.forward`; ``context`` may be an
        :class:`ExpertKV`."""
        b = x.shape[0]
        ts = torch.as_tensor(timesteps, dtype=torch.float32)
        per_sample = ts.reshape(ts.shape[0], -1).amax(1).expand(b) if ts.ndim else ts.expand(b)
        high = (per_sample >= self.boundary).cpu()  # routing is host-side structure
        if bool(high.all()) or not bool(high.any()):
            name = "high" if bool(high.all()) else "low"
            ctx = context.of(name) if isinstance(context, ExpertKV) else context
            return self._use(name)(x, timesteps, text, ctx, **kwargs)
        out = None
        for name, rows in (("high", high), ("low", ~high)):
            idx = torch.nonzero(rows).flatten().to(x.device)
            ctx = context.of(name) if isinstance(context, ExpertKV) else context
            per_sample = {k: _take(v, idx, b) for k, v in kwargs.items() if k in ("text_mask", "condition", "image")}
            if isinstance(kwargs.get("positions"), Tensor) and kwargs["positions"].ndim == 3:
                per_sample["positions"] = _take(kwargs["positions"], idx, b)   # [B, Nt, 3]; [Nt, 3] is shared
            part = self._use(name)(x[idx], _take(timesteps, idx, b), _take(text, idx, b), _take_ctx(ctx, idx, b),
                                   **{**kwargs, **per_sample})
            if out is None:
                out = part.new_empty(x.shape)
            out[idx] = part
        return out


def _take(value, idx: Tensor, batch: int):
    """Rows ``idx`` of a per-sample argument (one whose first dimension is the batch)."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch and batch > 1:
        return value[idx.to(value.device)]
    return value


def _take_ctx(context, idx: Tensor, batch: int):
    """The samples ``idx`` of a per-sample context (a batch-1 context serves every sample as it is)."""
    if context is None or isinstance(context, ContextKV):
        if context is not None and context.batch_size == batch and batch > 1:
            i = idx.to(context.keys[0].device)
            pick = lambda ts: None if ts is None else [t[i] for t in ts]  # noqa: E731
            return ContextKV(pick(context.keys), pick(context.values), context.positions,
                             None if context.mask is None else context.mask[i],
                             pick(context.key_scales), pick(context.value_scales), context.order,
                             pick(context.memory_keys), pick(context.memory_values),
                             None if context.memory_mask is None else context.memory_mask[i])
        return context
    tokens = context.tokens
    if tokens.shape[0] == batch and batch > 1:
        from pfp.compressor import Context
        mask = getattr(context, "mask", None)
        i = idx.to(tokens.device)
        features, fmask = getattr(context, "features", None), getattr(context, "feature_mask", None)
        return Context(tokens[i], context.positions, None if mask is None else mask[i], getattr(context, "order", None),
                       None if features is None else features[i.to(features.device)],
                       None if fmask is None else fmask[i.to(fmask.device)])
    return context


__all__ = ["ExpertPair", "ExpertKV", "EXPERTS"]
