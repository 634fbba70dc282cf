"""Running a memory plan: where a :class:`pfp.weights.PFPModel`'s parts live in each phase of a chunk.

:mod:`pfp.memory` picks the plan (its ``choices``); :class:`Placement` carries it out on a model:

- ``weights="fp8"``: the blocks' linear layers are stored in float8 e4m3 and upcast to the compute
  dtype one layer at a time as they run (diffusers' ``apply_layerwise_casting``, whose hooks sit on
  the leaf layers and so fire under the PFP forward). One-way: the weights stay rounded to fp8.
- ``offload="block"``: the backbone's blocks live on the host; hooks on each block (named, removable
  forward hooks on the :class:`~pfp.backbones.wan_style.WanStyleBlock` the backbone calls) bring the
  block in before it runs and drop it after, while the next block is copied in on a side CUDA
  stream. The rest of the backbone (embeddings, head) stays on the device.
  diffusers' block-level group offload is not used: it loads the non-block parts and learns its
  prefetch order in the transformer's own ``forward``, which the PFP forward never calls.
- ``swap``: the VAE is off the device while the backbone runs, and the backbone while the VAE runs.
- ``text``: ``"gpu"`` (resident), ``"free"`` (on the device for the prompts, which
  :func:`pfp.generate.generate` encodes once up front, then off it), or ``"cpu"`` (never on it).
- ``kv``: ``"fp8"`` stores the context K/V in float8 (:meth:`ContextKV.to_fp8`); generate passes it to
  :meth:`cache_context`.
- ``expert_kv``: with two experts, ``"switch"`` holds only the running expert's context K/V and
  rebuilds the other's from every context token when the sampler switches
  (:meth:`~pfp.backbones.experts.ExpertPair.set_kv_policy`); ``"both"`` keeps both.
- ``experts``: with two experts (Wan 2.2 A14B, :class:`~pfp.backbones.experts.ExpertPair`),
  ``"active"`` keeps only the running expert on the device: an expert hook moves the other one out
  when the sampler switches, so each chunk loads each expert once. No effect on one backbone, or
  with block offload (which already holds only two blocks).

Moving a part keeps one host copy of each of its tensors (pinned when the device is CUDA) and
points the parameter at a device copy while it is in, at the host copy while it is out. So a
part moves in with one host-to-device copy and out with none, and the whole model never needs to
fit twice. ``park_to="nan"`` (tests) points parked parts at NaN-filled host tensors instead, so a
part used while it is meant to be away poisons the output instead of quietly running from the host.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

PLAN_DEFAULTS = {"weights": "native", "offload": "none", "swap": False, "text": "gpu", "kv": "native",
                 "experts": "both", "expert_kv": "both", "decode": "whole"}
PLAN_VALUES = {"weights": ("native", "fp8"), "offload": ("none", "block"), "swap": (False, True),
               "text": ("gpu", "free", "cpu"),
               # "buffer": native K/V, and each denoising step attends through per-layer persistent
               # [context ; target] buffers (WanStyleBackbone.use_context_kv_buffers): no copy of
               # the context per step, B x (Nc + Nt) more K/V held
               "kv": ("native", "fp8", "buffer"), "experts": ("both", "active"),
               "expert_kv": ("both", "switch"),
               # "tiled" / "tiled4": the VAE decodes 2x2 / 4x4 spatial tiles, each streamed
               # (pfp.vae.tiled_decode_stream: exact for Wan's VAE, blended for the others)
               "decode": ("whole", "tiled", "tiled4")}
DECODE_TILES = {"whole": 1, "tiled": 2, "tiled4": 4}   # tiles per side of each decode choice


def check_choices(choices: Optional[dict], defaults: Optional[dict] = None, values: Optional[dict] = None,
                  what: str = "plan choice") -> dict:
    """A full choices dict (missing keys take ``defaults``, :data:`PLAN_DEFAULTS` by default);
    ValueError naming a bad key or value."""
    defaults, values = defaults or PLAN_DEFAULTS, values or PLAN_VALUES
    out = dict(defaults)
    for key, value in (choices or {}).items():
        if key not in values:
            raise ValueError(f"{what} {key!r} is not one of: {', '.join(values)}")
        if value not in values[key]:
            raise ValueError(f"{what} {key}={value!r} is not valid; choose one of: "
                             f"{', '.join(map(str, values[key]))}")
        out[key] = value
    return out


def _tensors_of(modules: Iterable[nn.Module], exclude: Iterable[Tensor] = ()) -> list:
    """The parameters and buffers of ``modules`` (recursively), each once, minus ``exclude``."""
    seen, out = {id(t) for t in exclude}, []
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def _stored_in_fp8(blocks) -> bool:
    """Whether a placement already stored these blocks' linear weights in fp8."""
    return any(m.weight.dtype == torch.float8_e4m3fn for b in blocks for m in b.modules() if isinstance(m, nn.Linear))


