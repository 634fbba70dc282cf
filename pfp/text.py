"""Storyboards (timed prompts) and text encoders.

Storyboard JSON: a list of shots, or ``{"shots": [...]}``, each shot
``{"start": seconds, "end": seconds, "prompt": "..."}``. Extra keys in a shot are ignored.

What is legal (checked on load, errors name the entry and the reason):

- at least one shot; ``start`` and ``end`` finite numbers (not bools/strings), ``0 <= start < end``;
- ``prompt`` a non-empty string;
- shots sorted by ``start`` and not overlapping: ``start[i] >= end[i-1]``. Touching shots
  (``start[i] == end[i-1]``) and gaps are both fine.

Which prompt is active at time ``t`` (the paper summary, section 9: "take the latest timestamp"):
the prompt of the last shot whose ``start <= t``. Consequences, by design:

- in a gap between shots, the previous shot's prompt stays active;
- after the last ``end``, the last prompt stays active (generation may run past the storyboard);
- before the first ``start`` no shot has started yet, and the *first* prompt is used.

Text encoders return :class:`TextTokens` ``(tokens [B, L, D] float, mask [B, L] bool)``; padding
positions have ``mask == False`` and zero tokens. ``L`` is the encoder's ``max_length``.
"""
from __future__ import annotations

import functools
import html
import json
import math
import os
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from pfp._cli import UsageError

__all__ = [
    "Shot",
    "Storyboard",
    "StoryboardError",
    "prompt_schedule",
    "TextTokens",
    "TextStateCache",
    "TinyTextEncoder",
    "UMT5TextEncoder",
    "wan_prompt_clean",
    "HunyuanTextEncoder",
]

# Times compared with this slack, so that chunk times like 3 * 0.1 = 0.30000000000000004 or
# 0.1 + 0.2 land in the shot that starts at 0.3.
_TIME_EPS = 1e-9


class StoryboardError(UsageError):
    """A storyboard that cannot be used; the message names the entry and the reason."""


