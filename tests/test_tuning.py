"""auto's measured choice (pfp_kernels._tuning): lookup, timing on first use, the cache file, the
shipped table, and the cases where nothing may be timed. conftest.py turns timing off for the
other tests; these turn it on with a cache file of their own."""
import json
import os
import warnings

import pytest
import torch

import pfp_kernels as pk
from pfp_kernels import _tuning, attention, conv, info
from pfp_kernels.testing import assert_close


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Timing on, an empty cache file of this test's own, a fresh table."""
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(_tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    table = _tuning.Table()
    monkeypatch.setattr(_tuning, "TABLE", table)
    return table


def _attention_inputs(requires_grad=False, nc=9):
    def r(*shape):
        return torch.randn(*shape).requires_grad_(requires_grad)
    return r(1, 7, 2, 16), r(1, 5, 2, 16), r(1, 5, 2, 16), r(1, nc, 2, 16), r(1, nc, 2, 16)


def _key(inputs, mode="fwd"):
    q, k, v, ck, cv = inputs
    call = attention._tune_call(q, k, v, ck, cv, 0.25)
    return ("joint_attention", _tuning.device_name(q.device), "float32", mode, call.bucket)


def _count_measures(monkeypatch):
    calls = []
    real = _tuning.measure

    def counting(candidates, *args, **kwargs):
        calls.append(tuple(candidates))
        return real(candidates, *args, **kwargs)
    monkeypatch.setattr(_tuning, "measure", counting)
    return calls


def _runnable(inputs):
    reasons = pk.attention_backends(*inputs)
    return [n for n in attention.JOINT_ATTENTION.tuned["cpu"] if reasons[n] is None]


def test_first_call_times_the_candidates_and_later_calls_reuse_the_choice(tuning, monkeypatch):
    inputs = _attention_inputs()
    calls = _count_measures(monkeypatch)
    out = pk.joint_attention(*inputs)
    runnable = tuple(_runnable(inputs))
    # all candidates timed; a winner other than the static order's first is timed against it again
    assert calls[0] == runnable and (len(calls) == 1 or calls[1:] == [(runnable[0], calls[1][1])])
    timed = len(calls)
    entry = tuning.get(_key(inputs))
    assert entry is not None and entry.impl in runnable
    assert set(entry.ms) == set(runnable) and all(t > 0 for t in entry.ms.values())
    # the result is the chosen backend's, and the same shape bucket is not timed again
    forced = pk.joint_attention(*inputs, impl=entry.impl)
    torch.testing.assert_close(out, forced, rtol=0, atol=0)
    pk.joint_attention(*_attention_inputs(nc=12))  # 12 rounds up to 16 like 9: same bucket
    assert len(calls) == timed
    # the cache file holds it, so a new process (a fresh table) does not time it either
    saved = json.loads(open(_tuning.cache_path()).read())
    assert [e["impl"] for e in saved["entries"]] == [entry.impl]
    monkeypatch.setattr(_tuning, "TABLE", _tuning.Table())
    pk.joint_attention(*inputs)
    assert len(calls) == timed


@pytest.mark.parametrize("second,want", [({"cpp": 2.0, "torch": 1.0}, "torch"),   # confirmed
                                         ({"cpp": 1.0, "torch": 2.0}, "cpp"),     # contradicted
                                         ({}, "cpp")])                            # nothing ran
def test_overturning_the_static_order_takes_two_timings_that_agree(tuning, monkeypatch, second, want):
    script = [{"cpp": 3.0, "torch": 1.5}, second]
    calls = []

    def scripted(candidates, *args, **kwargs):
        calls.append(tuple(candidates))
        return script[len(calls) - 1]
    monkeypatch.setattr(_tuning, "measure", scripted)
    x = torch.randn(1, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    pk.conv3d_act(x, torch.randn(4, 3, 3, 3, 3), None, 1, 1)
    assert calls == [("cpp", "torch"), ("cpp", "torch")]
    (entry,) = tuning.local.values()
    assert entry.impl == want
    assert entry.ms == {"cpp": min(3.0, second.get("cpp", 3.0)), "torch": min(1.5, second.get("torch", 1.5))}


def test_a_static_order_winner_is_timed_once(tuning, monkeypatch):
    calls = []

    def scripted(candidates, *args, **kwargs):
        calls.append(tuple(candidates))
        return {"cpp": 1.0, "torch": 2.0}
    monkeypatch.setattr(_tuning, "measure", scripted)
    x = torch.randn(1, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    pk.conv3d_act(x, torch.randn(4, 3, 3, 3, 3), None, 1, 1)
    assert calls == [("cpp", "torch")] and [e.impl for e in tuning.local.values()] == ["cpp"]


def test_forward_and_backward_are_keyed_apart(tuning, monkeypatch):
    calls = _count_measures(monkeypatch)
    inputs = _attention_inputs(requires_grad=True)
    out = pk.joint_attention(*inputs)
    all_timed = tuple(_runnable(inputs))  # (a second timing may confirm a winner: not counted)
    assert calls.count(all_timed) == 1 and tuning.get(_key(inputs, "fwd+bwd")) is not None
    assert tuning.get(_key(inputs, "fwd")) is None
    grads = torch.autograd.grad(out.sum(), inputs)
    want = torch.autograd.grad(attention.joint_attention_reference(*inputs)[0].sum(), inputs)
    for g, w in zip(grads, want):
        assert_close(g, w, torch.float32, kind="grad", what="auto after timing")
    with torch.no_grad():
        pk.joint_attention(*inputs)
    assert calls.count(all_timed) == 2 and tuning.get(_key(inputs, "fwd")) is not None


def test_a_cached_choice_is_followed_and_one_that_cannot_run_is_not(tuning, monkeypatch):
    inputs = _attention_inputs()
    key = _key(inputs)
    runnable = _runnable(inputs)
    for impl in runnable:
        ms = {name: 1.0 if name == impl else 2.0 for name in runnable}
        tuning.put(_tuning.Entry(*key, impl, ms, "test"), save=False)
        assert attention.JOINT_ATTENTION.choose("auto", *inputs, tune=attention._tune_call(*inputs, 0.25)) == impl
    # an entry naming a backend that cannot run here (flash_attn needs CUDA) is timed over
    calls = _count_measures(monkeypatch)
    tuning.put(_tuning.Entry(*key, "flash_attn", {"flash_attn": 0.1}, "test"), save=False)
    chosen = attention.JOINT_ATTENTION.choose("auto", *inputs, tune=attention._tune_call(*inputs, 0.25))
    assert chosen in runnable and calls.count(tuple(runnable)) == 1
    # so is one that never timed a candidate that runs here (e.g. written where it could not run)
    calls.clear()
    tuning.put(_tuning.Entry(*key, runnable[0], {runnable[0]: 1.0}, "test"), save=False)
    attention.JOINT_ATTENTION.choose("auto", *inputs, tune=attention._tune_call(*inputs, 0.25))
    assert calls.count(tuple(runnable)) == 1 and set(tuning.get(key).ms) == set(runnable)


def test_nothing_is_timed_when_off_while_compiling_or_on_fake_tensors(tuning, monkeypatch):
    calls = _count_measures(monkeypatch)
    inputs = _attention_inputs()
    static = next(n for n in attention.JOINT_ATTENTION.auto_order["cpu"] if pk.attention_backends(*inputs)[n] is None)
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "0")
    assert attention.JOINT_ATTENTION.choose("auto", *inputs, tune=attention._tune_call(*inputs, 0.25)) == static
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in inputs]
        assert pk.joint_attention(*fake).shape == inputs[0].shape
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert attention.JOINT_ATTENTION.choose("auto", *inputs, tune=attention._tune_call(*inputs, 0.25)) == static
    assert calls == [] and not tuning.local


def test_refreshing_times_a_known_key_again_even_when_timing_is_off(tuning, monkeypatch):
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "0")
    calls = _count_measures(monkeypatch)
    inputs = _attention_inputs()
    tuning.put(_tuning.Entry(*_key(inputs), "sdpa", {"sdpa": 1.0}, "test"), save=False)
    with _tuning.refreshing():
        pk.joint_attention(*inputs)
    # one timing of every candidate (a second one may confirm a winner that overturns the order)
    assert calls.count(tuple(_runnable(inputs))) == 1 and tuning.get(_key(inputs)).source.startswith("measured")


