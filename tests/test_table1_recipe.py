"""The Table 1 checkpoints shipped in recipes/table1/checkpoints are what their names and the
recipe's configs say, and score on a folder of videos through the documented command."""
import json
import os
import subprocess
import sys

import pytest

from pfp.config import PFPConfig
from pfp.generate import load_model

HERE = os.path.join(os.path.dirname(__file__), "..", "recipes", "table1")
NAMES = ["large_patchify_4x4x2", "only_lr_4x4x2", "without_lr_4x4x2", "pfp_4x4x2", "pfp_2x2x4", "pfp_2x2x2",
         "pfp_2x2x1"]


def _path(name):
    return os.path.join(HERE, "checkpoints", f"{name}.safetensors")


# an sdist leaves the trained checkpoints out (MANIFEST.in); a checkout has them
pytestmark = pytest.mark.skipif(not os.path.isfile(_path(NAMES[0])),
                                reason="recipes/table1/checkpoints is not here (an sdist leaves it out)")


@pytest.mark.parametrize("name", NAMES)
def test_each_checkpoint_is_its_variant_with_the_recipe_config(name):
    model = load_model(_path(name), flag="--checkpoints")
    kind, rate = name.rsplit("_", 1)
    assert (model.config.compressor_kind, model.config.rate) == (kind, rate)
    assert model.config == PFPConfig.load(os.path.join(HERE, "configs", f"{name}.json"))


def test_the_documented_command_prints_one_object_per_checkpoint(tmp_path):
    from _tiny_pfp import write_video_folder
    videos = tmp_path / "videos"
    write_video_folder(videos, good=1, corrupt=0, short=0)   # 2 s of noise at 32x32: any folder works
    (videos / "v0.json").unlink()                            # storyboards are optional
    cmd = [sys.executable, "-m", "pfp.eval", "retrieval", "--checkpoints", _path("pfp_4x4x2"), _path("only_lr_4x4x2"),
           "--videos", str(videos), "--json", "--steps", "2", "--frames", "1", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["variant"], r["rate"], r["context_tokens"]) for r in rows] == [("pfp", "4x4x2", 32), ("only_lr", "4x4x2", 32)]
    assert all(set(r) >= {"variant", "rate", "context_tokens", "psnr", "ssim"} for r in rows)
