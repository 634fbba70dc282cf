"""JointKVBuffer: joint attention through a persistent [context ; target] buffer, against the fp64
reference, over many steps of one loop (the tail rewritten each time), with masks, a shared
batch-1 context, fewer target keys than the capacity, and the errors.

Outputs are poisoned (conftest.py): the buffer's tail is allocated uninitialised, so a step that
read past what it wrote would show NaN.
"""
import pytest
import torch

import pfp_kernels as pk
from pfp_kernels import _tuning
from pfp_kernels.attention import joint_attention_reference
from pfp_kernels.testing import assert_close

from attention_cases import SHAPES

pytestmark = pytest.mark.usefixtures("poison_uninitialised")


def _ref64(q, k, v, ck, cv, mask=None, scale=None):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return joint_attention_reference(d(q), d(k), d(v), d(ck), d(cv), scale, mask)[0]


def _r(g, dtype, *shape):
    return torch.randn(*shape, generator=g).to(dtype)


def _impls(buf, q, tail_masked=False):
    return [name for name, why in buf.backends(q, tail_masked).items() if why is None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3] is not None], ids=lambda s: "x".join(map(str, s)))
def test_every_step_matches_the_fp64_reference(shape, dtype):
    b, nq, nk, nc, h, d, cb = shape
    cb = b if cb is None else cb
    g = torch.Generator().manual_seed(0)
    ck, cv = _r(g, dtype, cb, nc, h, d), _r(g, dtype, cb, nc, h, d)
    buf = pk.JointKVBuffer(ck, cv, b, nk + 2)
    assert buf.keys.shape == (b, nc + nk + 2, h, d) and buf.num_context == nc
    with torch.no_grad():
        for step in range(3):   # a denoising loop: new target K/V, same context
            n = nk if step < 2 else max(nk - 1, 0)   # a shorter target than the last step's
            if nc + n == 0:
                continue
            q, k, v = _r(g, dtype, b, nq, h, d), _r(g, dtype, b, n, h, d), _r(g, dtype, b, n, h, d)
            want = _ref64(q, k, v, ck, cv, scale=0.3)
            for impl in ["auto"] + _impls(buf, q):
                out = buf.attend(q, k, v, scale=0.3, impl=impl)
                assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
                assert_close(out, want, dtype, what=f"{impl} step {step}")
                assert_close(out, pk.joint_attention(q, k, v, ck, cv, scale=0.3), dtype, what="vs joint_attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context_batch", [1, 3])
def test_context_mask(dtype, context_batch):
    g = torch.Generator().manual_seed(1)
    b, nq, nk, nc, h, d = 3, 6, 5, 9, 2, 16
    ck, cv = _r(g, dtype, context_batch, nc, h, d), _r(g, dtype, context_batch, nc, h, d)
    mask = torch.rand(context_batch, nc, generator=g) > 0.4
    mask[0, 0] = True
    if context_batch > 1:
        mask[1] = False   # a history of nothing: its queries read the targets alone
    buf = pk.JointKVBuffer(ck, cv, b, nk, context_mask=mask)
    q, k, v = _r(g, dtype, b, nq, h, d), _r(g, dtype, b, nk, h, d), _r(g, dtype, b, nk, h, d)
    with torch.no_grad():
        for impl in ["auto"] + _impls(buf, q):
            assert_close(buf.attend(q, k, v, impl=impl), _ref64(q, k, v, ck, cv, mask), dtype, what=impl)
        # no target keys: a sample whose context is all masked gets 0, as joint_attention gives
        e = q.new_empty(b, 0, h, d)
        out = buf.attend(q, e, e)
        assert_close(out, _ref64(q, e, e, ck, cv, mask), dtype, what="no target keys")
        if context_batch > 1:
            assert (out[1] == 0).all()



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context_masked", [False, True])
def test_tail_key_mask(dtype, context_masked):
    # HunyuanVideo's tail: the target's keys, then padded text keys; equal to joint_attention with
    # the tail as part of the context segment, under the joined mask
    g = torch.Generator().manual_seed(3)
    b, nq, nk, nc, h, d = 3, 6, 7, 9, 2, 16
    ck, cv = _r(g, dtype, 1, nc, h, d), _r(g, dtype, 1, nc, h, d)
    cmask = torch.rand(1, nc, generator=g) > 0.4 if context_masked else None
    buf = pk.JointKVBuffer(ck, cv, b, nk, context_mask=cmask)
    full_c = torch.ones(b, nc, dtype=torch.bool) if cmask is None else cmask.expand(b, -1)
    empty = q_like = None
    with torch.no_grad():
        for step, masked in enumerate([True, False, True]):   # a masked step, then one without: no mask left over
            q, k, v = _r(g, dtype, b, nq, h, d), _r(g, dtype, b, nk, h, d), _r(g, dtype, b, nk, h, d)
            tail = torch.rand(b, nk, generator=g) > 0.5 if masked else None
            if tail is not None:
                tail[0] = True
                tail[1, 3:] = False   # trailing padding
            empty = q.new_empty(b, 0, h, d)
            keep = torch.cat([full_c, torch.ones(b, nk, dtype=torch.bool) if tail is None else tail], 1)
            want = _ref64(q, empty, empty, torch.cat([ck.expand(b, -1, -1, -1), k], 1),
                          torch.cat([cv.expand(b, -1, -1, -1), v], 1), keep)
            for impl in ["auto"] + _impls(buf, q, tail is not None):
                assert_close(buf.attend(q, k, v, key_mask=tail, impl=impl), want, dtype, what=f"{impl} step {step}")
            q_like = q
        if context_masked:   # a sample with every context key and every tail key masked gets 0
            q, k, v = q_like, _r(g, dtype, b, nk, h, d), _r(g, dtype, b, nk, h, d)
            dead = torch.ones(b, nk, dtype=torch.bool)
            dead[2] = False
            only = pk.JointKVBuffer(ck, cv, b, nk, context_mask=torch.zeros(1, nc, dtype=torch.bool))
            out = only.attend(q, k, v, key_mask=dead)
            assert (out[2] == 0).all() and torch.isfinite(out).all()
            assert_close(out[:2], _ref64(q[:2], k[:2], v[:2], None, None), dtype, what="the live samples")
        with pytest.raises(ValueError, match=r"key_mask must be a bool \[3, 7\] tensor"):
            buf.attend(q_like, k, v, key_mask=torch.ones(b, nk - 1, dtype=torch.bool))

