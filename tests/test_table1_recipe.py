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


def recipe_script(name):
    """One of the recipe's scripts, imported from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_the_warm_start_fits_only_the_hr_branch_and_refuses_other_kinds(tmp_path):
    import torch

    from pfp.weights import read_weights
    from _tiny_pfp import write_video_folder
    warm, make_init = recipe_script("warm_start"), recipe_script("make_init")
    init = str(tmp_path / "init.safetensors")
    assert make_init.main(["--out", init, "--depth", "1"]) == 0
    write_video_folder(tmp_path / "videos", good=1, corrupt=0, short=0)
    config = tmp_path / "without_lr.json"   # the recipe's without_lr config, one block as the init
    cfg = json.load(open(os.path.join(HERE, "configs", "without_lr_4x4x2.json")))
    cfg["dit"]["depth"] = 1
    config.write_text(json.dumps(cfg))
    out = str(tmp_path / "warm.safetensors")
    args = ["--init", init, "--data", str(tmp_path / "videos"), "--steps", "2", "--batch-size", "2", "--out", out,
            "--threads", "1"]
    assert warm.main(["--config", str(config), *args]) == 0
    got, got_cfg = read_weights(out)
    start, _ = read_weights(init)
    assert got_cfg.compressor_kind == "without_lr"
    from pfp.config import PFPConfig
    from pfp.model import build_model
    torch.manual_seed(0)      # the script's seed: the compressor it started from
    fresh = build_model(PFPConfig.load(str(config))).trainable_state_dict()
    hr = [k for k in got if k.startswith("compressor.")]
    assert hr and all(not torch.equal(got[k], fresh[k]) for k in hr if k.endswith(".weight"))   # fitted
    assert all(torch.equal(got[k], start[k].float()) for k in got if not k.startswith("compressor."))  # the rest: --init
    cfg["compressor_kind"] = "pfp"
    config.write_text(json.dumps(cfg))
    assert warm.main(["--config", str(config), *args]) == 2          # it has the low-res tokens already
    assert not os.path.exists(out + ".tmp")


def test_take_compressor_joins_a_pretrained_compressor_to_the_base_backbone(tmp_path, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pfp.weights import DEFAULT_WEIGHTS, read_weights
    take = recipe_script("take_compressor")
    with safe_open(DEFAULT_WEIGHTS, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    # a stand-in for a pretraining run at another rate: every tensor changed, the config's rate too
    config = json.loads(meta["config"])
    config["rate"] = "2x2x2"
    pretrained = str(tmp_path / "pre.safetensors")
    save_file({k: v + 1 for k, v in tensors.items()}, pretrained, metadata={**meta, "config": json.dumps(config)})
    out = str(tmp_path / "joined.safetensors")
    assert take.main(["--base", DEFAULT_WEIGHTS, "--compressor", pretrained, "--out", out]) == 0
    joined, joined_cfg = read_weights(out)
    assert joined_cfg.rate == "2x2x2"
    assert {k for k in joined if k.startswith("compressor.")} == {k for k in tensors if k.startswith("compressor.")}
    for k, v in joined.items():
        assert torch.equal(v, tensors[k] + 1 if k.startswith("compressor.") else tensors[k]), k
    # a bf16 base (a --export-dtype bf16 file) gets the compressor in bf16 too
    bf16_base = str(tmp_path / "base_bf16.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, bf16_base, metadata=meta)
    assert take.main(["--base", bf16_base, "--compressor", pretrained, "--out", out]) == 0
    assert {v.dtype for v in read_weights(out)[0].values()} == {torch.bfloat16}
    # another model's backbone is refused in one line, exit 2, and nothing is written
    other = str(tmp_path / "other.safetensors")   # one block fewer
    save_file({k: v for k, v in tensors.items() if not k.startswith("backbone.blocks.7.")}, other, metadata=meta)
    capsys.readouterr()
    refused = str(tmp_path / "refused.safetensors")
    with pytest.raises(SystemExit) as exc:
        take.main(["--base", other, "--compressor", pretrained, "--out", refused])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: --base and --compressor hold different backbones")
    assert "\n" not in err and not os.path.exists(refused) and not os.path.exists(refused + ".tmp")


def test_take_compressor_carries_every_compressor_of_a_mixed_config_and_its_record(tmp_path):
    # a config with mix_compressors keeps them under mix.N.*: all of them come from --compressor,
    # and the file's record of its compressors (pfp.weights) is --compressor's, so it loads
    import dataclasses

    import torch

    from pfp.weights import build_model, load_weights, read_weights, save_weights
    from _tiny_pfp import tiny_config
    take = recipe_script("take_compressor")
    mix = [{"rate": "2x2x4"}, {"rate": "4x4x2", "kind": "without_lr", "hidden": [8, 8]}]
    torch.manual_seed(0)
    base = build_model(dataclasses.replace(tiny_config(), mix_compressors=mix))
    torch.manual_seed(1)
    pre = build_model(dataclasses.replace(tiny_config(), mix_compressors=mix))
    base_path, pre_path, out = (str(tmp_path / f"{n}.safetensors") for n in ("base", "pre", "out"))
    save_weights(base, base_path)
    save_weights(pre, pre_path)
    assert take.main(["--base", base_path, "--compressor", pre_path, "--out", out]) == 0
    joined, _ = read_weights(out)
    theirs, ours = pre.trainable_state_dict(), base.trainable_state_dict()
    assert any(k.startswith("mix.1.") for k in joined)
    for k, v in joined.items():
        want = theirs[k] if k.startswith(("compressor.", "mix.")) else ours[k]
        assert torch.equal(v, want), k
    assert load_weights(out).config.mix_compressors == mix
