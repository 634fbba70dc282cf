"""The training CLI with a config that names a local Wan VAE and a local UMT5 text encoder."""
import json
import os

import pytest
from safetensors.torch import load_file

from pfp.train.__main__ import main
from pfp.train.checkpoint import latest_checkpoint
from pfp.weights import PFPConfig, load_weights

from _tiny_pfp import save_tiny_umt5, save_tiny_wan_vae, wan_config, write_config


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops run faster on one thread


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    save_tiny_wan_vae(root / "vae")
    save_tiny_umt5(root / "umt5")
    (root / "empty").mkdir()
    return root


COMMON = ["--steps", "1", "--batch-size", "1", "--clip-seconds", "2", "--workers", "0", "--no-progress",
          "--threads", "1", "--save-every", "1"]


def test_cli_pretrain_and_finetune_with_wan_vae_and_umt5(parts, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.json", wan_config(parts / "vae", parts / "umt5"))
    pre = tmp_path / "pre.safetensors"
    assert main(["pretrain", "--config", cfg, "--out", str(tmp_path / "pre"), "--export", str(pre), *COMMON]) == 0
    assert "done: step 1" in capsys.readouterr().out
    saved = load_file(os.path.join(latest_checkpoint(tmp_path / "pre"), "model.safetensors"))
    # the VAE and UMT5 come from their paths: neither checkpoints nor exports carry them
    assert not any(k.startswith(("_vae.", "text_encoder.")) for k in saved)
    assert any(k.startswith("backbone.") for k in saved) and any(k.startswith("compressor.") for k in saved)
    model = load_weights(str(pre))
    assert type(model.vae).__name__ == "WanVAE" and type(model.text_encoder).__name__ == "UMT5TextEncoder"
    assert model.backbone.config.text_dim == 32 and model.backbone.latent_channels == 4
    assert main(["finetune", "--config", cfg, "--init", str(pre), "--lora-rank", "2", "--out", str(tmp_path / "ft"),
                 *COMMON]) == 0
    rows = (tmp_path / "ft" / "loss.csv").read_text().splitlines()
    assert len(rows) == 2 and float(rows[1].split(",")[1]) > 0


def test_frozen_parts_stay_frozen_and_in_eval_mode(parts):
    from pfp.train.loop import TrainArgs, _set_trainable
    from pfp.weights import build_model
    model = build_model(wan_config(parts / "vae", parts / "umt5"))
    _set_trainable(model, TrainArgs(mode="pretrain"), lora=False)
    model.train()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not model.text_encoder.training and not model.vae.training and model.backbone.training
    assert model.frozen_prefixes() == ("_vae.", "text_encoder.")


@pytest.mark.parametrize("edit,expect", [
    (lambda c, p: c["vae"].update(kind="sd"), "config vae.kind 'sd' is not valid; choose one of: patch, wan"),
    (lambda c, p: c["text"].update(kind="t5"), "config text.kind 't5' is not valid; choose one of: tiny, umt5"),
    (lambda c, p: c["vae"].update(path=str(p / "nope")), "config vae.path"),
    (lambda c, p: c["vae"].update(path=str(p / "empty")), "has no config.json (nor vae/config.json)"),
    (lambda c, p: c["vae"].update(path=str(p / "umt5")), "holds a 'umt5' model"),
    (lambda c, p: c["text"].update(path=str(p / "nope")), "config text.path"),
    (lambda c, p: c["vae"].pop("path"), "config vae of kind 'wan' needs 'path'"),
    (lambda c, p: c["text"].update(size=3), "config text of kind 'umt5': unknown key(s) ['size']"),
    (lambda c, p: c["vae"].update(dtype="f8"), "config vae.dtype 'f8' is not valid; choose one of: bf16, fp16, fp32"),
])
def test_bad_components_exit_with_one_line_naming_the_field(parts, tmp_path, capsys, edit, expect):
    d = wan_config(parts / "vae", parts / "umt5").to_dict()
    edit(d, parts)
    (tmp_path / "cfg.json").write_text(json.dumps(d))
    rc = main(["pretrain", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "r"), *COMMON])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expect in err[0], err[0]
    with pytest.raises(ValueError, match="config"):
        PFPConfig.from_dict(d).check()
