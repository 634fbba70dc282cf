"""Sequence-parallel generation across GPUs: Ulysses-style all-to-all over heads.

``torchrun --nproc_per_node=N -m pfp.generate ...`` splits every denoising step of a chunk over N
ranks. Each rank holds a contiguous slice of the chunk's target tokens through the blocks' linear
layers, norms, text cross-attention and MLP; for self-attention one all-to-all trades the token
slice for a slice of the heads (all tokens, H/N heads), attention runs on that, and a second
all-to-all trades back (DeepSpeed-Ulysses). The compressed context is short and shared: every rank
runs its tokens whole and attends with its own heads only, so each rank stores only its heads'
context K/V (a 1/N shard of the cache) and gathers the attention output over heads. The
cross-attention over the compressor's features (``cross_attention: true``) trades its query the
same way as self-attention, so each rank keeps its heads of those K/V too. The result
equals the single-device one (tests: 2 CPU ranks over gloo, fp32).

Only the all-to-all and gather glue is here, on ``torch.distributed``; the ranks run the same
sampler with the same seed, so their latents stay identical without further communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class SequenceParallel:
    """The ranks of a process group splitting tokens (and, for attention, heads) among them."""

    group: Optional[object] = None   # a torch.distributed ProcessGroup; None: the default group

    def __post_init__(self):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("sequence parallelism needs torch.distributed initialised (run under torchrun)")
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)

    # -- how a sequence is split ------------------------------------------------------------------
    def sizes(self, n: int) -> list:
        """Tokens per rank of a sequence of ``n``: contiguous, as even as can be."""
        return [n // self.world + (r < n % self.world) for r in range(self.world)]

    def local(self, x: Tensor, dim: int) -> Tensor:
        """This rank's slice of ``x`` along ``dim`` (the token dimension)."""
        sizes = self.sizes(x.shape[dim])
        start = sum(sizes[: self.rank])
        return x.narrow(dim, start, sizes[self.rank])

    def heads(self, num_heads: int) -> slice:
        if num_heads % self.world:
            raise ValueError(f"sequence parallelism over {self.world} ranks needs a head count divisible by it, "
                             f"got {num_heads} heads")
        per = num_heads // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    # -- the glue -------------------------------------------------------------------------------
    def seq_to_heads(self, x: Tensor, n_total: int) -> Tensor:
        """``[B, n_local, H, D]`` (this rank's tokens, every head) -> ``[B, n_total, H/P, D]`` (every
        token, this rank's heads)."""
        b, n, h, d = x.shape
        p = self.world
        # chunk j of the input (dim 0) = my tokens' head group j, sent to rank j
        send = x.reshape(b, n, p, h // p, d).permute(2, 1, 0, 3, 4).reshape(p * n, b, h // p, d).contiguous()
        recv = send.new_empty(n_total, b, h // p, d)
        dist.all_to_all_single(recv, send, output_split_sizes=self.sizes(n_total), input_split_sizes=[n] * p,
                               group=self.group)
        return recv.permute(1, 0, 2, 3)

    def heads_to_seq(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`seq_to_heads`: ``[B, N, H/P, D]`` -> ``[B, n_local, H, D]``."""
        b, n_total, hp, d = x.shape
        p = self.world
        n = self.sizes(n_total)[self.rank]
        send = x.permute(1, 0, 2, 3).contiguous()                     # rank i's tokens go back to rank i
        recv = send.new_empty(p * n, b, hp, d)
        dist.all_to_all_single(recv, send, output_split_sizes=[n] * p, input_split_sizes=self.sizes(n_total),
                               group=self.group)
        return recv.reshape(p, n, b, hp, d).permute(2, 1, 0, 3, 4).reshape(b, n, p * hp, d)

    def gather_heads(self, x: Tensor) -> Tensor:
        """``[B, N, H/P, D]`` from every rank -> ``[B, N, H, D]``."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=2)

    def gather_seq(self, x: Tensor, n_total: int) -> Tensor:
        """``[B, n_local, ...]`` from every rank -> ``[B, n_total, ...]`` (slices may differ by one)."""
        sizes = self.sizes(n_total)
        most = max(sizes)
        pad = x.new_zeros(x.shape[0], most, *x.shape[2:])
        pad[:, : x.shape[1]] = x
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        return torch.cat([part[:, :s] for part, s in zip(parts, sizes)], dim=1)


def init_from_env(device=None) -> Optional[SequenceParallel]:
    """Under ``torchrun`` with more than one rank: the default process group over the ranks'
    ``device`` (NCCL for CUDA, with this rank's GPU made current first; gloo for the CPU) and a
    :class:`SequenceParallel` over it; None for a single process. ``device`` None: CUDA where
    available."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda:
        index = torch.device(device).index if device is not None else None
        torch.cuda.set_device(index if index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return SequenceParallel()


def leave_process_group(succeeded: bool) -> None:
    """End a torchrun process's part in the default group, if it has one: when this rank succeeded,
    first wait for every rank (rank 0 writes the outputs after the others are done with them), then
    destroy the group, so that no rank exits with gloo's or NCCL's threads still running (a rank
    that left so was seen to abort at exit, and torchrun then stopped the rank still writing)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


__all__ = ["SequenceParallel", "init_from_env", "leave_process_group"]