@dataclass(frozen=True)
class Shot:
    """One storyboard entry: ``prompt`` from ``start`` to ``end`` seconds."""

    start: float
    end: float
    prompt: str


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StoryboardError(f"{where}: {key!r} must be a number of seconds, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise StoryboardError(f"{where}: {key!r} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class Storyboard:
    """Validated, sorted, non-overlapping shots. Build with :meth:`from_json`, :meth:`load`,
    :meth:`from_list` or :meth:`single`; see the module docstring for the rules."""

    shots: tuple[Shot, ...]

    def __post_init__(self):
        shots = tuple(self.shots)
        object.__setattr__(self, "shots", shots)
        if not shots:
            raise StoryboardError("storyboard has no shots; it needs at least one {start, end, prompt} entry")
        for i, shot in enumerate(shots):
            where = f"storyboard entry {i}"
            if not isinstance(shot, Shot):
                raise StoryboardError(f"{where}: expected a Shot, got {type(shot).__name__}")
            _number(shot.start, where, "start")
            _number(shot.end, where, "end")
            if shot.start < 0:
                raise StoryboardError(f"{where}: 'start' must be >= 0 seconds, got {shot.start}")
            if not shot.end > shot.start:
                raise StoryboardError(f"{where}: 'end' ({shot.end}) must be greater than 'start' ({shot.start})")
            if not isinstance(shot.prompt, str) or not shot.prompt.strip():
                raise StoryboardError(f"{where}: 'prompt' must be a non-empty string, got {shot.prompt!r}")
            if i > 0:
                prev = shots[i - 1]
                if shot.start < prev.start:
                    raise StoryboardError(
                        f"{where}: shots must be sorted by start time, but start {shot.start} comes after "
                        f"entry {i - 1}'s start {prev.start}")
                if shot.start < prev.end - _TIME_EPS:
                    raise StoryboardError(
                        f"{where}: overlaps entry {i - 1} (starts at {shot.start}, entry {i - 1} ends at "
                        f"{prev.end}); shots must not overlap")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_list(cls, entries: Any) -> "Storyboard":
        """From parsed JSON: a list of ``{start, end, prompt}`` dicts, or ``{"shots": [...]}``."""
        if isinstance(entries, dict):
            if "shots" not in entries:
                raise StoryboardError(
                    f"storyboard object needs a 'shots' list; got keys {sorted(entries)}")
            entries = entries["shots"]
        if not isinstance(entries, (list, tuple)):
            raise StoryboardError(
                f"storyboard must be a list of {{start, end, prompt}} entries or {{\"shots\": [...]}}, "
                f"got {type(entries).__name__}")
        shots = []
        for i, e in enumerate(entries):
            where = f"storyboard entry {i}"
            if isinstance(e, Shot):
                shots.append(e)
                continue
            if not isinstance(e, dict):
                raise StoryboardError(f"{where}: must be an object with start, end, prompt; got {e!r}")
            missing = [k for k in ("start", "end", "prompt") if k not in e]
            if missing:
                raise StoryboardError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
            shots.append(Shot(_number(e["start"], where, "start"), _number(e["end"], where, "end"), e["prompt"]))
        return cls(tuple(shots))

    @classmethod
    def from_json(cls, text: str) -> "Storyboard":
        """Parse a JSON string (see the module docstring for the format)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoryboardError(f"storyboard is not valid JSON: {e}") from None
        return cls.from_list(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Storyboard":
        """Read a storyboard JSON file; errors are prefixed with the path."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise StoryboardError(f"{path}: cannot read storyboard: {e.strerror or e}") from None
        except UnicodeDecodeError as e:  # a ValueError, not an OSError: raised by read(), not open()
            raise StoryboardError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            return cls.from_json(text)
        except StoryboardError as e:
            raise StoryboardError(f"{path}: {e}") from None

    @classmethod
    def single(cls, prompt: str, seconds: float) -> "Storyboard":
        """One prompt for ``[0, seconds)``."""
        return cls((Shot(0.0, float(seconds), prompt),))

    def to_list(self) -> list[dict]:
        return [{"start": s.start, "end": s.end, "prompt": s.prompt} for s in self.shots]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_list(), **kwargs)

    # -- queries --------------------------------------------------------------------------------
    @property
    def duration(self) -> float:
        """End of the last shot, in seconds."""
        return self.shots[-1].end

    @property
    def prompts(self) -> list[str]:
        return [s.prompt for s in self.shots]

    def shot_index_at(self, t: float) -> int:
        """Index of the active shot at ``t`` seconds (rules in the module docstring)."""
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"t must be a finite number of seconds, got {t!r}")
        index = 0
        for i, shot in enumerate(self.shots):
            if shot.start <= t + _TIME_EPS:
                index = i
            else:
                break
        return index

    def prompt_at(self, t: float) -> str:
        """The prompt of the latest shot whose ``start <= t``; the first prompt before any shot starts."""
        return self.shots[self.shot_index_at(t)].prompt

    def window(self, start: float, end: float) -> "Storyboard":
        """The storyboard of a clip ``[start, end)`` of the video, re-timed so the clip starts at 0.

        Built so that ``window(a, b).prompt_at(t) == prompt_at(a + t)`` for every ``t`` in
        ``[0, b - a)``: the shot active at ``a`` begins the result at 0, and each shot runs until the
        next one starts (gaps are filled by the prompt that is active in them) or the clip ends."""
        start, end = float(start), float(end)
        if not (math.isfinite(start) and math.isfinite(end)) or not end > start:
            raise ValueError(f"window: need finite start < end, got start={start}, end={end}")
        first = self.shot_index_at(start)
        kept = [i for i in range(first, len(self.shots)) if i == first or self.shots[i].start < end - _TIME_EPS]
        out = []
        for j, i in enumerate(kept):
            s = 0.0 if j == 0 else self.shots[i].start - start
            e = (self.shots[kept[j + 1]].start - start) if j + 1 < len(kept) else end - start
            out.append(Shot(s, e, self.shots[i].prompt))
        return Storyboard(tuple(out))


