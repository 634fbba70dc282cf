"""Presets of real models by name: `--config wan22-ti2v-5b-480p --model-dir DIR` reads a local
diffusers pipeline folder (here one of tiny random parts laid out as Wan's)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _tiny_pfp import TINY_WAN, save_tiny_umt5, save_tiny_wan_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel
    root = tmp_path_factory.mktemp("pipe")
    save_tiny_wan_vae(root / "vae")                               # 4 channels, 4x space, 4x time
    save_tiny_umt5(root / "text_encoder")                         # width 32, with its tokenizer
    WanTransformer3DModel(**{**TINY_WAN, "text_dim": 32}).save_pretrained(root / "transformer")
    return root


def _run(module, *args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_preset_builds_from_a_pipeline_folder_and_generates(pipeline, tmp_path):
    from pfp.memory import config_from_arg
    cfg = config_from_arg("wan22-ti2v-5b-480p", str(pipeline))
    assert (cfg.video_size, cfg.fps, cfg.chunk_frames, cfg.rate) == ((480, 832), 24.0, 24, "4x4x2")
    assert cfg.dit["dtype"] == "bf16" and cfg.text["kind"] == "umt5" and cfg.vae["kind"] == "wan"
    r = _run("pfp.generate", "--config", "wan22-ti2v-5b-480p", "--model-dir", str(pipeline), "--size", "64x64",
             "--seconds", "1", "--steps", "1", "--out", "v.mp4", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v.mp4").is_file()


@pytest.mark.parametrize("module", ["pfp.generate", "pfp.train"])
def test_preset_bad_input_is_one_line(pipeline, tmp_path, module):
    head = ["pretrain", "--out", str(tmp_path / "run")] if module == "pfp.train" else ["--out", "v.mp4"]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "transformer").symlink_to(pipeline / "transformer")
    for args, expect in (
            (["--config", "wan22-ti2v-5b-480p"], "is a preset: it needs --model-dir DIR"),
            (["--config", "wan22-ti2v-5b-480p", "--model-dir", str(tmp_path / "none")], "no such folder"),
            (["--config", "wan22-ti2v-5b-480p", "--model-dir", str(tmp_path / "half")], "config vae.path"),
            (["--model-dir", str(pipeline)], "--model-dir goes with"),
            (["--config", "wan22-ti2v-5b-480p", "--model-dir", str(pipeline), "--rate", "2x2x9"],
             "--rate 2x2x9: rate t must be a power of two")):
        r = _run(module, *head, *args, cwd=tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert expect in lines[0], (args, lines[0])
    assert not (tmp_path / "v.mp4").exists() and not (tmp_path / "run").exists()


def test_generate_plan_of_a_preset_needs_no_folder(tmp_path):
    r = _run("pfp.generate", "--config", "wan22-ti2v-5b-480p", "--vram", "12GiB", "--plan", "--seconds", "21",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1134 context tokens" in r.stdout and "choices: weights=fp8" in r.stdout and "| decode |" in r.stdout
