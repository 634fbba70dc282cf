import bisect
import json
import os
import re

import pytest
import torch
from torch.utils.data import DataLoader

from pfp.data import (MixedVideos, SyntheticMultiShotVideos, VideoFolderDataset, VideoSpec, collate, lr_frame_indices,
                      resize_center_crop, to_low_res, to_low_res_part, write_video)
from pfp.data.synthetic import scene_returns
from pfp.data.video_folder import read_clip
from pfp.text import Storyboard, StoryboardError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops run faster on one thread


av = pytest.importorskip("av", reason="PyAV is needed for the video folder tests")

SPEC = VideoSpec(hr_size=(32, 48), hr_fps=8, hr_frames=65, lr_size=(8, 12), lr_fps=4)


# ---------------------------------------------------------------------------------------------
# VideoSpec and resampling
# ---------------------------------------------------------------------------------------------

def test_video_spec_defaults_and_coerce():
    assert SPEC.lr_frames == 33 and SPEC.seconds == 65 / 8
    assert VideoSpec.coerce(dict(hr_size=(32, 48), hr_fps=8, hr_frames=65, lr_size=(8, 12), lr_fps=4)) == SPEC

    class Feed:  # e.g. what a what-to-feed helper returns
        hr_size, hr_fps, hr_frames, lr_size, lr_fps, lr_frames = (32, 48), 8, 65, (8, 12), 4, 30
    assert VideoSpec.coerce(Feed()).lr_frames == 30

    class Plan:  # the shape of pfp.rates.InputPlan: video sizes are (width, height)
        hr_video_size, hr_fps, hr_frames, lr_video_size, lr_fps, lr_frames = (48, 32), 8, 65, (12, 8), 4, 33
    assert VideoSpec.coerce(Plan()) == SPEC
    assert VideoSpec(hr_size=16, hr_fps=24, hr_frames=1).hr_size == (16, 16)
    # 24 -> 10 fps: 1 + floor(48 * 10 / 24) = 21 low-res frames fit in 49 high-res ones
    assert VideoSpec(hr_size=8, hr_fps=24, hr_frames=49, lr_size=4, lr_fps=10).lr_frames == 21


@pytest.mark.parametrize("kwargs,match", [
    (dict(hr_size=(32, 0), hr_fps=8, hr_frames=5), r"hr_size\[1\] \(width\)"),
    (dict(hr_size=(32, 32, 3), hr_fps=8, hr_frames=5), r"hr_size must be \(height, width\)"),
    (dict(hr_size=32, hr_fps=0, hr_frames=5), "hr_fps must be a positive"),
    (dict(hr_size=32, hr_fps=8, hr_frames=0), "hr_frames must be an int >= 1"),
    (dict(hr_size=32, hr_fps=8, hr_frames=5, lr_size=8), "lr_fps is required"),
    (dict(hr_size=32, hr_fps=8, hr_frames=5, lr_fps=4), "without lr_size"),
    (dict(hr_size=32, hr_fps=8, hr_frames=5, lr_size=8, lr_fps=16), r"lr_fps \(16.0\) must not exceed hr_fps"),
    (dict(hr_size=32, hr_fps=8, hr_frames=5, lr_size=8, lr_fps=4, lr_frames=4), "holds at most 3"),
])
def test_video_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoSpec(**kwargs)


def test_video_spec_coerce_errors():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['fps'\]"):
        VideoSpec.coerce(dict(hr_size=8, hr_fps=8, hr_frames=1, fps=3))
    with pytest.raises(ValueError, match="spec must be a VideoSpec"):
        VideoSpec.coerce((8, 8, 1))


def test_lr_frame_indices_and_to_low_res():
    assert lr_frame_indices(SPEC).tolist() == list(range(0, 65, 2))
    spec = VideoSpec(hr_size=8, hr_fps=24, hr_frames=49, lr_size=4, lr_fps=10)
    # low-res frame j at j/10 s shows the last high-res frame at or before it: floor(2.4 j)
    assert lr_frame_indices(spec).tolist() == [int(2.4 * j + 1e-9) for j in range(21)]
    hr = torch.arange(49, dtype=torch.float32).view(1, 49, 1, 1).expand(3, 49, 8, 8)
    lr = to_low_res(hr, spec)
    assert lr.shape == (3, 21, 4, 4)
    want = torch.tensor([float(int(2.4 * j + 1e-9)) for j in range(21)]).view(21, 1, 1).expand(21, 4, 4)
    torch.testing.assert_close(lr[0], want)  # (the antialiased resize of a constant rounds by ~1 ulp)
    with pytest.raises(ValueError, match=r"expected \[..., 3, 49, H, W\]"):
        to_low_res(hr[:, :10], spec)
    with pytest.raises(ValueError, match="no low-res branch"):
        lr_frame_indices(VideoSpec(hr_size=8, hr_fps=8, hr_frames=3))


@pytest.mark.parametrize("hr_fps,lr_fps,frames,want", [
    (8, 4, 16, [1, 3, 5, 7, 9, 11, 13, 15]),          # the last frame of each pair
    (8, 4, 15, [1, 3, 5, 7, 9, 11, 13]),              # frame 14 has no partner yet: no low-res frame
    (24, 10, 12, [2, 4, 7, 9, 11]),                   # [0, 2.4) -> 2, [2.4, 4.8) -> 4, ...
    (8, 8, 5, [0, 1, 2, 3, 4]),                       # same rate: both phases take every frame
])
def test_lr_phase_end_takes_the_last_frame_of_each_interval(hr_fps, lr_fps, frames, want):
    spec = VideoSpec(hr_size=8, hr_fps=hr_fps, hr_frames=frames, lr_size=4, lr_fps=lr_fps, lr_phase="end")
    assert spec.lr_frames == len(want)
    assert lr_frame_indices(spec).tolist() == want
    hr = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1).expand(3, frames, 8, 8)
    torch.testing.assert_close(to_low_res(hr, spec)[0, :, 0, 0], torch.tensor(want, dtype=torch.float32))
    # generation feeds the low-res branch part by part: the parts must add up to the whole clip's
    for cut in range(frames + 1):
        parts = [to_low_res_part(hr[:, :cut], spec, 0), to_low_res_part(hr[:, cut:], spec, cut)]
        torch.testing.assert_close(torch.cat(parts, dim=1), to_low_res(hr, spec), rtol=0, atol=0)


