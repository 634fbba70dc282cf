"""python -m pfp.eval retrieval: the paper's Table 1 on a folder of videos, for any checkpoints."""
import dataclasses
import json
import math
import os
import statistics

import torch

from pfp.eval import main
from pfp.weights import build_model, save_weights

from _tiny_pfp import tiny_config, write_video_folder


def _weights(tmp_path, kind):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config(), compressor_kind=kind))
    with torch.no_grad():  # not the zero-initialised output of an untrained model: frames that differ
        model.backbone.proj_out.weight.normal_(0, 0.05)
    path = str(tmp_path / f"{kind}.safetensors")
    save_weights(model, path)
    return path


def test_retrieval_prints_one_row_per_checkpoint(tmp_path, capsys):
    videos = tmp_path / "videos"
    write_video_folder(videos, good=2, corrupt=1, short=0)
    ckpts = [_weights(tmp_path, "pfp"), _weights(tmp_path, "only_lr")]
    out = tmp_path / "table.md"
    assert main(["retrieval", "--checkpoints", *ckpts, "--videos", str(videos), "--steps", "2", "--frames", "2",
                 "--clips-per-video", "2", "--quiet", "--json", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["variant"] for r in rows] == ["pfp", "only_lr"] and [r["checkpoint"] for r in rows] == ckpts
    for r in rows:
        assert r["rate"] == "2x2x2" and r["videos"] == 2 and r["clips"] == 4 and r["frames_per_video"] == 2
        assert r["context_tokens"] == 2 * 4 * 4        # 4 chunks of 1 latent frame at 2x2x2, 32x32 px
        assert math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1 and r["lpips"] is None
        per = r["psnr_per_clip"]
        assert len(per) == 4 and abs(sum(per) / 4 - r["psnr"]) < 1e-9 and len(set(per)) == 4
        assert r["psnr_sem"] > 0 and abs(r["psnr_sem"] - statistics.stdev(per) / 2) < 1e-9
    assert "skipped 1 of 3 videos" in captured.err      # the corrupt one, listed once
    table = out.read_text()
    assert table.count("| 2x2x2 |") == 2 and "LPIPS: not computed" in table


def test_threads_reach_torch(tmp_path, capsys, monkeypatch):
    videos = tmp_path / "videos"
    write_video_folder(videos, good=1, corrupt=0, short=0)
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)   # the test process keeps its own
    assert main(["retrieval", "--checkpoints", _weights(tmp_path, "pfp"), "--videos", str(videos), "--steps", "1",
                 "--frames", "1", "--quiet", "--json", "--threads", "1"]) == 0
    assert asked == [1]


