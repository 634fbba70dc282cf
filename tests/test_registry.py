"""The one registry of op implementations (pfp_kernels._registry): every op is described the same
way, reasons depend on the inputs, and choices and refusals read the same for every op."""
from __future__ import annotations

import pytest
import torch

import pfp_kernels as pk
from pfp_kernels import _registry, conv
from pfp_kernels.testing import assert_close, tolerance


def test_every_op_is_registered_with_a_probe_and_a_default_order():
    assert set(_registry.OPS) == {"conv3d_act", "causal_conv3d_act", "project_tokens", "joint_attention"}
    for op in _registry.OPS.values():
        assert op.names[-1] == "torch", op.name  # the reference is always the last resort
        what, inputs = op.probe(torch.device("cpu"))
        reasons = op.reasons(*inputs)
        assert set(reasons) == set(op.names) and reasons["torch"] is None
        assert op.choose("auto", *inputs) in op.auto_order["cpu"]


def test_reasons_look_at_the_inputs_not_only_the_device():
    x = torch.zeros(1, 4, 2, 3, 3)
    w = torch.zeros(8, 4, 1, 1, 1)
    int_x = x.to(torch.int32)
    reasons = conv.conv_impl_reasons("conv3d_act", int_x, w.to(torch.int32))
    assert "dtype int32 not supported" in reasons["triton"] or "Triton" in reasons["triton"]
    if _registry.TRITON_AVAILABLE and _registry.TRITON_INTERPRET:
        # the interpreter's bf16 tl.dot is wrong: refused for bf16 inputs only
        assert conv.conv_impl_reasons("conv3d_act", x, w)["triton"] is None
        assert "bf16" in conv.conv_impl_reasons("conv3d_act", x.bfloat16(), w.bfloat16())["triton"]
    q = torch.zeros(1, 2, 1, 16)
    assert pk.attention_backends(q, q, q)["sdpa"] is None
    wide = torch.zeros(1, 2, 1, 300)
    if _registry.TRITON_AVAILABLE and _registry.TRITON_INTERPRET:
        assert "head dim 300" in pk.attention_backends(wide, wide, wide)["triton"]
    assert "CUDA" in pk.attention_backends(q, q, q)["flash_attn"]


def test_choose_names_the_choices_and_the_reasons():
    op = _registry.OPS["conv3d_act"]
    x, w = torch.zeros(1, 4, 2, 3, 3), torch.zeros(8, 4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'cpp', 'triton', 'torch'\)"):
        op.choose("cudnn", x, w)
    if not _registry.TRITON_INTERPRET:
        with pytest.raises(RuntimeError, match="impl='triton' cannot run these inputs: Triton runs CPU"):
            op.choose("triton", x, w)
    none_can = _registry.Op("demo", (_registry.Impl("a", ("cpu",), lambda t: "too big"),),
                            {"default": ("a",)})
    with pytest.raises(RuntimeError, match=r"demo: no implementation can run these inputs \(a: too big\)"):
        none_can.choose("auto", x)
    assert "runs on CUDA tensors only" in _registry.Op(
        "demo", (_registry.Impl("a", ("cuda",), lambda t: None),), {"default": ("a",)}).reasons(x)["a"]


