"""pfp.memory: the planner traces the full-size Wan 2.2 TI2V-5B parts under FakeTensorMode (no
weights, no GPU) and picks where each part lives so every phase of a chunk fits a budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pfp import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30


@pytest.fixture(scope="module")
def trace_5b():
    # 832x480, 20 s of history, 4x4x2, cached mode: the setting
    return memory.trace_preset(memory.preset("wan22-ti2v-5b-480p"), history_seconds=20)


def test_trace_finds_the_real_sizes(trace_5b):
    t = trace_5b
    assert t.target_tokens == 2340                       # 6 latent frames of 15x26 tokens
    assert abs(t.transformer / GIB - 9.31) < 0.01         # 5.0 B parameters in bf16
    assert abs(t.text / GIB - 10.58) < 0.02               # UMT5-XXL in bf16
    assert t.blocks < t.transformer and t.largest_block * 30 == t.blocks
    layers, inner = 30, 3072
    assert t.kv == 2 * layers * t.context_tokens * inner * 2
    for phase in memory.PHASES:
        assert t.transient[phase] > 0, phase
    # a denoise step at CFG batch 2 holds about half a GiB of activations (the 0.50 GiB)
    assert 0.3 * GIB < t.transient["denoise"] < 1.0 * GIB


@pytest.mark.parametrize("budget_gib", [12, 8])
def test_small_budgets_fit_every_phase(trace_5b, budget_gib):
    plan = memory.choose(trace_5b, budget_gib * GIB)
    assert plan.fits, plan.table()
    assert [p.name for p in plan.phases] == list(memory.PHASES)
    for p in plan.phases:
        assert p.peak_bytes <= budget_gib * GIB, (p.name, p.peak_bytes)
        # the allowance is in every peak
        assert p.peak_bytes >= memory.ALLOWANCE_BYTES
    if budget_gib == 8:  # only fp8 weights, with the transformer off the GPU while the VAE decodes, get there
        assert plan.choices["weights"] == "fp8" and plan.choices["text"] != "gpu", plan.choices
        assert plan.choices["swap"] or plan.choices["offload"] == "block", plan.choices


@pytest.fixture(scope="module")
def trace_wan21_14b():
    return memory.trace_preset(memory.preset("wan21-t2v-14b-480p"), history_seconds=20)


@pytest.mark.parametrize("budget_gib", [80, 24, 12])
def test_wan21_14b_plans_fit_80_24_and_12_gib(trace_wan21_14b, budget_gib):
    # Wan 2.1 T2V 14B (14.3 B parameters, 26.6 GiB in bf16) with its 8x VAE, traced without weights
    t = trace_wan21_14b
    assert abs(t.transformer / GIB - 26.6) < 0.2 and t.experts == 1
    plan = memory.choose(t, budget_gib * GIB)
    assert plan.fits, plan.table()
    for p in plan.phases:
        assert memory.ALLOWANCE_BYTES <= p.peak_bytes <= budget_gib * GIB, (p.name, p.peak_bytes)
    if budget_gib == 80:   # the whole model stays on the card
        assert plan.choices["weights"] == "native" and plan.choices["offload"] == "none", plan.choices
        assert plan.bytes_moved_per_chunk == 0
    else:
        assert plan.choices["weights"] == "fp8", plan.choices


def test_a_whole_h100_keeps_everything_resident(trace_5b):
    plan = memory.choose(trace_5b, 80 * GIB)
    from pfp.offload import PLAN_DEFAULTS
    # nothing departs from the plain run, except that the room lets the context K/V sit in
    # [context ; target] buffers, filled once per chunk instead of concatenated at every step
    assert plan.choices == {**PLAN_DEFAULTS, "kv": "buffer"}
    fill = (trace_5b.kv_buffers + trace_5b.kv) / memory.HBM_BYTES_PER_S
    assert plan.bytes_moved_per_chunk == 0 and plan.seconds_lost_per_chunk == pytest.approx(fill, abs=1e-4)
    plain = memory.estimate(trace_5b, {}, None)
    assert plain.seconds_lost_per_chunk == pytest.approx(20 * fill, abs=1e-4)
    kv = next(p for p in plan.phases if p.name == "denoise").peak_bytes - next(
        p for p in plain.phases if p.name == "denoise").peak_bytes
    assert abs(kv - trace_5b.kv_buffers * (1 + memory.ALLOWANCE_FRACTION)) <= 1
    # CFG batch 2 over [context ; 2340 target] tokens, 30 layers, width 3072, bf16, K and V
    assert trace_5b.kv_buffers == 2 * 30 * 2 * (trace_5b.context_tokens + trace_5b.target_tokens) * 3072 * 2
    assert "text_encoder" in plan.phases[-1].resident and "transformer" in plan.phases[-1].resident


def test_peaks_add_up_from_the_parts(trace_5b):
    t = trace_5b
    plain = memory.estimate(t, {"weights": "native", "offload": "none", "swap": False, "text": "gpu", "kv": "native"},
                            80 * GIB)
    resident = t.transformer + t.vae + t.text + t.compressor + t.kv + t.vae_cache
    denoise = next(p for p in plain.phases if p.name == "denoise")
    want = memory.ALLOWANCE_BYTES + (resident + t.transient["denoise"]) * (1 + memory.ALLOWANCE_FRACTION)
    assert abs(denoise.peak_bytes - want) <= 1
    # each choice only ever lowers a phase's peak against the plain plan, except that a tiled decode
    # keeps more causal cache (the tiles overlap) to make the decode's own transient smaller (with
    # Wan's large causal caches a 4x4 tiling keeps so much that even its decode phase grows)
    extra = {"whole": 0, "tiled": (t.vae_cache_tiled - t.vae_cache) * (1 + memory.ALLOWANCE_FRACTION) + 1,
             "tiled4": (t.vae_cache_tiled4 - t.vae_cache) * (1 + memory.ALLOWANCE_FRACTION) + 1}
    for plan in memory.all_plans(t, 80 * GIB):
        more = extra[plan.choices["decode"]]
        if plan.choices["kv"] == "buffer":   # the buffers are held beside the K/V while denoising only
            others = [(p.peak_bytes, q.peak_bytes) for p, q in zip(plan.phases, plain.phases) if p.name != "denoise"]
            assert all(a <= b + more for a, b in others), plan.choices
            more += t.kv_buffers * (1 + memory.ALLOWANCE_FRACTION) + 1
        for p, q in zip(plan.phases, plain.phases):
            assert p.peak_bytes <= q.peak_bytes + more, (plan.choices, p.name)
    whole = memory.estimate(t, {}, None).phases[-1]
    tiled = memory.estimate(t, {"decode": "tiled"}, None).phases[-1]
    tiled4 = memory.estimate(t, {"decode": "tiled4"}, None).phases[-1]
    assert whole.name == tiled.name == "decode" and tiled.peak_bytes < whole.peak_bytes
    assert tiled4.name == "decode" and t.transient["decode_tiled4"] < t.transient["decode"]


def test_tracker_counts_what_a_call_creates_not_what_existed():
    from pfp.memory import _tracked_peak
    x = torch.empty(1000, dtype=torch.float32)  # 4000 bytes, resident

    def work():
        a = x * 2               # 4000 B
        b = torch.empty(500)    # 2000 B
        del a
        c = x.view(10, 100)     # a view: nothing new
        return b, c

    assert _tracked_peak(work) == 6000


def test_tracker_lets_a_renewed_cache_replace_the_one_it_read():
    # a causal decode renews each cache slot: the new tensor takes the old one's place, which was
    # resident. Named releasable, the old slot's bytes leave the count when it is freed.
    from pfp.memory import _tracked_peak
    cache = [torch.empty(1000), torch.empty(1000)]   # 4000 bytes each, resident

    def renew():
        for i in range(2):
            fresh = cache[i] + 1     # 4000 B while the old slot still lives
            cache[i] = fresh         # the old one is freed here
        return torch.empty(250)      # 1000 B more at the end

    assert _tracked_peak(renew) == 9000                              # both new slots, and the 1000 B
    assert _tracked_peak(renew, lambda: list(cache)) == 4000        # one slot's overlap at a time
    # as the planner runs it: fake tensors, whose storages are freed (and counted off) the same way
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        cache[:] = [torch.empty(1000), torch.empty(1000)]
        assert _tracked_peak(renew, lambda: list(cache)) == 4000


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pfp.memory", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)


@pytest.mark.parametrize("args,needle", [
    (["--config", "wan22-ti2v-5b-480p", "--vram", "12"], "--vram must be a positive size with a unit"),
    (["--config", "wan22-ti2v-5b-480p", "--vram=-3GiB"], "--vram must be a positive size with a unit"),
    (["--config", "wan22-ti2v-5b-480p", "--vram", "-3GiB"], "--vram must be a positive size with a unit"),
    (["--config", "wan22-ti2v-5b-480p", "--vram", "--json"], "argument --vram: expected one argument"),
    (["--config", "wan22-ti2v-5b-480p", "--vram", "0GiB"], "--vram must be > 0"),
    (["--config", "nope", "--vram", "12GiB"], "is not a preset; presets: wan22-ti2v-5b-480p"),
    (["--config", "wan22-ti2v-5b-480p", "--vram", "12GiB", "--rate", "3x3x3"], "rate"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    out = _cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_cli_json_and_a_budget_nothing_fits():
    out = _cli("--config", "wan22-ti2v-5b-480p", "--vram", "12GiB", "--json", "--history", "4")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["fits"] is True and plan["budget_bytes"] == 12 * GIB
    assert [p["name"] for p in plan["phases"]] == list(memory.PHASES)
    assert all(p["peak_bytes"] <= 12 * GIB and isinstance(p["resident"], list) for p in plan["phases"])
    assert set(plan["choices"]) == set(memory.CHOICES)
    out = _cli("--config", "wan22-ti2v-5b-480p", "--vram", "2GiB", "--history", "4")
    assert out.returncode == 2
    assert "too small" in out.stderr and "the smallest needs" in out.stderr and len(out.stderr.strip().splitlines()) == 1