def test_lr_phase_errors():
    with pytest.raises(ValueError, match="lr_phase 'middle' is not valid; choose one of: start, end"):
        VideoSpec(hr_size=8, hr_fps=8, hr_frames=4, lr_size=4, lr_fps=4, lr_phase="middle")
    with pytest.raises(ValueError, match="use at least 3 frames"):
        VideoSpec(hr_size=8, hr_fps=24, hr_frames=2, lr_size=4, lr_fps=10, lr_phase="end")
    with pytest.raises(ValueError, match="lr_frames=9 .* holds at most 8"):
        VideoSpec(hr_size=8, hr_fps=8, hr_frames=17, lr_size=4, lr_fps=4, lr_frames=9, lr_phase="end")


def test_resize_center_crop():
    # a 2x4 (HxW) frame of column indices, to 2x2: cover scale 1, crop the middle two columns
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(3, 2, 2, 4)
    y = resize_center_crop(x, (2, 2))
    assert y.shape == (3, 2, 2, 2) and torch.equal(y[0, 0, 0], torch.tensor([1.0, 2.0]))
    # downscale 8x8 -> 4x4 by 2: antialiased bilinear of a constant stays constant, of a checker averages
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2
    z = resize_center_crop(checker.float().view(1, 1, 8, 8).expand(3, 1, 8, 8), (4, 4))
    torch.testing.assert_close(z, torch.full_like(z, 0.5), atol=0.02, rtol=0)  # edges renormalise the filter
    # leading batch dims and identity size
    v = torch.rand(2, 3, 5, 6, 10)
    assert torch.equal(resize_center_crop(v, (6, 10)), v)
    assert resize_center_crop(v, (3, 3)).shape == (2, 3, 5, 3, 3)


# ---------------------------------------------------------------------------------------------
# Synthetic multi-shot videos
# ---------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_by_seed():
    a = SyntheticMultiShotVideos(3, SPEC, seed=7)[2]
    b = SyntheticMultiShotVideos(3, SPEC, seed=7)[2]
    c = SyntheticMultiShotVideos(3, SPEC, seed=8)[2]
    assert a["hr"].numpy().tobytes() == b["hr"].numpy().tobytes()
    assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["scene_ids"], b["scene_ids"])
    assert a["storyboard"] == b["storyboard"]
    assert not torch.equal(a["hr"], c["hr"])
    # items of one dataset differ from each other
    assert not torch.equal(a["hr"], SyntheticMultiShotVideos(3, SPEC, seed=7)[1]["hr"])


def test_synthetic_item_layout_and_captions():
    ds = SyntheticMultiShotVideos(4, SPEC, seed=0)
    for i in range(len(ds)):
        it = ds[i]
        hr, lr = it["hr"], it["lr"]
        assert hr.shape == (3, 65, 32, 48) and hr.dtype == torch.float32
        assert hr.min() >= -1 and hr.max() <= 1 and hr.std() > 0.1
        assert torch.equal(lr, to_low_res(hr, SPEC)) and lr.shape == (3, 33, 8, 12)
        assert it["hr_fps"] == 8 and it["lr_fps"] == 4
        plan = ds.plan(i)
        sb = it["storyboard"]
        assert isinstance(sb, Storyboard) and abs(sb.duration - SPEC.seconds) < 1e-9
        for f in range(hr.shape[1]):
            scene = plan.scenes[int(it["scene_ids"][f])]
            assert sb.prompt_at(f / 8) == scene.caption
        for scene in plan.scenes:
            for sp in scene.sprites:
                assert f"{sp.colour} {sp.shape}" in scene.caption
            assert f"{scene.colour} " in scene.caption and scene.caption.endswith("background")
        # consecutive shots show different scenes: every shot boundary is a cut
        ids = it["scene_ids"].unique_consecutive()
        assert ids.numel() == it["shot_ids"].max() + 1 and (ids[1:] != ids[:-1]).all()


def test_synthetic_scenes_return_and_resume():
    ds = SyntheticMultiShotVideos(6, SPEC, seed=3, shot_seconds=(0.5, 1.5))
    n_returns = 0
    for i in range(len(ds)):
        it = ds[i]
        hr, ids, st = it["hr"], it["scene_ids"], it["scene_time"]
        returns = scene_returns(ids)
        assert returns, "every video with >= 3 shots has a returning scene"
        n_returns += len(returns)
        for last, back in returns:
            assert ids[last] == ids[back] and ids[back - 1] != ids[back]
            # the scene's clock resumed where it stopped
            assert abs(float(st[back] - st[last]) - 1 / 8) < 1e-9
            # so the frame coming back continues the frame left: much closer to it than to the frame
            # just before the cut (another scene)
            back_vs_last = (hr[:, back] - hr[:, last]).abs().mean()
            back_vs_cut = (hr[:, back] - hr[:, back - 1]).abs().mean()
            assert back_vs_last < 0.25 * back_vs_cut
        # sprites move: frames of one shot are not all the same
        shot0 = hr[:, : int((it["shot_ids"] == 0).sum())]
        assert (shot0[:, -1] - shot0[:, 0]).abs().max() > 0.5
    assert n_returns >= len(ds)


def test_synthetic_same_scene_time_gives_same_pixels():
    ds = SyntheticMultiShotVideos(1, VideoSpec(hr_size=32, hr_fps=8, hr_frames=3), seed=0)
    plan = ds.plan(0)
    # render the same scene at the same scene times through two different shot plans
    from pfp.data.synthetic import ShotPlan, VideoPlan
    a = ds.render(VideoPlan(plan.scenes, (ShotPlan(1, 0, 3, 0.5),)))
    b = ds.render(VideoPlan(plan.scenes, (ShotPlan(0, 0, 1, 0.0), ShotPlan(1, 1, 3, 0.5))))
    assert torch.equal(a[:, 0], b[:, 1]) and not torch.equal(a[:, 0], b[:, 0])


