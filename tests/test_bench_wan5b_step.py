"""benchmarks/bench_wan5b_step.py: its FLOP count (which its MFU rests on) against torch's own
FlopCounterMode, and its CPU dry run (the GPU script's code paths, without a GPU)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_step_flops_match_torchs_flop_counter(mode, monkeypatch):
    pytest.importorskip("diffusers")
    import bench_wan5b_step as bench
    import pfp.backbones.wan_style as wan_style
    from torch.utils.flop_counter import FlopCounterMode
    from pfp.compressor import Context
    bb, cfg = bench.build("cpu", torch.float32, dry_run=True)
    t, h, w = bench.DRY["grid"]
    nc, nl = 2 * h * w, 16
    real = wan_style.pfp_kernels.joint_attention

    def counted(*args, **kwargs):  # SDPA over the concatenation, which the counter sees
        return real(*args, **{**kwargs, "impl": "sdpa_concat"})
    monkeypatch.setattr(wan_style.pfp_kernels, "joint_attention", counted)
    pos = torch.stack(torch.meshgrid(torch.arange(2) * 2.0, torch.arange(h) * 1.0, torch.arange(w) * 1.0,
                                     indexing="ij"), -1).reshape(-1, 3)
    ctx = Context(torch.randn(1, nc, cfg["num_attention_heads"] * cfg["attention_head_dim"]), pos)
    x, text = torch.randn(2, cfg["in_channels"], t, 2 * h, 2 * w), torch.randn(2, nl, cfg["text_dim"])
    bb.context_mode = mode
    with torch.no_grad():
        c = bb.cache_context(ctx) if mode == "cached" else ctx
        with FlopCounterMode(display=False) as counter:
            bb(x, torch.full((2,), 0.7), text, c, t_start=10)
    ratio = bench.step_flops(cfg, t * h * w, nc, nl, 2, mode) / counter.get_total_flops()
    assert 0.97 < ratio < 1.03, ratio   # the rest: embeddings and the output head


def test_cpu_dry_run_writes_its_table(tmp_path):
    pytest.importorskip("diffusers")
    env = dict(os.environ, PFP_BENCH_OUT=str(tmp_path), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_wan5b_step.py"), "--dry-run",
                        "--steps", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "wan5b_step" / "wan5b_step_cpu_dry_run.md").read_text()
    assert all(f"| fp32 (dry run) | {mode} |" in text for mode in ("cached", "cached+buffers", "joint"))
    assert "48 target tokens" in text     # the dry run's 2 x 4 x 6 token grid (the full run: 6 x 15 x 26 = 2340)
    assert "fp8 | n/a | not run: fp8 GEMMs need a CUDA device" in text
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_wan5b_step.py"), "--device", "cpu"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "needs --device cuda" in bad.stderr


def test_model_step_dry_run_writes_both_models(tmp_path):
    # benchmarks/bench_model_step.py (A14B's expert and HunyuanVideo at 480p on a GPU): its CPU dry run
    pytest.importorskip("diffusers")
    env = dict(os.environ, PFP_BENCH_OUT=str(tmp_path), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "benchmarks", "bench_model_step.py")
    r = subprocess.run([sys.executable, script, "--dry-run", "--steps", "1"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "model_step" / "model_step_cpu_dry_run.md").read_text()
    assert "| a14b | " in text and "| hunyuanvideo | " in text and "not run" not in text
    bad = subprocess.run([sys.executable, script, "--model", "sora"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--model" in bad.stderr


def test_cuda_checks_script_runs_its_cpu_form(tmp_path):
    # benchmarks/cuda_checks.sh, the one GPU run: DRY=1 runs the same steps on the CPU into a
    # temporary results folder, so the script itself is checked before a GPU loan is spent on it
    script = os.path.join(ROOT, "benchmarks", "cuda_checks.sh")
    env = dict(os.environ, DRY="1", OUT=str(tmp_path), PFP_BENCH_OUT=str(tmp_path / "results"), OMP_NUM_THREADS="1",
               PFP_KERNELS_CACHE=str(tmp_path / "users_cache.json"), PFP_KERNELS_AUTOTUNE="1")
    r = subprocess.run(["bash", script, "env", "tune", "attention", "wan5b", "tests"], env=env, capture_output=True,
                       text=True, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    ends = [line for line in r.stdout.splitlines() if line.startswith("=== ") and " rc " in line]
    assert [line.split(":")[0] for line in ends] == ["=== env", "=== tune", "=== attention", "=== wan5b",
                                                     "=== tests"], r.stdout
    assert all(": rc 0 in " in line for line in ends), r.stdout
    log = (tmp_path / "cuda_checks.log").read_text()
    assert "pfp_kernels" in log and "skipped" in log     # info's table; the CUDA tests collected, skipped here
    # the dry run's timings go to its own folder: the user's cache (PFP_KERNELS_CACHE) is not touched
    assert "dry run on the CPU" in r.stdout and not (tmp_path / "users_cache.json").exists()
    assert (tmp_path / "results" / "tuning" / "cpu_tuning.json").exists()   # wan5b's attention was timed there
    assert (tmp_path / "results" / "wan5b_step" / "wan5b_step_cpu_dry_run.md").exists()
    assert not list(tmp_path.rglob("cuda_tuning.json"))
    for steps in (["env", "bogus"], ["env tune"]):   # an unknown name, and two names in one argument
        bad = subprocess.run(["bash", script, *steps], env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "unknown step" in bad.stdout and "=== env" not in bad.stdout, steps