def test_the_context_is_copied_once_and_the_tail_reused():
    g = torch.Generator().manual_seed(2)
    ck, cv = _r(g, torch.float32, 1, 7, 2, 16), _r(g, torch.float32, 1, 7, 2, 16)
    buf = pk.JointKVBuffer(ck, cv, 2, 4)
    head = buf.keys[:, :7].clone()
    ck.add_(1.0)   # the buffer holds its own copy: a later change of the source is not seen
    ptr = buf.keys.data_ptr()
    with torch.no_grad():
        for _ in range(2):
            q, k, v = (_r(g, torch.float32, 2, 3, 2, 16) for _ in range(3))
            buf.attend(q, k, v)
            assert buf.keys.data_ptr() == ptr   # no reallocation
            assert torch.equal(buf.keys[:, 7:10], k)
    assert torch.equal(buf.keys[:, :7], head) and torch.equal(head[0], head[1])
    assert buf.nbytes == 2 * 2 * 11 * 2 * 16 * 4


def test_auto_times_the_kernels_that_run_once_per_key(monkeypatch, tmp_path):
    # On CPU sdpa and cpp run (flash-attn is CUDA): the first call of a key times them and caches the
    # winner; with a tail key mask only sdpa runs, and nothing is timed; a call without a mask after
    # it is an unmasked call again (the same key as before, no new timing).
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(_tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    monkeypatch.setattr(_tuning, "TABLE", _tuning.Table())
    ck = torch.randn(1, 5, 2, 16)
    buf = pk.JointKVBuffer(ck, ck, 1, 3)
    q = torch.randn(1, 3, 2, 16)
    assert buf.backends(q)["flash_attn"].startswith("flash-attn runs on CUDA")
    assert buf.backends(q, tail_masked=True)["cpp"].startswith("the C++ kernel takes a context mask but no tail")
    runnable = _impls(buf, q)
    timed = []
    real_measure = _tuning.measure
    monkeypatch.setattr(_tuning, "measure", lambda names, *a, **k: timed.append(tuple(names)) or real_measure(names, *a, **k))
    with torch.no_grad():
        buf.attend(q, q, q)
        buf.attend(q, q, q)
        buf.attend(q, q, q, key_mask=torch.tensor([[True, False, True]]))
        buf.attend(q, q, q)   # unmasked again: the unmasked key (the last call's mask is not kept)
    entries = [key for key in _tuning.TABLE.local if key[0] == "joint_attention_buffer"]
    if runnable == ["sdpa"]:   # a build without the C++ library
        assert not timed and not entries
    else:
        assert runnable == ["sdpa", "cpp"] and timed and set(timed[0]) == {"sdpa", "cpp"}
        assert len(entries) == 1 and _tuning.TABLE.get(entries[0]).impl in ("sdpa", "cpp")


def test_bad_input_is_refused_with_its_reason():
    ck = torch.randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        pk.JointKVBuffer(ck, ck, 0, 3)
    with pytest.raises(ValueError, match="capacity must be an int >= 0"):
        pk.JointKVBuffer(ck, ck, 1, -1)
    with pytest.raises(ValueError, match="context_k has batch 2"):
        pk.JointKVBuffer(torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16), 3, 3)
    with pytest.raises(ValueError, match="context_mask must be"):
        pk.JointKVBuffer(ck, ck, 1, 3, context_mask=torch.ones(1, 4, dtype=torch.bool))
    buf = pk.JointKVBuffer(ck, ck, 2, 3)
    q = torch.randn(2, 4, 2, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="4 target keys do not fit this buffer's capacity 3"):
            buf.attend(q, q, q)
        with pytest.raises(ValueError, match="made for batch 2"):
            buf.attend(q[:1], q[:1, :3], q[:1, :3])
        with pytest.raises(ValueError, match="dtype"):
            buf.attend(q.double(), q[:, :3].double(), q[:, :3].double())
        with pytest.raises(ValueError, match="impl 'triton' is not valid; choose one of: auto, flash_attn, sdpa, cpp"):
            buf.attend(q, q[:, :3], q[:, :3], impl="triton")
        with pytest.raises(RuntimeError, match="impl 'flash_attn' cannot run here: flash-attn runs on CUDA"):
            buf.attend(q, q[:, :3], q[:, :3], impl="flash_attn")
    with pytest.raises(RuntimeError, match="for inference"):
        buf.attend(q.requires_grad_(), q[:, :3], q[:, :3])