def test_synthetic_size_ranges_shape_the_scenes():
    """sprite_radius / pattern_period set the drawn sizes; the defaults keep the original ranges."""
    easy = SyntheticMultiShotVideos(8, SPEC, seed=3, sprite_radius=(0.2, 0.25), pattern_period=(0.4, 0.5))
    plain = SyntheticMultiShotVideos(8, SPEC, seed=3)
    for i in range(8):
        for scene in easy.plan(i).scenes:
            assert 0.4 <= scene.period <= 0.5
            assert all(0.2 <= sp.radius <= 0.25 for sp in scene.sprites)
        for scene in plain.plan(i).scenes:
            assert 0.12 <= scene.period <= 0.3
            assert all(0.08 <= sp.radius <= 0.16 for sp in scene.sprites)
        # the same random draws: colours, shapes and layout agree, only the sizes differ
        assert [s.caption for s in easy.plan(i).scenes] == [s.caption for s in plain.plan(i).scenes]


def test_synthetic_dataloader_collate():
    ds = SyntheticMultiShotVideos(3, SPEC, seed=1)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["hr"].shape == (2, 3, 65, 32, 48) and batch["lr"].shape == (2, 3, 33, 8, 12)
    assert batch["scene_ids"].shape == (2, 65) and batch["hr_fps"].tolist() == [8.0, 8.0]
    assert len(batch["storyboard"]) == 2 and isinstance(batch["storyboard"][0], Storyboard)
    assert batch["source"][1] == "synthetic:seed=1:index=1"
    nolr = SyntheticMultiShotVideos(2, VideoSpec(hr_size=16, hr_fps=4, hr_frames=5))
    b2 = collate([nolr[0], nolr[1]])
    assert b2["lr"] == [None, None] and b2["hr"].shape == (2, 3, 5, 16, 16)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_videos=0), "num_videos"),
    (dict(num_scenes=1), "num_scenes"),
    (dict(shot_seconds=(2.0, 1.0)), "shot_seconds"),
    (dict(sprites_per_scene=(0, 2)), "sprites_per_scene"),
    (dict(return_prob=1.5), "return_prob"),
    (dict(seed=1.5), "seed"),
    (dict(sprite_radius=(0.3, 0.2)), "sprite_radius"),
    (dict(sprite_radius=(0.1,)), "sprite_radius"),
    (dict(pattern_period=(0.0, 0.5)), "pattern_period"),
    (dict(pattern_period=(0.2, float("nan"))), "pattern_period"),
])
def test_synthetic_bad_args(kwargs, match):
    args = dict(num_videos=2, spec=SPEC)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SyntheticMultiShotVideos(**args)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticMultiShotVideos(2, SPEC)[2]


# ---------------------------------------------------------------------------------------------
# Video folder: real mp4/webm decode through PyAV
# ---------------------------------------------------------------------------------------------

def _write_pair(folder, name, video, fps, storyboard, ext=".mp4", crf=18):
    os.makedirs(folder, exist_ok=True)
    write_video(os.path.join(folder, name + ext), video, fps, crf=crf)
    with open(os.path.join(folder, name + ".json"), "w") as f:
        f.write(storyboard.to_json() if isinstance(storyboard, Storyboard) else json.dumps(storyboard))


def _index_video(n, h=16, w=16):
    """Frame i is uniform grey level 8*i (in [-1, 1]): decoded frames say which source frame they are."""
    levels = torch.arange(n, dtype=torch.float32) * 8 / 127.5 - 1
    return levels.view(1, n, 1, 1).expand(3, n, h, w).contiguous()


def _frame_numbers(video):
    return ((video.mean(dim=(0, 2, 3)) + 1) * 127.5 / 8).round().long().tolist()


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_video_folder_round_trip_of_synthetic_video(tmp_path, ext):
    src_spec = VideoSpec(hr_size=(32, 48), hr_fps=8, hr_frames=33)
    item = SyntheticMultiShotVideos(1, src_spec, seed=5)[0]
    _write_pair(tmp_path / "sub", "clip", item["hr"], 8, item["storyboard"], ext=ext)
    spec = dict(hr_size=(32, 48), hr_fps=8, hr_frames=33, lr_size=(8, 12), lr_fps=4)
    ds = VideoFolderDataset(tmp_path, spec)
    assert len(ds) == 1
    out = ds[0]
    assert out["source"].endswith("clip" + ext) and out["start_seconds"] == 0.0
    assert out["hr"].shape == (3, 33, 32, 48) and out["lr"].shape == (3, 17, 8, 12)
    assert torch.equal(out["lr"], to_low_res(out["hr"], VideoSpec.coerce(spec)))
    # lossy codec with 4:2:0 chroma on tiny frames full of sharp colour edges: ~0.1 mean error
    # (colour levels themselves come back within 2/255), far below the error between scenes
    err = (out["hr"] - item["hr"]).abs().mean(dim=(0, 2, 3))
    assert err.max() < 0.15
    other_scene = item["scene_ids"] != item["scene_ids"][0]
    assert other_scene.any()
    cross = (out["hr"][:, :1] - item["hr"][:, other_scene]).abs().mean(dim=(0, 2, 3))
    assert cross.min() > 2 * err[0]
    assert out["storyboard"] == item["storyboard"].window(0, 33 / 8)