def test_a_candidate_that_fails_is_left_out(tuning, monkeypatch):
    x = torch.randn(1, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(4, 3, 3, 3, 3)
    real = torch.ops.pfp.conv3d_act

    class Broken:
        def __call__(self, *args):
            raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(torch.ops.pfp, "conv3d_act", Broken())
    y = pk.conv3d_act(x, w, None, 1, 1)
    (entry,) = tuning.local.values()
    # the failed candidate is recorded as never winning, so the entry is complete, not re-timed
    assert entry.impl == "torch" and entry.ms["cpp"] == float("inf") and entry.ms["torch"] < float("inf")
    monkeypatch.setattr(torch.ops.pfp, "conv3d_act", real)
    assert_close(y, conv.conv3d_act_reference(x, w, None, [1, 1, 1], [1, 1, 1], "silu"), torch.float32)


def test_conv_ops_time_their_candidates_and_match_the_reference(tuning):
    x = torch.randn(2, 3, 5, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(4, 3, 3, 3, 3), torch.randn(4)
    y = pk.conv3d_act(x, w, b, (2, 1, 1), 1)
    assert_close(y, conv.conv3d_act_reference(x, w, b, [2, 1, 1], [1, 1, 1], "silu"), torch.float32)
    y1, state = pk.causal_conv3d_act(x[:, :, :3], w, b, (2, 1, 1), 1)
    y2, _ = pk.causal_conv3d_act(x[:, :, 3:], w, b, (2, 1, 1), 1, state=state)
    whole, _ = pk.causal_conv3d_act(x, w, b, (2, 1, 1), 1, impl="torch")
    assert_close(torch.cat([y1, y2], dim=2), whole, torch.float32)
    h = torch.randn(2, 4, 3, 2, 2).contiguous(memory_format=torch.channels_last_3d)
    wp = torch.randn(5, 4)
    assert_close(pk.project_tokens(h, wp), conv.project_tokens_reference(h, wp, None, None), torch.float32)
    ops = sorted(e.op for e in tuning.local.values())
    assert ops == ["causal_conv3d_act", "causal_conv3d_act", "conv3d_act", "project_tokens"]  # with and without state
    assert all(set(e.ms) == {"cpp", "torch"} for e in tuning.local.values())


def test_conv_choices_inside_frozen_weights_are_keyed_apart(tuning):
    # Outside frozen_weights() the C++ convs hash each weight per call; inside they do not, so a
    # choice timed in one mode is not taken for the other.
    from pfp_kernels import _extension
    if not _extension.has_cpu_kernel("causal_conv3d_act"):
        pytest.skip("no C++ CPU conv kernels in this build: frozen_weights() is a no-op")
    x = torch.randn(1, 3, 4, 5, 5).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(4, 3, 3, 3, 3)
    pk.conv3d_act(x, w, None, 1, 1)
    pk.causal_conv3d_act(x, w, None, 1, 1)
    with pk.frozen_weights():
        pk.conv3d_act(x, w, None, 1, 1)
        pk.causal_conv3d_act(x, w, None, 1, 1)
        with pk.frozen_weights():   # nested: still frozen after the inner exit
            pass
        pk.conv3d_act(x, w, None, 1, 2)
    pk.conv3d_act(x, w, None, 1, 2)
    buckets = sorted((e.op, e.bucket) for e in tuning.local.values())
    frozen = [(op, b[:-1]) for op, b in buckets if b[-1] == "frozen"]
    plain = [(op, b) for op, b in buckets if b[-1] != "frozen"]
    assert sorted(frozen) == sorted(plain) and len(plain) == 3


def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(tuning, monkeypatch):
    path = _tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="not a tuning table"):
        out = pk.joint_attention(*_attention_inputs())
    assert out.isfinite().all()
    assert len(json.loads(path.read_text())["entries"]) == 1  # rewritten whole


@pytest.mark.parametrize("content", [b"\xff\xfe{", b'{"format": %d, "entries": [{"op": "x", "device": "d", '
                                     b'"dtype": "f", "mode": "fwd", "bucket": [[1, 2]], "impl": "cpp"}]}'])
def test_an_undecodable_or_malformed_cache_is_ignored_not_fatal(tuning, content):
    # bytes that are not UTF-8, and a bucket that is not a flat list, once crashed every auto call
    path = _tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.replace(b"%d", str(_tuning.FORMAT).encode()))
    with pytest.warns(UserWarning, match="tuning cache"):
        out = pk.joint_attention(*_attention_inputs())
    assert out.isfinite().all()


