"""Two datasets as one: each item drawn from the second with a fixed probability.

A few seconds of real video is what a small run has; procedural scenes are unlimited. Mixing them
shows a model more views than the real clips alone, while the real share keeps it on real content.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import draw_item

# What every dataset of this package puts in an item (see pfp.data): the keys a mixed item keeps,
# so that a batch of items from both sources collates.
SHARED_KEYS = ("hr", "lr", "storyboard", "hr_fps", "lr_fps", "source")


class MixedVideos:
    """Item ``i`` is ``primary``'s item ``i``, or with probability ``p_extra`` a uniformly drawn item
    of ``extra`` instead; the choice, the extra index and the primary's own random window and crop
    all come from ``get``'s generator, so a step's batch is a pure function of its generator.

    Args:
        primary: a dataset (``len``, ``[i]``, optionally ``get(i, generator)``), e.g. a
            :class:`pfp.data.VideoFolderDataset`; its length is this dataset's length.
        extra: another, e.g. :class:`pfp.data.SyntheticMultiShotVideos`, with the same ``spec``.
        p_extra: the share of items from ``extra``, in ``[0, 1)``.

    Items hold the keys every dataset here shares (``SHARED_KEYS``: ``hr``, ``lr``, ``storyboard``,
    ``hr_fps``, ``lr_fps``, ``source``); dataset-specific extras are dropped.
    """

    def __init__(self, primary, extra, p_extra: float):
        if isinstance(p_extra, bool) or not isinstance(p_extra, (int, float)) or not 0 <= p_extra < 1:
            raise ValueError(f"p_extra must be a number in [0, 1), got {p_extra!r}")
        if len(primary) == 0 or len(extra) == 0:
            raise ValueError(f"both datasets must hold items (primary {len(primary)}, extra {len(extra)})")
        specs = getattr(primary, "spec", None), getattr(extra, "spec", None)
        if None not in specs and specs[0] != specs[1]:
            raise ValueError(f"the datasets' clip specs differ: primary {specs[0]}, extra {specs[1]}")
        self.primary, self.extra, self.p_extra = primary, extra, float(p_extra)
        self.spec = specs[0]

    def __len__(self) -> int:
        return len(self.primary)

    def get(self, index: int, generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        if torch.rand((), generator=generator).item() < self.p_extra:
            item = draw_item(self.extra, int(torch.randint(len(self.extra), (), generator=generator)), generator)
        else:
            item = draw_item(self.primary, index, generator)
        return {k: item[k] for k in SHARED_KEYS}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)