def test_video_folder_temporal_sampling(tmp_path):
    _write_pair(tmp_path, "idx", _index_video(30), 10, [{"start": 0, "end": 3, "prompt": "grey"}], crf=0)
    def read(**kw):
        spec = dict(hr_size=(16, 16), **{k: v for k, v in kw.items() if k != "clip_start"})
        return _frame_numbers(VideoFolderDataset(tmp_path, spec, clip_start=kw.get("clip_start", "first"))[0]["hr"])
    assert read(hr_fps=10, hr_frames=30) == list(range(30))
    assert read(hr_fps=5, hr_frames=15) == list(range(0, 30, 2))  # half rate: every other frame
    assert read(hr_fps=20, hr_frames=6) == [0, 0, 1, 1, 2, 2]  # double rate: each frame twice
    assert read(hr_fps=4, hr_frames=5) == [0, 2, 5, 7, 10]  # frame shown at i/4 s: floor(2.5 i)
    assert read(hr_fps=10, hr_frames=10, clip_start=1.5) == list(range(15, 25))  # after a seek
    assert read(hr_fps=10, hr_frames=5, clip_start=2.5) == list(range(25, 30))  # up to the last frame
    # random starts stay inside the video and keep the frames consecutive
    torch.manual_seed(0)
    for _ in range(3):
        got = read(hr_fps=10, hr_frames=8, clip_start="random")
        assert got == list(range(got[0], got[0] + 8)) and 0 <= got[0] <= 22


def test_video_folder_resizes_and_crops(tmp_path):
    # 16x32 source whose left half is dark and right half bright, read as 8x8: cover-scale by 1/2
    # to 8x16, then the centre 8 columns: the left 4 dark, the right 4 bright
    v = torch.full((3, 3, 16, 32), -0.8)
    v[..., 16:] = 0.8
    _write_pair(tmp_path, "wide", v, 8, [{"start": 0, "end": 1, "prompt": "split"}], crf=0)
    out = VideoFolderDataset(tmp_path, dict(hr_size=8, hr_fps=8, hr_frames=3))[0]["hr"]
    assert out.shape == (3, 3, 8, 8)
    assert (out[..., :3] < -0.6).all() and (out[..., 5:] > 0.6).all()


def test_video_folder_clip_storyboard_is_retimed(tmp_path):
    board = [{"start": 0, "end": 1, "prompt": "first"}, {"start": 1, "end": 3, "prompt": "second"}]
    _write_pair(tmp_path, "v", _index_video(30), 10, board)
    out = VideoFolderDataset(tmp_path, dict(hr_size=16, hr_fps=10, hr_frames=10), clip_start=0.5)[0]
    sb = out["storyboard"]
    assert sb.prompt_at(0.0) == "first" and sb.prompt_at(0.49) == "first" and sb.prompt_at(0.5) == "second"
    assert abs(sb.duration - 1.0) < 1e-9


def test_video_folder_errors(tmp_path):
    spec = dict(hr_size=16, hr_fps=10, hr_frames=10)
    with pytest.raises(ValueError, match="no videos"):
        VideoFolderDataset(tmp_path, spec)
    with pytest.raises(ValueError, match="is not a directory"):
        VideoFolderDataset(tmp_path / "nope", spec)
    # one good video, so that a bad one beside it is skipped by default and an error with on_bad="error"
    _write_pair(tmp_path, "good", _index_video(12), 10, [{"start": 0, "end": 1, "prompt": "a"}])
    lonely = tmp_path / "lonely.mp4"

    def skipped_reason():
        ds = VideoFolderDataset(tmp_path, spec)
        assert ds.paths == [str(tmp_path / "good.mp4")] and len(ds.storyboards) == 1
        assert [path for path, _ in ds.skipped] == [str(lonely)]
        return ds.skipped[0][1]

    # a video without its storyboard: names the json it expected (this one is too short as well,
    # which is said first: a storyboard alone would not make it usable)
    write_video(lonely, _index_video(5), 10)
    assert re.match(r"too short: 0.500 s, .*; and missing storyboard .*lonely.json", skipped_reason())
    with pytest.raises(ValueError, match=r"lonely.mp4: too short: .*; and missing storyboard .*lonely.json"):
        VideoFolderDataset(tmp_path, spec, on_bad="error")
    write_video(lonely, _index_video(12), 10)   # long enough: the storyboard is all it lacks
    assert re.match(r"missing storyboard .*lonely.json", skipped_reason())
    # a malformed storyboard: names the file and the entry
    (tmp_path / "lonely.json").write_text(json.dumps([{"start": 0, "end": 1, "prompt": "a"}, {"start": 2}]))
    assert re.match(r"bad storyboard: .*lonely.json: storyboard entry 1: missing key", skipped_reason())
    with pytest.raises(ValueError, match=r"lonely.json: storyboard entry 1: missing key\(s\) 'end', 'prompt'"):
        VideoFolderDataset(tmp_path, spec, on_bad="error")
    (tmp_path / "lonely.json").write_text(json.dumps([{"start": 0, "end": 1, "prompt": "a"}]))
    write_video(lonely, _index_video(5), 10)
    # too short: 5 frames at 10 fps cannot give 10 frames at 10 fps (frame 9 is at 0.9 s, the video
    # ends at 0.5 s); found when the dataset is built, no longer when the item is read
    assert skipped_reason() == "too short: 0.500 s, a clip of 10 frames at 10 fps needs more than 0.900 s"
    with pytest.raises(ValueError, match=r"lonely.mp4: too short: 0.500 s"):
        VideoFolderDataset(tmp_path, spec, on_bad="error")
    # read_clip itself still says so, for callers that read clips directly
    with pytest.raises(RuntimeError, match=r"lonely.mp4: video too short: a clip of 10 frames at 10 fps"):
        read_clip(str(lonely), start=0, fps=10, num_frames=10, size=(16, 16))
    # a fixed clip_start counts: 12 frames at 10 fps hold a 10-frame clip from 0 s but not from 0.5 s
    with pytest.raises(ValueError, match=r"no usable video .*good.mp4: too short: 1.200 s, .* from 0.5 s "
                                         r"needs more than 1.400 s"):
        VideoFolderDataset(tmp_path, spec, clip_start=0.5)
    # unreadable: not a video at all
    lonely.write_bytes(b"this is not a video" * 10)
    assert skipped_reason().startswith("cannot open: ")
    # a fault of the video and one of its storyboard: both said, since fixing one alone would not help
    (tmp_path / "lonely.json").unlink()
    assert re.match(r"cannot open: .*; and missing storyboard .*lonely.json", skipped_reason())
    (tmp_path / "lonely.json").write_text(json.dumps([{"start": 2}]))
    assert re.match(r"cannot open: .*; and bad storyboard: .*lonely.json", skipped_reason())
    (tmp_path / "lonely.json").unlink()
    write_video(lonely, _index_video(5), 10)
    assert re.match(r"too short: 0.500 s.*; and missing storyboard .*lonely.json", skipped_reason())
    lonely.write_bytes(b"this is not a video" * 10)
    (tmp_path / "lonely.json").write_text(json.dumps([{"start": 0, "end": 1, "prompt": "a"}]))
    with pytest.raises(RuntimeError, match=r"lonely.mp4: cannot (open|decode) video"):
        read_clip(str(lonely), start=0, fps=10, num_frames=10, size=(16, 16))
    with pytest.raises(ValueError, match="clip_start"):
        VideoFolderDataset(tmp_path, spec, clip_start="middle")
    with pytest.raises(ValueError, match="clip_start"):
        VideoFolderDataset(tmp_path, spec, clip_start=-1.0)
    with pytest.raises(ValueError, match=r"on_bad must be one of 'skip', 'error', got 'ignore'"):
        VideoFolderDataset(tmp_path, spec, on_bad="ignore")
    with pytest.raises(IndexError, match="out of range"):
        VideoFolderDataset(tmp_path, spec)[1]