def _put_entries(path: str, worker: int, count: int, start) -> None:
    os.environ[_tuning.CACHE_ENV] = path
    table = _tuning.Table()
    start.wait()   # every process writes at once
    for i in range(count):
        table.put(_tuning.Entry("op", "dev", "float32", "fwd", (worker, i), "cpp", {"cpp": 1.0}, "test"))


def test_processes_writing_one_cache_keep_every_entry(tmp_path):
    # each write merges into the file under a lock; without it, concurrent merges dropped entries
    import multiprocessing as mp
    path = str(tmp_path / "shared.json")
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_put_entries, args=(path, w, 40, start)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(json.loads(open(path).read())["entries"]) == 160


def test_a_candidate_that_fails_while_timed_is_left_out(tuning, monkeypatch):
    # one that runs in the warm-up but raises in the timed rounds (e.g. memory that runs out)
    calls = {"n": 0}
    real = _tuning._call

    def flaky(run, name, grad_inputs):
        if name == "cpp":
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("out of memory (simulated)")
        return real(run, name, grad_inputs)
    monkeypatch.setattr(_tuning, "_call", flaky)
    x = torch.randn(1, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    pk.conv3d_act(x, torch.randn(4, 3, 3, 3, 3), None, 1, 1)
    (entry,) = tuning.local.values()
    assert entry.impl != "cpp" and entry.ms["cpp"] == float("inf")


def test_an_entry_measured_under_other_software_is_timed_again(tuning, monkeypatch):
    # A cache written before an upgrade (or by a pfp_kernels that did not record versions) names a
    # winner that a new kernel or torch may no longer make: it is re-timed, and serves only while
    # timing is off.
    inputs = _attention_inputs()
    key = _key(inputs)
    path = _tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _tuning.Entry(*key, "sdpa", {"sdpa": 1.0}, "measured long ago", software="torch 1.0")
    unversioned = old.to_json()
    del unversioned["software"]
    calls = _count_measures(monkeypatch)
    for stored in (old.to_json(), unversioned):
        path.write_text(json.dumps({"format": _tuning.FORMAT, "entries": [stored]}))
        tuning.local.clear()
        tuning._loaded = False
        monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "0")
        timed = len(calls)
        assert attention.JOINT_ATTENTION.choose("auto", *inputs, tune=attention._tune_call(*inputs, 0.25)) == "sdpa"
        assert len(calls) == timed and tuning.is_stale(tuning.get(key))
        assert "stale, measured under" in info.table_report([torch.device("cpu")])
        monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "1")
        pk.joint_attention(*inputs)
        assert len(calls) > timed  # (twice where the winner is not the static order's first)
        fresh = tuning.get(key)
        assert fresh.software == _tuning.software() and not tuning.is_stale(fresh)
        assert json.loads(path.read_text())["entries"][0]["software"] == _tuning.software()
        timed = len(calls)
        pk.joint_attention(*inputs)
        assert len(calls) == timed  # current now: followed, not timed
    assert _tuning.software().startswith(f"torch {torch.__version__}, pfp_kernels {pk.__version__}")