def prompt_schedule(storyboard: Storyboard, chunk_seconds: float, num_chunks: int, *,
                    start_seconds: float = 0.0, at: str = "start") -> list[str]:
    """Prompt for each of ``num_chunks`` consecutive chunks of ``chunk_seconds`` each.

    Chunk ``i`` covers ``[start_seconds + i*chunk_seconds, start_seconds + (i+1)*chunk_seconds)``;
    its time is the chunk's start (``at="start"``, the paper's rule) or its middle
    (``at="middle"``, which switches prompts on the chunk where most of the new shot falls).
    Each chunk gets ``storyboard.prompt_at(time)``.
    """
    if not isinstance(storyboard, Storyboard):
        raise ValueError(f"storyboard must be a Storyboard, got {type(storyboard).__name__}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 0:
        raise ValueError(f"num_chunks must be an int >= 0, got {num_chunks!r}")
    if isinstance(chunk_seconds, bool) or not isinstance(chunk_seconds, (int, float)) \
            or not math.isfinite(chunk_seconds) or chunk_seconds <= 0:
        raise ValueError(f"chunk_seconds must be a positive number, got {chunk_seconds!r}")
    if at not in ("start", "middle"):
        raise ValueError(f"at must be 'start' or 'middle', got {at!r}")
    offset = 0.5 if at == "middle" else 0.0
    return [storyboard.prompt_at(start_seconds + (i + offset) * chunk_seconds) for i in range(num_chunks)]


# ------------------------------------------------------------------------------------------------
# Text encoders
# ------------------------------------------------------------------------------------------------


class TextTokens(NamedTuple):
    """Encoded prompts: ``tokens`` ``[B, L, D]`` (zeros where padded), ``mask`` ``[B, L]`` bool (True = real)."""

    tokens: torch.Tensor
    mask: torch.Tensor


def states_are_fixed(encoder: torch.nn.Module) -> bool:
    """Whether a text encoder's states are a function of the prompt alone for a whole training run:
    none of its weights train, and no dropout can be active, because it is frozen (a
    :class:`pfp.model.PFPModel` keeps its frozen parts in eval mode) or has no dropout. It does not
    read the encoder's current train/eval mode, which training sets after this is asked. Only such
    states may be cached (:class:`TextStateCache`)."""
    if any(p.requires_grad for p in encoder.parameters()):
        return False
    return bool(getattr(encoder, "frozen", False)) or not any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in encoder.modules())


def _entry_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TextStateCache:
    """Each prompt's states from a text encoder that does not train, computed once and reused.

    Training meets the same prompts over and over (a video folder's storyboards, the empty prompt
    of classifier-free dropout), and with a plan that keeps UMT5-XXL on the CPU one encode costs
    seconds. Misses are encoded one prompt per call, so an entry never depends on which prompts
    shared its batch (a resumed run meets the same states as an uninterrupted one), and kept on the
    CPU, least recently used evicted first, within ``max_bytes``.

    Args:
        encode: prompts -> ``(tokens [B, L, D], mask [B, L])``, e.g. ``PFPModel.encode_text``; run
            under ``torch.no_grad()``.
        max_bytes: the most the entries may hold (> 0).

    ``cache(prompts)`` returns ``(tokens, mask)`` on the CPU, one row per prompt.
    """

    def __init__(self, encode: Callable[[list], tuple], max_bytes: int):
        if not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"TextStateCache: max_bytes must be an int > 0, got {max_bytes!r}")
        self._encode, self.max_bytes = encode, max_bytes
        self._entries: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _lookup(self, prompt: str) -> tuple:
        entry = self._entries.get(prompt)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(prompt)
            return entry
        self.misses += 1
        with torch.no_grad():
            tokens, mask = self._encode([prompt])
        entry = (tokens.detach().cpu(), mask.detach().cpu())
        if _entry_bytes(entry) <= self.max_bytes:
            self._entries[prompt] = entry
            self.bytes += _entry_bytes(entry)
            while self.bytes > self.max_bytes:
                self.bytes -= _entry_bytes(self._entries.popitem(last=False)[1])
        return entry

    def __call__(self, prompts: Sequence[str]) -> tuple:
        rows = [self._lookup(p) for p in prompts]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


_WORD = re.compile(r"[a-z0-9]+")