def _noise_video(n, h=16, w=16, seed=0):
    """Noise compresses badly, so most of the file is frame data (a corruption lands in frames)."""
    return torch.rand(3, n, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _corrupt_frame_data(path):
    """Overwrite the middle third of an mp4's frame data (its mdat box) with 0xff bytes. write_video's
    mp4s keep the index (moov) after the data, so the file still opens and its metadata is intact:
    only decoding the frames finds the damage."""
    data = bytearray(path.read_bytes())
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    assert 0 < mdat < moov, "expected the frame data before the index"
    a, b = mdat + 4 + (moov - mdat) // 3, mdat + 4 + 2 * (moov - mdat) // 3
    data[a:b] = b"\xff" * (b - a)
    path.write_bytes(bytes(data))


def _bad_video_folder(folder, good=("good_a", "good_b")):
    """Videos for a spec of 10 frames at 10 fps: the ``good`` ones (20 frames) and five bad ones,
    in sorted order: corrupt frame data, garbage second half, random bytes, one frame, too short.
    Returns {file name: the start of its skip reason}."""
    board = [{"start": 0, "end": 2, "prompt": "noise"}]
    for name in good:
        _write_pair(folder, name, _noise_video(20), 10, board)
    _write_pair(folder, "bad_corrupt_data", _noise_video(20, seed=1), 10, board)
    _corrupt_frame_data(folder / "bad_corrupt_data.mp4")
    _write_pair(folder, "bad_garbage_half", _noise_video(20, seed=2), 10, board)
    data = (folder / "bad_garbage_half.mp4").read_bytes()
    (folder / "bad_garbage_half.mp4").write_bytes(data[:len(data) // 2] + bytes(range(256)) * (len(data) // 512 + 1))
    (folder / "bad_random.mp4").write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator()
                                                          .manual_seed(3), dtype=torch.uint8).numpy().tobytes())
    (folder / "bad_random.json").write_text(json.dumps(board))
    _write_pair(folder, "bad_single_frame", _noise_video(1), 10, board)
    _write_pair(folder, "bad_too_short", _noise_video(5), 10, board)
    return {"bad_corrupt_data.mp4": "cannot decode: ", "bad_garbage_half.mp4": "cannot open: ",
            "bad_random.mp4": "cannot open: ", "bad_single_frame.mp4": "too short: a single frame",
            "bad_too_short.mp4": "too short: 0.500 s, a clip of 10 frames at 10 fps needs more than 0.900 s"}


BAD_SPEC = dict(hr_size=16, hr_fps=10, hr_frames=10)


def test_video_folder_skips_bad_videos_when_built(tmp_path, capsys):
    bad = _bad_video_folder(tmp_path)
    # the corrupt-data file passes any look at its metadata; reading its clip fails (mid-training,
    # before this check existed)
    with av.open(str(tmp_path / "bad_corrupt_data.mp4")) as container:
        assert container.streams.video[0].frames == 20
    with pytest.raises(RuntimeError, match="bad_corrupt_data.mp4: cannot decode video"):
        read_clip(str(tmp_path / "bad_corrupt_data.mp4"), start=0, fps=10, num_frames=10, size=(16, 16))

    ds = VideoFolderDataset(tmp_path, BAD_SPEC, progress=True)
    assert "checking videos" in capsys.readouterr().err  # the tqdm bar, on stderr
    assert ds.paths == [str(tmp_path / "good_a.mp4"), str(tmp_path / "good_b.mp4")]
    assert len(ds) == len(ds.storyboards) == 2
    assert [os.path.basename(path) for path, _ in ds.skipped] == sorted(bad)
    for path, reason in ds.skipped:
        assert reason.startswith(bad[os.path.basename(path)]), (path, reason)
        assert "\n" not in reason
    # how many frames come out before the error varies run to run (the decoder's frame threads):
    # 3 or 4 of the 20 seen; the reason says how many, and that some were decoded
    after = re.search(r"\(after (\d+) frames\)", dict(ds.skipped)[str(tmp_path / "bad_corrupt_data.mp4")])
    assert after is not None and 0 < int(after.group(1)) < 20
    for i in range(len(ds)):
        assert ds[i]["hr"].shape == (3, 10, 16, 16)
    report = ds.skip_report()
    assert report == ("skipped 5 of 7 videos: bad_corrupt_data.mp4 (cannot decode), bad_garbage_half.mp4 "
                      "(cannot open), bad_random.mp4 (cannot open), bad_single_frame.mp4 (too short: a single "
                      "frame), +1 more")
    # random starts come from the measured durations and always fit
    ds_random = VideoFolderDataset(tmp_path, BAD_SPEC, clip_start="random")
    for _ in range(5):
        item = ds_random[0]
        assert 0 <= item["start_seconds"] < 1.0 and item["hr"].shape == (3, 10, 16, 16)
    # nothing skipped: no report
    clean = tmp_path / "clean"
    _write_pair(clean, "only", _noise_video(20), 10, [{"start": 0, "end": 2, "prompt": "noise"}])
    ds_clean = VideoFolderDataset(clean, BAD_SPEC)
    assert ds_clean.skipped == [] and ds_clean.skip_report() is None


def test_video_folder_single_frame_is_too_short_for_any_longer_clip(tmp_path):
    _write_pair(tmp_path, "good", _noise_video(20), 10, [{"start": 0, "end": 2, "prompt": "noise"}])
    _write_pair(tmp_path, "still", _noise_video(1), 10, [{"start": 0, "end": 2, "prompt": "noise"}])
    # 2 frames at 40 fps span 0.025 s, less than the 0.1 s one 10 fps frame is shown: the time rule
    # alone would accept the still; a clip of it would be one image repeated
    ds = VideoFolderDataset(tmp_path, dict(hr_size=16, hr_fps=40, hr_frames=2))
    assert [os.path.basename(p) for p in ds.paths] == ["good.mp4"]
    assert ds.skipped == [(str(tmp_path / "still.mp4"), "too short: a single frame, a clip needs 2 frames")]
    # a one-frame clip is what a one-frame video holds
    ds_one = VideoFolderDataset(tmp_path, dict(hr_size=16, hr_fps=40, hr_frames=1))
    assert len(ds_one) == 2 and ds_one.skipped == []
    assert ds_one[1]["hr"].shape == (3, 1, 16, 16)


def test_video_folder_on_bad_error_is_one_line(tmp_path):
    _bad_video_folder(tmp_path)
    with pytest.raises(ValueError) as info:
        VideoFolderDataset(tmp_path, BAD_SPEC, on_bad="error")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"VideoFolderDataset: 5 of 7 videos under {str(tmp_path)!r} are unusable: "
                              "bad_corrupt_data.mp4: cannot decode: ")
    assert "bad_garbage_half.mp4: cannot open: " in message and "bad_random.mp4: cannot open: " in message
    assert message.endswith("; +2 more; pass on_bad='skip' to skip them")