def test_a_call_that_needs_gradients_takes_the_grad_order_where_nothing_is_measured():
    from pfp_kernels._tuning import TuneCall
    impls = tuple(_registry.Impl(n, ("cpu",), lambda t: None) for n in ("fast_fwd", "fast_fwd_bwd", "torch"))
    op = _registry.Op("demo", impls, {"default": ("fast_fwd", "fast_fwd_bwd", "torch")},
                      grad_order={"cpu": ("fast_fwd_bwd", "fast_fwd", "torch")})
    x, xg = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert op.choose("auto", x, tune=TuneCall(("b",), lambda name: x, ())) == "fast_fwd"
    assert op.choose("auto", xg, tune=TuneCall(("b",), lambda name: xg, (xg,))) == "fast_fwd_bwd"
    assert op.choose("auto", xg) == "fast_fwd"            # no TuneCall: nothing says a gradient is wanted
    with torch.no_grad():                                  # inputs that require grad, no graph recorded
        assert op.choose("auto", xg, tune=TuneCall(("b",), lambda name: xg, (xg,))) == "fast_fwd"
    assert op.static_order("cuda", grad=True) == ("fast_fwd", "fast_fwd_bwd", "torch")   # none for that device
    # joint_attention on CUDA: with gradients, SDPA over the concatenation before the backends
    # that differentiate through the Triton backward
    attention = _registry.OPS["joint_attention"]
    assert attention.static_order("cuda", grad=True)[0] == "sdpa_concat"
    assert attention.static_order("cuda")[0] == "flash_attn"
    with pytest.raises(ValueError, match="unknown implementations"):
        _registry.register(_registry.Op("demo2", impls, {"default": ("torch",)}, grad_order={"cpu": ("nope",)}))


def test_register_refuses_an_order_naming_unknown_impls():
    with pytest.raises(ValueError, match="unknown implementations"):
        _registry.register(_registry.Op("demo", (_registry.Impl("a", (), lambda t: None),),
                                        {"default": ("a", "b")}))
    assert "demo" not in _registry.OPS


def test_the_tolerance_rule():
    ref = torch.tensor([0.5, -2.0, 4.0], dtype=torch.float64)
    tol = tolerance(torch.float32)
    assert_close(ref + 3.9 * tol, ref, torch.float32)  # within tol * max(1, 4)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(ref + 4.1 * tol, ref, torch.float32)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(torch.tensor([float("nan"), 0.0, 0.0]), ref)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(ref[:2], ref)
    small = torch.tensor([1e-3], dtype=torch.float64)
    assert_close(small * (1 + 0.5 * tolerance(torch.float32, "stream")), small, torch.float32, kind="stream")
    with pytest.raises(AssertionError):  # stream tolerances are relative to the values themselves
        assert_close(small * (1 + 2 * tolerance(torch.float32, "stream")), small, torch.float32, kind="stream")
    with pytest.raises(ValueError, match="kind must be one of"):
        tolerance(torch.float32, "loose")


def _extension_has(op: str) -> bool:
    from pfp_kernels import _extension
    return _extension.has_cpu_kernel(op)


@pytest.mark.skipif(not _extension_has("project_tokens"), reason="C++ kernels not loaded")
def test_call_op_goes_below_autograd_only_when_no_gradient_is_needed(monkeypatch):
    """call_op skips torch.library's autograd wrapper (by dispatching below the autograd key) when
    nothing needs a gradient, and goes through it when something does, so backward still works."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 1, 2, 3, generator=g, dtype=torch.float64)
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    op = torch.ops.pfp.project_tokens
    want = conv.project_tokens_reference(h, w.detach(), None, None)

    entered = []
    real = _registry._below_autograd

    class Counting:
        def __enter__(self):
            entered.append(1)
            self._guard = real()
            return self._guard.__enter__()

        def __exit__(self, *exc):
            return self._guard.__exit__(*exc)

    monkeypatch.setattr(_registry, "_below_autograd", Counting)
    with torch.no_grad():
        out = _registry.call_op(op, h, w, None, None)
    assert len(entered) == 1 and out.grad_fn is None
    assert_close(out, want, torch.float64)
    out = _registry.call_op(op, h, w.detach(), None, None)   # grad mode on, nothing requires grad
    assert len(entered) == 2 and out.grad_fn is None
    out = _registry.call_op(op, h, w, None, None)            # a gradient is needed: the wrapper runs
    assert len(entered) == 2 and out.grad_fn is not None
    out.sum().backward()
    assert_close(w.grad, h.sum(dim=(0, 2, 3, 4))[None].expand(4, 5), torch.float64)