class TinyTextEncoder(nn.Module):
    """A small text encoder for the built-in model, trainable on a CPU.

    Tokenizer (deterministic, no vocabulary file): lower-case, split into ``[a-z0-9]+`` words, each
    word hashed with CRC-32 into ids ``2 .. vocab_size-1`` (0 = padding, 1 = beginning of text, which
    every prompt starts with, so an empty prompt still has one token). Words past ``max_length - 1``
    are dropped (with ``max_length=32`` that is far beyond the synthetic captions).

    Model: token + learned position embeddings, ``num_layers`` pre-norm transformer encoder layers
    (padding masked out), final LayerNorm. Output :class:`TextTokens` with ``tokens [B, max_length, dim]``.

    Args:
        dim: output width D. vocab_size: hash buckets (>= 3). max_length: L. num_layers, num_heads.
    """

    def __init__(self, dim: int = 64, *, vocab_size: int = 1024, max_length: int = 32, num_layers: int = 1,
                 num_heads: int = 4):
        super().__init__()
        if vocab_size < 3:
            raise ValueError(f"TinyTextEncoder: vocab_size must be >= 3, got {vocab_size}")
        if max_length < 1:
            raise ValueError(f"TinyTextEncoder: max_length must be >= 1, got {max_length}")
        if dim % num_heads:
            raise ValueError(f"TinyTextEncoder: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False) if num_layers else None
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` -> ``(ids [B, L] long, mask [B, L] bool)`` on the CPU."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for b, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompts[{b}] must be a str, got {type(p).__name__}")
            words = _WORD.findall(p.lower())[: self.max_length - 1]
            row = [1] + [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words]
            ids[b, : len(row)] = torch.tensor(row)
        return ids, ids != 0

    def forward(self, prompts: Sequence[str]) -> TextTokens:
        ids, mask = self.tokenize(prompts)
        device = self.pos.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.pos
        if self.layers is not None:
            x = self.layers(x, src_key_padding_mask=~mask)
        x = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)
        return TextTokens(x, mask)


@functools.lru_cache(maxsize=None)
def _ftfy():
    """ftfy where installed, else None (looked up once: a failed import searches sys.path again)."""
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


def wan_prompt_clean(text: str) -> str:
    """A prompt as Wan's pipelines clean it before tokenizing: mojibake repaired by ``ftfy`` (where
    it is installed, as there), HTML entities unescaped (twice), whitespace runs made one space,
    the ends stripped."""
    ftfy = _ftfy()
    if ftfy is not None:
        text = ftfy.fix_text(text)
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class UMT5TextEncoder(nn.Module):
    """Wan's text encoder: transformers' ``UMT5EncoderModel`` + its tokenizer, from local paths.

    Encoding follows Wan's pipelines: each prompt cleaned as ``WanPipeline`` cleans it
    (:func:`wan_prompt_clean`; ``clean_prompts=False`` passes it as given), pad/truncate to
    ``max_length`` tokens (with the EOS token), run the encoder with the attention mask, take
    ``last_hidden_state`` and zero the padded positions. Output :class:`TextTokens` with
    ``tokens [B, max_length, d_model]`` (4096 for umt5-xxl). The model is frozen
    (``requires_grad_(False)``, eval mode).
    """

    frozen = True  # never trained; pfp.weights leaves it out of weights files (the config names its path)

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int = 512, clean_prompts: bool = True):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"UMT5TextEncoder: max_length must be >= 1, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.clean_prompts = bool(clean_prompts)
        self.dim = int(model.config.d_model)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, tokenizer_path: str | os.PathLike | None = None,
                        max_length: int = 512, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, clean_prompts: bool = True) -> "UMT5TextEncoder":
        """Load from local folders only. ``path`` is the encoder folder, or a diffusers pipeline folder
        with ``text_encoder/`` and ``tokenizer/`` subfolders (used when ``path`` has no config.json).
        ``tokenizer_path`` defaults to the encoder folder (or the pipeline's ``tokenizer/``)."""
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except Exception as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("UMT5TextEncoder needs transformers with UMT5EncoderModel "
                               f"(pip install 'pfp[wan]'): {e}") from e
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ValueError(f"UMT5TextEncoder.from_pretrained: {path!r} is not a local directory "
                             "(no hub downloads here)")
        model_dir = path
        if not os.path.isfile(os.path.join(path, "config.json")) and \
                os.path.isfile(os.path.join(path, "text_encoder", "config.json")):
            model_dir = os.path.join(path, "text_encoder")
            if tokenizer_path is None and os.path.isdir(os.path.join(path, "tokenizer")):
                tokenizer_path = os.path.join(path, "tokenizer")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"UMT5TextEncoder.from_pretrained: no config.json in {model_dir!r}")
        tokenizer_path = os.fspath(tokenizer_path) if tokenizer_path is not None else model_dir
        kwargs = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = UMT5EncoderModel.from_pretrained(model_dir, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"UMT5TextEncoder.from_pretrained: cannot load a tokenizer from "
                             f"{tokenizer_path!r}: {e}") from e
        enc = cls(model, tokenizer, max_length=max_length, clean_prompts=clean_prompts)
        if device is not None:
            enc.to(device)
        return enc

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TextTokens:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [wan_prompt_clean(p) for p in prompts] if self.clean_prompts else list(prompts)
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                               truncation=True, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return TextTokens(hidden, mask)


# HunyuanVideoPipeline's Llama prompt template and the tokens of its system part (cropped after
# encoding: the states start at the user's prompt)
HUNYUAN_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
HUNYUAN_CROP_START = 95


class HunyuanTextEncoder(nn.Module):
    """HunyuanVideo's two text encoders, from a local diffusers pipeline folder: a Llama
    (``text_encoder/``, ``tokenizer/``) and CLIP's text model (``text_encoder_2/``, ``tokenizer_2/``).

    Encoding follows ``HunyuanVideoPipeline.encode_prompt``: each prompt goes into Llama's prompt
    template, padded or truncated to ``crop_start + max_length`` tokens; the states are the hidden
    states ``skip_layers`` before the last, with the template's ``crop_start`` system tokens cut
    off; CLIP's ``pooler_output`` of the prompt padded to 77 tokens is the pooled vector. Output
    :class:`TextTokens` in :func:`pfp.backbones.hunyuan_video.pack_text`'s layout:
    ``tokens [B, 1 + max_length, D]``, token 0 the pooled vector (zero-padded to D), padded
    positions zero. Frozen (never trained)."""

    frozen = True

    def __init__(self, llama: nn.Module, tokenizer: Any, clip: nn.Module, clip_tokenizer: Any, *,
                 max_length: int = 256, crop_start: int = HUNYUAN_CROP_START, skip_layers: int = 2,
                 template: str = HUNYUAN_PROMPT_TEMPLATE, clip_max_length: int = 77):
        super().__init__()
        if max_length < 1:
            raise ValueError(f"HunyuanTextEncoder: max_length must be >= 1, got {max_length}")
        if crop_start < 0:
            raise ValueError(f"HunyuanTextEncoder: crop_start must be >= 0, got {crop_start}")
        if "{}" not in template:
            raise ValueError("HunyuanTextEncoder: the prompt template needs a {} where the prompt goes")
        self.llama = llama.eval().requires_grad_(False)
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer, self.clip_tokenizer = tokenizer, clip_tokenizer
        self.max_length, self.crop_start, self.skip_layers = int(max_length), int(crop_start), int(skip_layers)
        self.template, self.clip_max_length = template, int(clip_max_length)
        self.dim = int(llama.config.hidden_size)
        self.pooled_dim = int(clip.config.hidden_size)
        if self.pooled_dim > self.dim:
            raise ValueError(f"HunyuanTextEncoder: CLIP's width ({self.pooled_dim}) must not exceed Llama's "
                             f"({self.dim}): the pooled vector travels as a text token")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None, max_length: int = 256,
                        crop_start: int = HUNYUAN_CROP_START) -> "HunyuanTextEncoder":
        """Load from a local HunyuanVideo pipeline folder (``text_encoder/``, ``tokenizer/``,
        ``text_encoder_2/``, ``tokenizer_2/``); nothing is downloaded."""
        from transformers import AutoTokenizer, CLIPTextModel, LlamaModel
        path = os.fspath(path)
        parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        missing = [p for p in parts if not os.path.isdir(os.path.join(path, p))]
        if missing:
            raise ValueError(f"HunyuanTextEncoder.from_pretrained: {path!r} lacks {', '.join(missing)}; it must be a "
                             f"local HunyuanVideo pipeline folder with {', '.join(parts)}")
        kwargs = {"local_files_only": True, **({"dtype": dtype} if dtype is not None else {})}
        llama = LlamaModel.from_pretrained(os.path.join(path, "text_encoder"), **kwargs)
        clip = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder_2"), **kwargs)
        tok = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
        tok2 = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer_2"), local_files_only=True)
        return cls(llama, tok, clip, tok2, max_length=max_length, crop_start=crop_start)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> TextTokens:
        from pfp.backbones.hunyuan_video import pack_text
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        device = next(self.llama.parameters()).device
        batch = self.tokenizer([self.template.format(p) for p in prompts], padding="max_length",
                               max_length=self.crop_start + self.max_length, truncation=True,
                               return_attention_mask=True, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = self.llama(input_ids=ids, attention_mask=mask, output_hidden_states=True
                            ).hidden_states[-(self.skip_layers + 1)]
        states, mask = states[:, self.crop_start:], mask[:, self.crop_start:].bool()
        states = states * mask.unsqueeze(-1).to(states.dtype)
        clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_max_length,
                                       truncation=True, return_tensors="pt")["input_ids"]
        pooled = self.clip(clip_ids.to(next(self.clip.parameters()).device)).pooler_output
        return TextTokens(*pack_text(states, mask, pooled.to(states.device)))