class _HostCopy:
    """Tensors (parameters and buffers), each with one host copy; either in (the module
    holds a device copy) or parked (it holds the host copy, or NaN with ``park_to="nan"``)."""

    def __init__(self, tensors: Iterable[Tensor], device: torch.device, park_to: str = "host"):
        self.tensors = list(tensors)
        self.device = device
        self.park_to = park_to
        pin = device.type == "cuda"
        self.host = {}
        for t in self.tensors:
            h = t.detach().to("cpu")
            self.host[id(t)] = h.pin_memory() if pin else h
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self.loaded = False
        self.park()

    def load(self, stream=None) -> int:
        """Point every tensor at a fresh device copy; returns the bytes copied (0 when already in)."""
        if self.loaded:
            return 0
        if stream is None:
            for t in self.tensors:
                t.data = self.host[id(t)].to(self.device, copy=True)
        else:  # copies on the side stream; the compute stream may free them only after using them
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                for t in self.tensors:
                    t.data = self.host[id(t)].to(self.device, non_blocking=True)
                    t.data.record_stream(compute)
        self.loaded = True
        return self.nbytes

    def park(self) -> None:
        for t in self.tensors:
            h = self.host[id(t)]
            if self.park_to == "host" or not h.is_floating_point():
                t.data = h
            else:  # poisoned: a part used while it is meant to be away makes NaN, not quiet results
                t.data = torch.full_like(h, float("nan"))
        self.loaded = False