def test_an_empty_cache_file_is_an_empty_table(tuning):
    path = _tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")  # what mktemp makes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pk.joint_attention(*_attention_inputs())
    assert out.isfinite().all()
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_shipped_table_keys_match_the_keys_the_ops_build():
    shipped = _tuning._read_table(_tuning.SHIPPED_TABLE, "shipped table")
    assert shipped, "the package ships measured entries"
    for entry in shipped.values():
        op = pk._registry.OPS[entry.op]
        assert entry.impl in op.names and entry.impl == min(entry.ms, key=entry.ms.get), entry
        assert entry.source and entry.mode in ("fwd", "fwd+bwd")
    # the H100 entries' buckets are what the ops compute for the measured shapes
    m = torch.empty(1, 2340, 24, 128, device="meta", dtype=torch.bfloat16)
    c = torch.empty(1, 5460, 24, 128, device="meta", dtype=torch.bfloat16)
    att = attention._tune_call(m, m, m, c, c, 0.1).bucket
    stage = conv.conv_bucket((64, 16, 3, 3, 3), (2, 1, 1), (1, 1, 1), "silu", 60 * 60 * 104)
    buckets = {(e.op, e.bucket) for e in shipped.values() if e.device == "NVIDIA H100 80GB HBM3"}
    assert ("joint_attention", att) in buckets and ("conv3d_act", stage) in buckets