def _relabelled(tmp_path, path, **changes):
    """A copy of a weights file whose config metadata was edited afterwards (its tensors untouched):
    e.g. pfp weights labelled without_lr, which have the very same tensor names and shapes."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    out = str(tmp_path / ("relabelled_" + "_".join(f"{v}" for v in changes.values()) + ".safetensors"))
    save_file(tensors, out, meta)
    return out


def test_a_checkpoint_whose_variant_does_not_match_its_config_is_refused(tmp_path):
    # the tensors of pfp and without_lr, or of two rates, fit each other's models: only the
    # compressors recorded when the file was written tell them apart
    import pytest

    from pfp.weights import load_weights
    ckpt = _weights(tmp_path, "pfp")
    assert load_weights(ckpt).config.compressor_kind == "pfp"
    for changes in ({"compressor_kind": "without_lr"}, {"rate": "4x4x2"}):
        with pytest.raises(ValueError, match="saved from compressors pfp 2x2x2, lr_phase start but its config"):
            load_weights(_relabelled(tmp_path, ckpt, **changes))
    # a config passed beside the file (pfp.generate --config CFG --checkpoint W) is compared too
    with pytest.raises(ValueError, match="holds compressors for pfp 2x2x2.*asks for without_lr 2x2x2"):
        load_weights(ckpt, config=dataclasses.replace(tiny_config(), compressor_kind="without_lr"))


def test_checkpoints_whose_clips_leave_out_other_videos_are_reported(tmp_path, capsys):
    # a checkpoint with longer chunks needs longer videos: the ones it cannot use are named for it,
    # not dropped from its rows unseen
    from pfp.data.video_folder import write_video
    videos = tmp_path / "videos"
    videos.mkdir()
    g = torch.Generator().manual_seed(0)
    write_video(videos / "short.mp4", torch.rand(3, 17, 32, 32, generator=g) * 2 - 1, 8.0)   # 2.1 s
    write_video(videos / "long.mp4", torch.rand(3, 40, 32, 32, generator=g) * 2 - 1, 8.0)    # 5 s
    short = _weights(tmp_path, "pfp")
    torch.manual_seed(0)
    long = str(tmp_path / "long_chunks.safetensors")
    save_weights(build_model(dataclasses.replace(tiny_config(), chunk_frames=8)), long)
    assert main(["retrieval", "--checkpoints", short, long, long, "--videos", str(videos), "--steps", "1",
                 "--frames", "1", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["videos"] for r in rows] == [2, 1, 1]
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"videos for {long} (clips of 4 chunks, 32 frames") for line in err)
    assert all("short.mp4 (too short" in line and "scored on 1 videos, the first checkpoint on 2" in line
               for line in err)     # the second checkpoint of that clip length too, from the same scan


def test_retrieval_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    write_video_folder(empty, good=0, corrupt=2, short=0)
    ckpt = _weights(tmp_path, "pfp")
    cases = [([], "give a command"),
             (["retrieval", "--checkpoints", ckpt, "--videos", str(empty)], f"--videos {empty}: no usable video ("),
             (["retrieval", "--checkpoints", _relabelled(tmp_path, ckpt, compressor_kind="without_lr"),
               "--videos", str(empty)], "--checkpoints: checkpoint"),
             (["consistency", "--checkpoints", _relabelled(tmp_path, ckpt, rate="4x4x2"), "--videos", str(empty)],
              "saved from compressors pfp 2x2x2"),
             (["retrieval", "--checkpoints", _relabelled(tmp_path, ckpt, compressor_kind="only_lr"),
               "--videos", str(empty)], "--checkpoints: checkpoint"),
             (["retrieval", "--checkpoints", str(tmp_path / "missing.safetensors"), "--videos", str(empty)],
              "--checkpoints"),
             (["retrieval", "--checkpoints", ckpt, "--videos", str(tmp_path / "nowhere")], "--videos"),
             (["retrieval", "--checkpoints", ckpt, "--videos", str(empty), "--frames", "0"], "--frames"),
             (["retrieval", "--checkpoints", ckpt, "--videos", str(empty), "--clips-per-video", "0"],
              "--clips-per-video"),
             (["retrieval", "--checkpoints", ckpt, "--videos", str(empty), "--out", "t.txt"], "--out"),
             (["retrieval", "--checkpoints", ckpt, "--videos", str(empty), "--threads", "0"], "--threads"),
             (["consistency", "--checkpoints", ckpt, "--videos", str(empty), "--threads", "0"], "--threads")]
    for argv, named in cases:
        assert main(argv + (["--quiet"] if argv else [])) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err, (argv, err)
    assert not os.path.exists("t.txt")


def test_consistency_scores_returns_in_the_generated_part(tmp_path, capsys):
    # a storyboard whose shots come back (red, blue, red, blue over 2 s): with 0.5 s of real
    # history, both returns fall in the generated part and are scored
    videos = tmp_path / "videos"
    write_video_folder(videos, good=2, corrupt=0, short=1)
    story = [{"start": 0, "end": 0.5, "prompt": "red"}, {"start": 0.5, "end": 1.0, "prompt": "blue"},
             {"start": 1.0, "end": 1.5, "prompt": "red"}, {"start": 1.5, "end": 2.0, "prompt": "blue"}]
    for name in ("v0.json", "v1.json"):
        (videos / name).write_text(json.dumps(story))
    ckpts = [_weights(tmp_path, "pfp"), _weights(tmp_path, "without_lr")]
    assert main(["consistency", "--checkpoints", *ckpts, "--videos", str(videos), "--steps", "2",
                 "--history-seconds", "0.5", "--seconds", "2", "--quiet", "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["variant"] for r in rows] == ["pfp", "without_lr"]
    for r in rows:
        assert r["videos_scored"] == 2 and r["returns"] == 4 and math.isfinite(r["consistency_psnr"])
        scored = [x for x in r["consistency_per_video"] if x is not None]
        assert len(scored) == 2 and abs(sum(scored) / 2 - r["consistency_psnr"]) < 1e-9
    assert "skipped 1 of 3 videos" in captured.err
    assert all(r["memory"] for r in rows)
    # --no-memory: the caption-only reference, same videos and returns, another score
    assert main(["consistency", "--checkpoints", ckpts[0], "--videos", str(videos), "--steps", "2",
                 "--history-seconds", "0.5", "--seconds", "2", "--quiet", "--json", "--no-memory"]) == 0
    blind = json.loads(capsys.readouterr().out.splitlines()[0])
    assert blind["memory"] is False and blind["returns"] == rows[0]["returns"]
    assert blind["consistency_per_video"] != rows[0]["consistency_per_video"]
    # no room to generate: refused in one line
    assert main(["consistency", "--checkpoints", ckpts[0], "--videos", str(videos), "--history-seconds", "2",
                 "--seconds", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --history-seconds must leave") and "\n" not in err


def test_retrieval_reports_lpips_when_a_metric_is_there(tmp_path, capsys, monkeypatch):
    # without the lpips package (or its weights) the note says what is missing; with a metric the
    # rows carry its mean over the retrieved frames (a stand-in distance here: no weights offline)
    import pfp.eval as ev
    fn, note = ev.lpips_metric()
    if fn is None:
        assert note.startswith("not computed: ") and ("lpips" in note or "weights" in note)
    calls = []

    def mean_abs(a, b):
        assert a.shape == b.shape and a.dim() == 4 and a.shape[1] == 3   # [frames, 3, H, W]
        calls.append(a.shape[0])
        return (a - b).abs().mean(dim=(1, 2, 3))
    monkeypatch.setattr(ev, "lpips_metric", lambda: (mean_abs, None))
    videos = tmp_path / "videos"
    write_video_folder(videos, good=1, corrupt=0, short=0)
    out = tmp_path / "table.md"
    assert main(["retrieval", "--checkpoints", _weights(tmp_path, "pfp"), "--videos", str(videos), "--steps", "2",
                 "--frames", "2", "--quiet", "--json", "--out", str(out)]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert calls == [2] and row["lpips_note"] is None and 0 < row["lpips"] < 2
    assert f"| {row['lpips']:.3f} |" in out.read_text() and "not computed" not in out.read_text()