class BlockOffload:
    """Hooks that keep a backbone's blocks on the host except while they run, the next one
    prefetched on a side stream (CUDA), so at most two blocks are on the device at once.

    Registered as forward pre/post hooks on each block module (what the backbone calls, in
    ``forward`` and ``cache_context`` alike); :meth:`remove` takes them off (the blocks stay where
    they are: :meth:`Placement.close` parks them on the host).
    """

    def __init__(self, blocks, device: torch.device, park_to: str = "host", groups: Optional[list] = None):
        """groups: the blocks as they run, one list per pass (two experts: one each); a block
        prefetches the next of its own group, the last one the group's first. Default: one group."""
        self.blocks = list(blocks)
        self.device = device
        self.parts = [_HostCopy(_tensors_of([b]), device, park_to) for b in self.blocks]
        index = {id(b): i for i, b in enumerate(self.blocks)}
        self.next = list(range(1, len(self.blocks))) + [0]
        for group in groups or [self.blocks]:
            ids = [index[id(b)] for b in group]
            for a, b in zip(ids, ids[1:] + ids[:1]):
                self.next[a] = b
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready = [None] * len(self.blocks)   # CUDA event: block i's prefetch is done
        self.bytes_moved = 0
        self.loaded: set = set()   # indices of the loaded blocks (as _TrainBlocks.loaded)
        self.handles = []
        for i, blk in enumerate(self.blocks):
            self.handles.append(blk.register_forward_pre_hook(lambda m, args, i=i: self._before(i)))
            self.handles.append(blk.register_forward_hook(lambda m, args, out, i=i: self._after(i)))

    def _load(self, i: int, prefetch: bool) -> None:
        part = self.parts[i]
        self.loaded.add(i)
        if part.loaded:
            return
        if self.stream is None or not prefetch:
            self.bytes_moved += part.load()
            return
        self.bytes_moved += part.load(self.stream)
        event = torch.cuda.Event()
        event.record(self.stream)
        self.ready[i] = event

    def _park(self, i: int) -> None:
        self.parts[i].park()
        self.ready[i] = None
        self.loaded.discard(i)

    def _before(self, i: int) -> None:
        # A block prefetched for a pass that did not come (two experts: the last block of one
        # expert's pass prefetches that expert's first, and the other expert runs next) leaves, so
        # that no more than the running block and its successor are ever in.
        for j in [j for j in self.loaded if j != i and j != self.next[i]]:
            self._park(j)
        self._load(i, prefetch=False)
        if self.ready[i] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[i])
            self.ready[i] = None
        self._load(self.next[i], prefetch=True)

    def _after(self, i: int) -> None:
        self._park(i)

    def park_all(self) -> None:
        for i in range(len(self.parts)):
            self._park(i)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Placement:
    """A plan's ``choices`` carried out on a model for ``device``; see the module docstring.

    Use the phases as context managers around what runs in them::

        placement = Placement(model, "cuda", {"offload": "block", "swap": True})
        with placement.text():        ...   # encode the prompts (on placement.text_device)
        with placement.transformer(): ...   # compressor append, context K/V, denoising
        with placement.decode():      ...   # VAE decode (and the low-res re-encode)
        placement.close()                   # hooks off, every part back on the host

    ``bytes_moved`` counts the host-to-device copies made so far.
    """

    def __init__(self, model: nn.Module, device, choices: Optional[dict] = None, *, park_to: str = "host"):
        if park_to not in ("host", "nan"):
            raise ValueError(f"park_to must be 'host' or 'nan', got {park_to!r}")
        self.model = model
        self.device = torch.device(device)
        self.choices = check_choices(choices)
        backbone = model.backbone
        if self.choices["kv"] == "buffer" and not getattr(backbone, "supports_context_kv_buffers", False):
            raise ValueError(f"kv='buffer' needs a backbone whose blocks can attend through K/V buffers "
                             f"(supports_context_kv_buffers); {type(backbone).__name__} does not: use kv='native' "
                             f"or 'fp8'")
        blocks = list(backbone.blocks)
        if self.choices["weights"] == "fp8" and not _stored_in_fp8(blocks):  # once: it is one-way
            from diffusers.hooks import apply_layerwise_casting
            for blk in blocks:  # linear layers only: "auto" skips the norms; tables stay as they are
                apply_layerwise_casting(blk, storage_dtype=torch.float8_e4m3fn, compute_dtype=backbone.compute_dtype)
        offload_blocks = self.choices["offload"] == "block"
        block_tensors = _tensors_of(blocks)
        backbone_tensors = _tensors_of([backbone])
        # two experts, one on the device at a time: each moves whole (blocks, embeddings, head),
        # but for the patch embedding the compressor shares, which stays with the backbone
        self._experts, self._expert_hook, self._active = {}, None, None
        self._kv_policy = None
        if hasattr(backbone, "set_kv_policy"):
            self._kv_policy = backbone.kv_policy
            backbone.set_kv_policy(self.choices["expert_kv"])
        if self.choices["experts"] == "active" and hasattr(backbone, "register_expert_hook") and not offload_blocks:
            shared = _tensors_of([backbone.patch_embed])
            self._experts = {name: _HostCopy(_tensors_of([getattr(backbone, name)], exclude=shared), self.device,
                                             park_to) for name in ("high", "low")}
            self._expert_hook = backbone.register_expert_hook(self._activate)
        in_experts = [t for part in self._experts.values() for t in part.tensors]
        # the backbone less its blocks (embeddings, head), with the compressor's own layers (it
        # shares the patch embedding): all of it runs in the transformer phase
        self._backbone = _HostCopy(_tensors_of([backbone], exclude=block_tensors + in_experts)
                                   + _tensors_of(model.compressors, exclude=backbone_tensors), self.device, park_to)
        self._blocks = (None if offload_blocks or self._experts else
                        _HostCopy(block_tensors, self.device, park_to))
        self.blocks = (BlockOffload(blocks, self.device, park_to, getattr(backbone, "block_groups", None))
                       if offload_blocks else None)
        self._vae = _HostCopy(_tensors_of([model.vae] if isinstance(model.vae, nn.Module) else []),
                              self.device, park_to)
        self._text = None
        if self.choices["text"] == "cpu":
            model.text_encoder.to("cpu")
        else:
            self._text = _HostCopy(_tensors_of([model.text_encoder]), self.device, park_to)
        self._bytes = 0
        if self.choices["text"] == "gpu":
            self._bytes += self._text.load()
        # Without swapping, the VAE and the transformer stay in from the start; with text="free"
        # only from the end of the text phase, which has the encoder alone on the device (the
        # memory plan counts the phases so).
        self._resident_pending = not self.choices["swap"]
        if self.choices["text"] != "free":
            self._load_resident()

    @property
    def bytes_moved(self) -> int:
        """Host-to-device bytes copied so far (whole parts and offloaded blocks)."""
        return self._bytes + (self.blocks.bytes_moved if self.blocks is not None else 0)

    @property
    def text_device(self) -> torch.device:
        """Where the text encoder runs: the device, or the CPU with ``text="cpu"``."""
        return torch.device("cpu") if self.choices["text"] == "cpu" else self.device

    def _load_resident(self) -> None:
        """Without swapping: the VAE and the transformer in, once."""
        if self._resident_pending:
            self._resident_pending = False
            self._bytes += self._vae.load()
            self._load_transformer()

    def _load_transformer(self) -> None:
        self._bytes += self._backbone.load()
        if self._blocks is not None:
            self._bytes += self._blocks.load()
        # with experts="active", an expert comes in when it is first used (_activate)

    def _park_transformer(self) -> None:
        self._backbone.park()
        if self._blocks is not None:
            self._blocks.park()
        if self.blocks is not None:
            self.blocks.park_all()
        for part in self._experts.values():
            part.park()
        self._active = None

    def _activate(self, name: str) -> None:
        """Before an expert runs: the other one leaves the device, this one comes in."""
        if self._active == name:
            return
        for other, part in self._experts.items():
            if other != name:
                part.park()
        self._bytes += self._experts[name].load()
        self._active = name

    @contextmanager
    def text(self):
        """Encoding the prompts (once, before the other phases). With ``text="free"`` the encoder
        is on the device only in here, and alone."""
        if self.choices["text"] == "free":
            self._bytes += self._text.load()
        try:
            yield
        finally:
            if self.choices["text"] == "free":
                self._text.park()
        self._load_resident()

    @contextmanager
    def transformer(self):
        """The compressor's append, the context K/V and the denoising steps."""
        self._load_resident()
        if self.choices["swap"]:
            self._vae.park()
            self._load_transformer()
        yield

    @contextmanager
    def decode(self):
        """The VAE's decode and the low-res re-encode."""
        self._load_resident()
        if self.choices["swap"]:
            self._park_transformer()
            self._bytes += self._vae.load()
        yield

    def close(self) -> None:
        """Takes the offload hooks off and leaves every part on the host (CPU). fp8 weights stay
        stored in fp8 (diffusers' layerwise casting cannot be undone without reloading)."""
        if self.blocks is not None:
            self.blocks.remove()
        if self._expert_hook is not None:
            self._expert_hook.remove()
        if self._kv_policy is not None:
            self.model.backbone.set_kv_policy(self._kv_policy)
        parts = ([self._backbone, self._blocks, self._vae, self._text] + (self.blocks.parts if self.blocks else [])
                 + list(self._experts.values()))
        for part in parts:
            if part is not None:
                part.park_to = "host"
                part.park()


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
TRAIN_PLAN_DEFAULTS = {"weights": "native", "offload": "none", "text": "gpu", "swap": False, "encode": "whole"}
TRAIN_PLAN_VALUES = {"weights": ("native", "fp8"), "offload": ("none", "block"), "text": ("gpu", "cpu"),
                     "swap": (False, True), "encode": ("whole", "tiled")}