def test_info_table_and_tune_print_the_choices(tuning, monkeypatch, capsys):
    from pfp_kernels import info
    monkeypatch.setattr(info, "tuning_cases", lambda device: iter([
        ("tiny attention", lambda: pk.joint_attention(*_attention_inputs()))]))
    assert info.main(["--tune"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] cpu: tiny attention" in out and "joint_attention float32 fwd" in out
    assert info.main(["--table"]) == 0
    assert "measured" in capsys.readouterr().out


def test_tune_covers_the_compressors_own_calls(tuning, monkeypatch):
    # the compressor runs causal_conv3d_act (fresh, and after a stream's state) and project_tokens,
    # keyed apart from conv3d_act: --tune times them as a compressor calls them (here over 8 frames
    # of history, not 120, to keep the test short), on CPU also inside frozen_weights()
    from pfp_kernels import info
    monkeypatch.setattr(info, "COMPRESSOR_HR", (16, 8, 60, 104))
    cases = [(label, call) for label, call in info.tuning_cases(torch.device("cpu"))
             if label.startswith("compressor") and "float32" in label]
    assert len(cases) == 4 and sum("append" in label for label, _ in cases) == 2
    for _, call in cases:
        call()
    keys = {(e.op, e.bucket[-2] if e.bucket[-1] == "frozen" else e.bucket[-1], e.bucket[-1] == "frozen")
            for e in tuning.entries() if e.op == "causal_conv3d_act"}
    assert keys == {("causal_conv3d_act", state, frozen) for state in (0, 1) for frozen in (False, True)}
    assert {e.bucket[:2] for e in tuning.entries() if e.op == "project_tokens"} == {(256, 512)}


def test_info_refuses_a_device_that_is_not_here(capsys):
    from pfp_kernels import info
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert info.main(["--table", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda" in err


def test_timing_inside_activation_checkpointing_leaves_the_recompute_consistent(tuning, monkeypatch):
    # the first forward of a checkpointed region times the candidates, its recompute (in the
    # backward) reuses the choice: the timing must save nothing through the checkpoint's hooks, or
    # torch refuses the recompute ("different metadata"). Training with --grad-checkpointing and a
    # fresh cache hit exactly this.
    from torch.utils.checkpoint import checkpoint
    calls = _count_measures(monkeypatch)
    q, k, v, ck, cv = _attention_inputs(requires_grad=True)

    def region(q, k, v):
        x = torch.tanh(q) * 2
        return pk.joint_attention(x, k, v, context_k=ck, context_v=cv).sin()
    out = checkpoint(region, q, k, v, use_reentrant=False)
    out.square().sum().backward()
    assert calls, "the first call was not timed"
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v, ck, cv):
        t.grad = None
    region(q, k, v).square().sum().backward()   # without checkpointing: the same gradients
    for g, t in zip(grads, (q, k, v)):
        assert_close(g, t.grad, torch.float32)


def test_cpu_entries_are_keyed_by_the_cpp_kernels_as_loaded():
    # a choice measured with the AVX-512 build (or without the C++ kernels) is not reused by a
    # process that loaded another one: PFP_CPU_ISA and PFP_DISABLE_CPP change the device name
    import subprocess
    import sys
    from pfp_kernels import _extension
    name = _tuning.device_name(torch.device("cpu"))
    assert name.endswith(f"pfp C++ {_extension.ISA or 'off'}")
    script = "import torch; from pfp_kernels import _tuning; print(_tuning.device_name(torch.device('cpu')))"
    off = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PFP_DISABLE_CPP": "1"},
                         capture_output=True, text=True, timeout=120).stdout.strip()
    assert off.endswith(", pfp C++ off") and off.split(",")[0] == name.split(",")[0]   # the same CPU model