def test_video_folder_of_only_bad_videos_fails_in_one_line(tmp_path):
    _bad_video_folder(tmp_path, good=())
    for on_bad in ("skip", "error"):
        with pytest.raises(ValueError) as info:
            VideoFolderDataset(tmp_path, BAD_SPEC, on_bad=on_bad)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"VideoFolderDataset: no usable video under {str(tmp_path)!r} (5 found, all "
                                  "unusable): bad_corrupt_data.mp4: cannot decode: ")
        assert message.endswith("; +2 more")


def test_storyboard_not_utf8_names_the_file(tmp_path):
    board = [{"start": 0, "end": 2, "prompt": "café"}]
    # é is one byte in latin-1 (0xe9), which cannot start a UTF-8 sequence followed by '"'
    (tmp_path / "latin.json").write_bytes(json.dumps(board, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(StoryboardError, match=r"latin.json: not UTF-8 text \(invalid .* at byte \d+\)$"):
        Storyboard.load(tmp_path / "latin.json")
    # and in a folder: the video is skipped with that reason, or named in the error
    _write_pair(tmp_path, "good", _noise_video(20), 10, board)
    write_video(tmp_path / "latin.mp4", _noise_video(20), 10)
    ds = VideoFolderDataset(tmp_path, BAD_SPEC)
    assert [os.path.basename(p) for p in ds.paths] == ["good.mp4"]
    (path, reason), = ds.skipped
    assert path == str(tmp_path / "latin.mp4")
    assert re.fullmatch(r"bad storyboard: .*latin.json: not UTF-8 text \(.*\)", reason)
    assert ds.skip_report() == "skipped 1 of 2 videos: latin.mp4 (bad storyboard)"
    with pytest.raises(ValueError, match=r"^VideoFolderDataset: 1 of 2 videos under .* is unusable: latin.mp4: "
                                         r"bad storyboard: .*latin.json: not UTF-8 text [^\n]*$"):
        VideoFolderDataset(tmp_path, BAD_SPEC, on_bad="error")


def test_write_video_is_atomic_and_checks_args(tmp_path, monkeypatch):
    good = _index_video(4)
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", good[..., :15], 10)
    with pytest.raises(ValueError, match="must end in one of"):
        write_video(tmp_path / "x.gif", good, 10)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        write_video(tmp_path / "x.mp4", good[0], 10)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "x.mp4", good, 0)
    # a failure half-way leaves neither the target nor a temporary file behind
    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def flaky(arr, format):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(arr, format=format)
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", staticmethod(flaky))
    with pytest.raises(OSError, match="disk full"):
        write_video(tmp_path / "half.mp4", good, 10)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    # and a good write replaces an existing file in one step
    write_video(tmp_path / "ok.mp4", good, 10)
    assert os.listdir(tmp_path) == ["ok.mp4"]


def test_video_spec_from_the_compressors_plan():
    rates = pytest.importorskip("pfp.rates", reason="pfp.rates (the compressor's what-to-feed helper) not merged here")
    plan = rates.plan_inputs((48, 32), 8, 65 / 8, "4x4x2", vae_spatial=4, vae_temporal=1, latent_channels=48)
    spec = VideoSpec.coerce(plan)
    assert spec == SPEC
    # and the low-res frames this module makes are the ones the plan describes: 0, rt, 2rt, ...
    assert lr_frame_indices(spec).tolist() == list(range(0, plan.hr_frames, plan.rate.t))


def _ramp_video(n=4, h=32, w=64):
    """Brightness rising left to right: a crop's mean level says where it was taken."""
    ramp = torch.linspace(-0.9, 0.9, w).view(1, 1, 1, w)
    return ramp.expand(3, n, h, w).contiguous()


def test_read_clip_crop_places_and_zooms(tmp_path):
    _write_pair(tmp_path, "ramp", _ramp_video(), 8, [{"start": 0, "end": 1, "prompt": "ramp"}], crf=0)
    path = str(tmp_path / "ramp.mp4")
    read = lambda crop: read_clip(path, start=0, fps=8, num_frames=2, size=(16, 16), crop=crop)  # noqa: E731
    centre, left, right = read(None), read((1.0, 0.5, 0.0)), read((1.0, 0.5, 1.0))
    assert torch.equal(centre, read((1.0, 0.5, 0.5)))
    assert left.mean() < centre.mean() - 0.3 < right.mean() - 0.6     # a 16x32 cover, 16 columns kept
    # zoom 2: a 32x64 cover, so the left edge crop spans a quarter of the ramp instead of half
    assert read((2.0, 0.5, 0.0)).mean() < left.mean() - 0.2
    for bad in ((0.5, 0.5, 0.5), (1.0, -0.1, 0.5), (1.0, 0.5, 1.5)):
        with pytest.raises(ValueError, match="crop must be"):
            read(bad)


def test_video_folder_random_crops_come_from_the_generator(tmp_path):
    _write_pair(tmp_path, "ramp", _ramp_video(n=24), 8, [{"start": 0, "end": 3, "prompt": "ramp"}], crf=0)
    spec = dict(hr_size=16, hr_fps=8, hr_frames=4)
    ds = VideoFolderDataset(tmp_path, spec, clip_start="random", crop="random", max_zoom=1.5)
    items = [ds.get(0, torch.Generator().manual_seed(s)) for s in range(6)]
    again = ds.get(0, torch.Generator().manual_seed(0))
    assert torch.equal(again["hr"], items[0]["hr"]) and again["crop"] == items[0]["crop"]
    assert again["start_seconds"] == items[0]["start_seconds"]
    assert len({it["crop"] for it in items}) == 6 and len({it["start_seconds"] for it in items}) == 6
    for it in items:
        zoom, y, x = it["crop"]
        assert 1.0 <= zoom <= 1.5 and 0.0 <= y <= 1.0 and 0.0 <= x <= 1.0
        assert it["hr"].shape == (3, 4, 16, 16)
        assert torch.equal(it["hr"], read_clip(str(tmp_path / "ramp.mp4"), start=it["start_seconds"], fps=8,
                                               num_frames=4, size=(16, 16), crop=it["crop"]))
    centre = VideoFolderDataset(tmp_path, spec)[0]
    assert centre["crop"] == (1.0, 0.5, 0.5)
    for kw, msg in ((dict(crop="middle"), "crop must be one of"), (dict(max_zoom=0.5), "max_zoom must be"),
                    (dict(storyboards="maybe"), "storyboards must be one of"),
                    (dict(default_prompt=" "), "default_prompt must be")):
        with pytest.raises(ValueError, match=msg):
            VideoFolderDataset(tmp_path, spec, **kw)


def test_video_folder_flips_mirror_half_the_clips_and_leave_other_runs_alone(tmp_path):
    _write_pair(tmp_path, "ramp", _ramp_video(n=24), 8, [{"start": 0, "end": 3, "prompt": "ramp"}], crf=0)
    spec = dict(hr_size=16, hr_fps=8, hr_frames=4)
    plain = VideoFolderDataset(tmp_path, spec, clip_start="random", crop="random")
    mirrored = VideoFolderDataset(tmp_path, spec, clip_start="random", crop="random", flip=True)
    flips = []
    for seed in range(12):
        a, b = (ds.get(0, torch.Generator().manual_seed(seed)) for ds in (plain, mirrored))
        # the flip is drawn after the window and the crop, so both are the plain run's
        assert (a["start_seconds"], a["crop"]) == (b["start_seconds"], b["crop"]) and a["flipped"] is False
        assert torch.equal(b["hr"], a["hr"].flip(-1) if b["flipped"] else a["hr"])
        flips.append(b["flipped"])
    assert 0 < sum(flips) < len(flips)
    # the ramp rises to the right; a mirrored clip falls
    flipped = next(s for s, f in enumerate(flips) if f)
    hr = mirrored.get(0, torch.Generator().manual_seed(flipped))["hr"]
    assert hr[..., 0].mean() > hr[..., -1].mean()
    with pytest.raises(ValueError, match="flip must be True or False"):
        VideoFolderDataset(tmp_path, spec, flip=1)


def _write_mpeg(path, video, fps=25):
    """An MPEG-1 program stream (.mpg), as old cameras and the Kivy examples ship."""
    import av
    import numpy as np
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    with av.open(str(path), "w", format="mpeg") as out:
        stream = out.add_stream("mpeg1video", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[3], video.shape[2], "yuv420p"
        stream.bit_rate = 4_000_000  # the grey levels come back exact
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _counter_video(n, h=32, w=32):
    """Frame i shows i in base 32 in its top half as two grey blocks (left: 8*(i % 32), right:
    8*(i // 32)), one 16-pixel macroblock each so that codecs keep the levels; the bottom half is
    noise, which makes packets as large as real video's (a seek in small packets lands exactly)."""
    i = torch.arange(n, dtype=torch.float32)
    video = torch.rand(3, n, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    video[:, :, : h // 2, : w // 2] = ((i % 32) * 8 / 127.5 - 1).view(1, n, 1, 1)
    video[:, :, : h // 2, w // 2:] = ((i // 32) * 8 / 127.5 - 1).view(1, n, 1, 1)
    return video


def _counter_numbers(video):
    h, w = video.shape[-2:]
    level = lambda block: ((block.mean(dim=(0, 2, 3)) + 1) * 127.5 / 8).round().long()  # noqa: E731
    top = video[..., : h // 2, :]
    return (level(top[..., : w // 2]) + 32 * level(top[..., w // 2:])).tolist()


def test_read_clip_from_mpeg_streams_after_a_seek(tmp_path):
    """Seeks in MPEG program streams land after the target (a seek to 1.04 s gave 1.1 s); a clip
    must still show, at each target time, the last frame of a whole decode whose timestamp is not
    after it (the muxer's timestamps are not evenly spaced, so frame numbers alone do not say)."""
    import av
    path = tmp_path / "counter.mpg"
    _write_mpeg(path, _counter_video(120), fps=25)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        base = float(stream.start_time * stream.time_base)
        decoded = [(f.time - base, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    times = [t for t, _ in decoded]
    numbers = [_counter_numbers(torch.from_numpy(a).permute(2, 0, 1)[:, None].float() / 127.5 - 1)[0]
               for _, a in decoded]
    assert numbers == list(range(120))
    for start in [0.5, 1.3, 3.7] + [0.27 * i for i in range(16)]:
        clip = read_clip(str(path), start=start, fps=8, num_frames=6, size=(32, 32))
        want = [numbers[bisect.bisect_right(times, start + k / 8 + 1e-6) - 1] for k in range(6)]
        assert _counter_numbers(clip) == want, f"start {start}"


def test_video_folder_storyboards_optional_and_mpg(tmp_path):
    _write_mpeg(tmp_path / "old.mpg", _ramp_video(n=30, h=32, w=32))
    _write_pair(tmp_path, "told", _index_video(30), 10, [{"start": 0, "end": 3, "prompt": "grey"}])
    spec = dict(hr_size=16, hr_fps=10, hr_frames=10)
    strict = VideoFolderDataset(tmp_path, spec)
    assert [os.path.basename(p) for p in strict.paths] == ["told.mp4"]
    assert strict.skipped[0][0].endswith("old.mpg") and "missing storyboard" in strict.skipped[0][1]
    loose = VideoFolderDataset(tmp_path, spec, storyboards="optional", default_prompt="a street")
    assert [os.path.basename(p) for p in loose.paths] == ["old.mpg", "told.mp4"] and not loose.skipped
    board = loose.storyboards[0]
    assert [s.prompt for s in board.shots] == ["a street"] and abs(board.duration - 1.2) < 0.05
    assert loose.storyboards[1].shots[0].prompt == "grey"
    assert loose[0]["hr"].shape == (3, 10, 16, 16)
    # clips spread over a video: first at 0, last where a clip just fits
    starts = loose.spread_starts(1, 3)
    assert starts[0] == 0.0 and abs(starts[1] - starts[2] / 2) < 1e-9 and 2.1 - 0.01 < starts[2] < 2.1
    assert _frame_numbers(loose.get(1, start=starts[2])["hr"]) == list(range(20, 30))


def test_mixed_videos_draw_synthetic_scenes_at_the_given_share(tmp_path):
    _write_pair(tmp_path, "ramp", _ramp_video(n=24), 8, [{"start": 0, "end": 3, "prompt": "ramp"}], crf=0)
    spec = VideoSpec(hr_size=(16, 16), hr_fps=8, hr_frames=4, lr_size=(4, 4), lr_fps=4)
    folder = VideoFolderDataset(tmp_path, spec, clip_start="random", crop="random")
    synthetic = SyntheticMultiShotVideos(50, spec, seed=3)
    mixed = MixedVideos(folder, synthetic, 0.5)
    assert len(mixed) == len(folder) and mixed.spec == spec
    items = [mixed.get(0, torch.Generator().manual_seed(s)) for s in range(40)]
    from_synthetic = [it["source"].startswith("synthetic:") for it in items]
    assert 8 <= sum(from_synthetic) <= 32          # binomial(40, 0.5): outside this range p < 1e-4
    for seed, it, synth in zip(range(40), items, from_synthetic):
        assert set(it) == {"hr", "lr", "storyboard", "hr_fps", "lr_fps", "source"}
        assert it["hr"].shape == (3, 4, 16, 16) and it["lr"].shape == (3, 2, 4, 4)
        again = mixed.get(0, torch.Generator().manual_seed(seed))      # a pure function of the generator
        assert again["source"] == it["source"] and torch.equal(again["hr"], it["hr"])
        if synth:
            index = int(it["source"].rsplit("=", 1)[1])
            assert torch.equal(it["hr"], synthetic[index]["hr"])
    batch = collate(items[:8])                                     # both kinds in one batch
    assert batch["hr"].shape == (8, 3, 4, 16, 16)
    assert all(not it["source"].startswith("synthetic:") for it in (MixedVideos(folder, synthetic, 0).get(
        0, torch.Generator().manual_seed(s)) for s in range(10)))
    for p in (1, 1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="p_extra must be a number in"):
            MixedVideos(folder, synthetic, p)
    other = SyntheticMultiShotVideos(5, VideoSpec(hr_size=(8, 8), hr_fps=8, hr_frames=4, lr_size=(4, 4), lr_fps=4))
    with pytest.raises(ValueError, match="clip specs differ"):
        MixedVideos(folder, other, 0.5)


@pytest.mark.parametrize("ext, container, codec", [(".avi", "avi", "mpeg4"), (".mkv", "matroska", "mpeg4"),
                                                   (".ts", "mpegts", "mpeg2video"), (".flv", "flv", "flv"),
                                                   (".wmv", "asf", "wmv2"), (".3gp", "3gp", "mpeg4")])
def test_video_folder_reads_other_containers(tmp_path, ext, container, codec):
    # any container PyAV opens, written here by PyAV itself (write_video makes mp4/mkv/mov/webm):
    # found by its extension, decoded, measured, read as a clip
    av = pytest.importorskip("av")
    import numpy as np
    path = tmp_path / f"clip{ext}"
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    ds = VideoFolderDataset(tmp_path, dict(hr_size=16, hr_fps=10, hr_frames=10), storyboards="optional")
    assert ds.paths == [str(path)] and not ds.skipped
    clip = ds[0]["hr"]
    assert clip.shape == (3, 10, 16, 16)
    means = clip.mean(dim=(0, 2, 3))
    assert bool((means[1:] > means[:-1]).all())     # the frames in order: each brighter than the last