def _in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (checkpointing's
    recompute of a block runs inside one)."""
    return torch._C._current_graph_task_id() != -1


class _FrozenBlock:
    """A block's frozen tensors for training, in one of two forms: loaded (the compute dtype, on the
    device: the block can run) or parked. ``fp8``: the linear weights among them park in float8
    e4m3 (on the device, or on the host with ``offload``) and load upcast; ``offload``: the others
    park on the host and load with one copy (a :class:`_HostCopy`). The originals stay on the host
    for checkpoints (:meth:`to_native`)."""

    def __init__(self, tensors: list, linear: set, device: torch.device, fp8: bool, offload: bool, park_to: str):
        self.device, self.offload = device, offload
        self.stored = [t for t in tensors if fp8 and id(t) in linear]
        others = [t for t in tensors if not (fp8 and id(t) in linear)]
        # the model is still on the CPU: detach() keeps the original storage as t.data moves on
        self.native = {id(t): t.detach() for t in self.stored}
        where = "cpu" if offload else device
        self.fp8 = {id(t): t.detach().to(torch.float8_e4m3fn).to(where) for t in self.stored}
        if offload and device.type == "cuda":
            self.fp8 = {k: v.pin_memory() for k, v in self.fp8.items()}
        self.copies = _HostCopy(others, device, park_to) if others else None   # parked from the start
        if self.copies is not None:
            self.native.update(self.copies.host)
        self.loaded = False
        self.bytes_moved = 0
        self.park()

    def load(self) -> None:
        if self.loaded:
            return
        for t in self.stored:   # upcast to the dtype the original had
            src = self.fp8[id(t)]
            t.data = src.to(self.device).to(self.native[id(t)].dtype)
            self.bytes_moved += src.numel() * src.element_size() if self.offload else 0
        if self.copies is not None:
            self.bytes_moved += self.copies.load()
        self.loaded = True

    def park(self) -> None:
        for t in self.stored:
            t.data = self.fp8[id(t)]
        if self.copies is not None:
            self.copies.park()
        self.loaded = False

    def to_native(self) -> None:
        for t in self.stored + (self.copies.tensors if self.copies is not None else []):
            t.data = self.native[id(t)]
        if self.copies is not None:
            self.copies.loaded = False
        self.loaded = False


class _TrainBlocks:
    """Forward hooks that keep each block's frozen weights parked (:class:`_FrozenBlock`) except while
    it runs, for training with gradient checkpointing. A block's forward parks it again at once;
    inside a backward pass (checkpointing's recompute, whose backward follows and reads the
    weights) it stays loaded until the next block loads, so one block is loaded at a time.

    A block that starts sends off every other loaded one: checkpointing's early stop (PyTorch's
    default) ends a recompute by raising inside the block, so its post-hook never runs, and each
    recomputed block had stayed loaded until the next step (every block's native weights on the
    device after a backward, where the plan counts two)."""

    def __init__(self, blocks: list, parts: list):
        self.blocks, self.parts = blocks, parts
        self.loaded = set()   # indices of the loaded blocks
        self.handles = []
        for i, blk in enumerate(blocks):
            self.handles.append(blk.register_forward_pre_hook(lambda m, args, i=i: self._before(i)))
            self.handles.append(blk.register_forward_hook(lambda m, args, out, i=i: self._after(i)))

    def _park(self, i: int) -> None:
        self.parts[i].park()
        self.loaded.discard(i)

    def _before(self, i: int) -> None:
        for j in [j for j in self.loaded if j != i]:
            self._park(j)
        self.parts[i].load()
        self.loaded.add(i)

    def _after(self, i: int) -> None:
        if not _in_backward():
            self._park(i)

    def settle(self) -> None:
        """Park what a backward left loaded."""
        for j in list(self.loaded):
            self._park(j)

    @property
    def bytes_moved(self) -> int:
        return sum(p.bytes_moved for p in self.parts)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def check_train_choices(choices: Optional[dict]) -> dict:
    """A full training-plan choices dict; ValueError naming a bad key or value."""
    return check_choices(choices, TRAIN_PLAN_DEFAULTS, TRAIN_PLAN_VALUES, "training plan choice")


class TrainPlacement:
    """A training plan's choices carried out on a model (:mod:`pfp.train.memory` picks them), as the
    :class:`~pfp.train.objectives.StepPhases` a loss runs through:

    - the trainable parameters (LoRA adapters, the compressor) move to the device once and stay:
      they, their gradients and the optimizer's states never move;
    - ``weights="fp8"``: the blocks' frozen linear weights are stored in float8 e4m3 and upcast one
      block at a time as it runs (the LoRA adapters on them stay in their own dtype);
      ``offload="block"``: the blocks' frozen weights live on the host and come in one block at a
      time. Both need gradient checkpointing (``pfp.train`` turns it on): a block's weights go
      back after its forward, and in the backward its recompute brings them in again and keeps them
      until the next block comes. Checkpoints and exports hold the original weights (:meth:`native`);
    - ``text="cpu"``: the text encoder stays on the CPU and the losses move its states over;
      ``"gpu"``: it is on the device throughout;
    - ``swap=True``: the frozen transformer (and the compressor's frozen parts) is off the device
      while the VAE encodes the batch (``encode()``), and the VAE (with an image encoder) while the
      transformer runs forward and backward (``step()``). Each step moves both in once; their host
      copies stay, so nothing is copied out;
    - ``encode="tiled"``: the VAE encodes through its ``tiled_encoding()`` (HunyuanVAE: diffusers'
      tiled encode), approximate, for VAEs whose whole-clip encode does not fit.

    The model must still be on the CPU (``pfp.train`` does not move it when a plan is given);
    ``park_to="nan"`` (tests) makes a part used while away poison the loss instead.
    """

    def __init__(self, model: nn.Module, device, choices: Optional[dict] = None, *, park_to: str = "host"):
        if park_to not in ("host", "nan"):
            raise ValueError(f"park_to must be 'host' or 'nan', got {park_to!r}")
        self.model = model
        self.device = torch.device(device)
        self.choices = check_train_choices(choices)
        if self.choices["encode"] == "tiled" and not hasattr(model.vae, "tiled_encoding"):
            raise ValueError(f"encode='tiled' needs a VAE with tiled_encoding() (HunyuanVAE); this model's is "
                             f"{type(model.vae).__name__}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:   # resident: their optimizer states and gradients live beside them
            p.data = p.data.to(self.device)
        text = _tensors_of([model.text_encoder], exclude=trainable)
        encoders = [model.vae] if isinstance(model.vae, nn.Module) else []
        if getattr(model, "image_encoder", None) is not None:   # Wan I2V: runs with the VAE, in encode()
            encoders.append(model.image_encoder)
        vae = _tensors_of(encoders, exclude=trainable)
        self.blocks = None
        in_blocks = []
        fp8, offload = self.choices["weights"] == "fp8", self.choices["offload"] == "block"
        if fp8 or offload:
            backbone = model.backbone.get_base_model() if hasattr(model.backbone, "get_base_model") else model.backbone
            blocks = list(backbone.blocks)
            parts = []
            for blk in blocks:
                tensors = _tensors_of([blk], exclude=trainable)
                linear = {id(m.weight) for m in blk.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad}
                # fp8 alone: only the linear weights park (in fp8, on the device); the rest stays
                mine = tensors if offload else [t for t in tensors if id(t) in linear]
                parts.append(_FrozenBlock(mine, linear, self.device, fp8, offload, park_to))
                in_blocks += mine
            self.blocks = _TrainBlocks(blocks, parts)
        rest = _tensors_of([model], exclude=trainable + text + vae + in_blocks)
        self._rest = _HostCopy(rest, self.device, park_to)
        self._vae = _HostCopy(vae, self.device, park_to)
        self._text = None
        self._bytes = 0
        if self.choices["text"] == "cpu":
            for t in text:
                t.data = t.data.to("cpu")
        else:
            self._text = _HostCopy(text, self.device, park_to)
            self._bytes += self._text.load()
        if not self.choices["swap"]:
            self._bytes += self._rest.load() + self._vae.load()

    @property
    def bytes_moved(self) -> int:
        """Host-to-device bytes copied so far."""
        return self._bytes + (self.blocks.bytes_moved if self.blocks is not None else 0)

    @contextmanager
    def native(self):
        """The blocks' original weights in place (on the host), e.g. while a checkpoint or an export
        is written; parked again after."""
        if self.blocks is None:
            yield
            return
        self.blocks.settle()
        for part in self.blocks.parts:
            part.to_native()
        try:
            yield
        finally:
            for part in self.blocks.parts:
                part.park()

    @contextmanager
    def encode(self):
        """The VAE's work: with ``swap``, the transformer leaves and the VAE comes in."""
        if self.blocks is not None:
            self.blocks.settle()   # what the last backward left loaded
        if self.choices["swap"] and not self._vae.loaded:
            self._rest.park()
            self._bytes += self._vae.load()
        if self.choices["encode"] == "tiled":
            with self.model.vae.tiled_encoding():
                yield
        else:
            yield

    @contextmanager
    def step(self):
        """The compressor's and the backbone's forward (and, after the loss, the backward and the
        optimizer step): with ``swap``, the VAE leaves and the transformer comes in."""
        if self.choices["swap"] and not self._rest.loaded:
            self._vae.park()
            self._bytes += self._rest.load()
        yield

    def close(self) -> None:
        """Every moved part back to its host copy, the blocks' original weights included (the
        trainable parameters stay where they are)."""
        if self.blocks is not None:
            self.blocks.remove()
            for part in self.blocks.parts:
                part.to_native()
        for part in (self._rest, self._vae, self._text):
            if part is not None:
                part.park_to = "host"
                part.park()


__all__ = ["Placement", "BlockOffload", "TrainPlacement", "check_choices", "check_train_choices", "PLAN_DEFAULTS",
           "PLAN_VALUES", "TRAIN_PLAN_DEFAULTS", "TRAIN_PLAN_VALUES"]
