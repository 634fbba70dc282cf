"""Faults: kill -9 at any moment of training, every on-disk state a save can leave, non-finite values,
bad data, and bad input to every command (one ``error:`` line, exit 2, no file left behind)."""
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from pfp.train import TrainArgs, train
from pfp.train import checkpoint as ckpt
from pfp.train.checkpoint import latest_checkpoint, recover, save_checkpoint

from _tiny_pfp import tiny_config, write_config, write_video_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PFP_DEBUG", None)
    return env


def _assert_same_checkpoint(a: str, b: str) -> None:
    """Two checkpoint folders hold the same training state, bit for bit: weights, optimizer
    tensors, the torch RNG (in optimizer.safetensors), and in state.json everything but the timing
    and the flags that say where and how the run was driven."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    sa, sb = ckpt.read_state(a), ckpt.read_state(b)
    for st in (sa, sb):
        st.pop("elapsed_s")
        for key in ("resume", "overwrite", "out", "keep_checkpoints"):   # how the run was driven
            st["args"].pop(key)
    assert sa == sb


def _log_rows(run: str) -> list:
    """loss.csv without its timing columns (samples/s and elapsed time differ from run to run)."""
    with open(os.path.join(run, "loss.csv"), newline="") as f:
        return [row[:3] for row in csv.reader(f)]


# ------------------------------------------------------------------------------------------------
# kill -9 at random moments
# ------------------------------------------------------------------------------------------------
KILLS = 22


def _train_cmd(cfg: str, out: str, steps: int) -> list:
    # workers=1: the data loader's seed is drawn from the global RNG, which a resume must not shift
    return [sys.executable, "-m", "pfp.train", "pretrain", "--config", cfg, "--out", out, "--steps", str(steps),
            "--batch-size", "2", "--clip-seconds", "1", "--save-every", "1", "--log-every", "1", "--lr", "1e-3",
            "--warmup", "2", "--threads", "1", "--workers", "1", "--keep-checkpoints", "2", "--no-progress",
            "--resume"]


def _wait_then_kill(proc, out: str, mode: str, rng: random.Random) -> str:
    """Kill ``proc`` with SIGKILL at a moment picked by ``mode``; returns what the folder showed."""
    ckpts = os.path.join(out, "checkpoints")

    def temps():
        try:
            return {n for n in os.listdir(ckpts) if n.startswith((".tmp-ckpt-", ".trash-"))}
        except FileNotFoundError:
            return set()

    def log_rows():
        try:
            with open(os.path.join(out, "loss.csv")) as f:
                return f.read().count("\n")
        except FileNotFoundError:
            return 0

    deadline = time.monotonic() + 60
    if mode == "startup":           # while importing, recovering, cutting the log back, building
        time.sleep(rng.uniform(0.2, 4.0))
    elif mode == "mid-save":        # inside the n-th save of this process
        seen, wanted = temps(), rng.randint(1, 3)
        while proc.poll() is None and time.monotonic() < deadline:
            now = temps()
            if now - seen:                # a save (or a delete after it) has begun
                wanted, seen = wanted - 1, now
                if wanted == 0:
                    time.sleep(rng.uniform(0, 0.003))
                    break
            time.sleep(0.0005)
    else:                           # a few steps in, anywhere in a step or a save
        rows, wanted = log_rows(), rng.randint(1, 3)
        while proc.poll() is None and time.monotonic() < deadline and log_rows() < rows + wanted + (rows == 0):
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "unfinished save left" if temps() else ""


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = write_config(tmp_path / "cfg.json", tiny_config())
    steps = 24
    ref = str(tmp_path / "ref")
    r = subprocess.run(_train_cmd(cfg, ref, steps), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    out = str(tmp_path / "killed")
    rng = random.Random(1234)
    modes = ["mid-save", "steps", "startup", "mid-save", "steps"]
    kills, seen_unfinished, t0 = 0, 0, time.monotonic()
    while kills < KILLS:
        assert time.monotonic() - t0 < 600, f"only {kills} kills in 10 minutes"
        proc = subprocess.Popen(_train_cmd(cfg, out, steps), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        what = _wait_then_kill(proc, out, modes[kills % len(modes)], rng)
        if proc.returncode == 0:     # it finished before the kill: start over, the kills are what counts
            shutil.rmtree(out)
            continue
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        proc.stderr.close()
        kills += 1
        seen_unfinished += bool(what)
    assert seen_unfinished >= 3, f"only {seen_unfinished} of {kills} kills fell inside a save"
    r = subprocess.run(_train_cmd(cfg, out, steps), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step-00000023", "step-00000024"]
    _assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(ref))
    assert _log_rows(out) == _log_rows(ref)


# ------------------------------------------------------------------------------------------------
# every state a save can leave, simulated deterministically
# ------------------------------------------------------------------------------------------------
class _Killed(BaseException):
    """Stands for kill -9: a BaseException, so no ``except Exception`` clean-up runs."""


def _state(step: int) -> tuple[dict, torch.optim.Optimizer]:
    """Distinct model and optimizer tensors for each step."""
    torch.manual_seed(step)
    w = torch.nn.Parameter(torch.randn(7, 5))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.randn_like(w)
    opt.step()
    return {"w": w.detach().clone(), "b": torch.full((3,), float(step))}, opt


def _save(run, step, keep=2):
    model, opt = _state(step)
    return save_checkpoint(run, model, opt, step, extra={"config": {}}, keep=keep)


def _ops_of_a_save(tmp_path, monkeypatch) -> list:
    ops = []
    monkeypatch.setattr(ckpt, "_after_op", lambda op, path: ops.append((op, os.path.basename(path))))
    run = str(tmp_path / "count")
    for step in (1, 2, 3):
        ops.clear()
        _save(run, step)
    monkeypatch.undo()
    return list(ops)


def _kill_at(index: int, damage: str):
    """An _after_op that lets ``index`` operations happen, then 'kills' the process; ``damage``
    first makes the last operation unfinished: a file written only halfway, or a delete that
    removed only part of a folder."""
    count = [0]

    def hook(op, path):
        count[0] += 1
        if count[0] <= index:
            return
        if damage == "half-written" and op == "write":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        if damage == "half-deleted" and op == "trash":
            trashed = next(os.path.join(r, n) for r, _, names in os.walk(os.path.dirname(path))
                           if ".trash-" in r for n in names)
            os.remove(trashed)
        raise _Killed()
    return hook


def test_ops_of_a_save_are_the_documented_sequence(tmp_path, monkeypatch):
    # a save of step 3 beside steps 1 and 2 with keep=2: write everything in a temp folder, the
    # manifest last, one rename into place, then the oldest into the trash and gone
    ops = _ops_of_a_save(tmp_path, monkeypatch)
    kinds = [op for op, _ in ops]
    assert kinds == ["mkdtemp", "write", "fsync", "write", "fsync", "write", "fsync", "write", "fsync",
                     "rename", "fsync", "trash", "rmtree"], ops
    assert [name for op, name in ops if op == "write"] == ["model.safetensors", "optimizer.safetensors",
                                                           "state.json", "manifest.json"]


def test_every_point_of_a_save_recovers_to_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    ops = _ops_of_a_save(tmp_path, monkeypatch)
    rename_at = [op for op, _ in ops].index("rename")
    cases = [(i, "") for i in range(len(ops) + 1)]
    cases += [(i, "half-written") for i, (op, _) in enumerate(ops) if op == "write"]
    cases += [(i, "half-deleted") for i, (op, _) in enumerate(ops) if op == "trash"]
    for i, damage in cases:
        run = str(tmp_path / f"kill{i}{damage}")
        _save(run, 1)
        _save(run, 2)
        monkeypatch.setattr(ckpt, "_after_op", _kill_at(i, damage))
        if i < len(ops):
            with pytest.raises(_Killed):
                _save(run, 3)
        else:
            _save(run, 3)
        monkeypatch.undo()
        want = 3 if i >= rename_at else 2
        found, notes = recover(run)
        assert found is not None and ckpt.verify_checkpoint(found) == want, (i, damage, found, notes)
        model, _ = ckpt.load_checkpoint(found, restore_rng=False)
        assert torch.equal(model["w"], _state(want)[0]["w"]), (i, damage)
        left = os.listdir(os.path.join(run, "checkpoints"))
        assert not [n for n in left if n.startswith(".")], (i, damage, left)   # nothing stale left
        assert "step-00000002" in left, (i, damage, left)                      # the last good one kept
        # the run goes on: the next save lands and becomes the newest, nothing is wedged
        _save(run, want + 1)
        assert ckpt.verify_checkpoint(latest_checkpoint(run)) == want + 1


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_and_is_replaced(tmp_path):
    run = str(tmp_path / "run")
    _save(run, 1)
    newest = _save(run, 2)
    model_file = os.path.join(newest, "model.safetensors")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) - 8)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors has .* bytes, its manifest says"):
        ckpt.verify_checkpoint(newest)
    found, notes = recover(run)
    assert ckpt.verify_checkpoint(found) == 1 and any("damaged" in n for n in notes)
    assert os.path.isdir(newest)                 # kept: a damaged folder is never deleted blindly ...
    _save(run, 2)                                # ... but the run's own new step 2 replaces it
    assert ckpt.verify_checkpoint(latest_checkpoint(run)) == 2
    # a flipped byte of the same size is caught by the checksum
    with open(model_file, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.verify_checkpoint(os.path.dirname(model_file))


def test_keep_k_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    for step in range(1, 6):
        _save(run, step, keep=3)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [f"step-0000000{s}" for s in (3, 4, 5)]
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        _save(run, 6, keep=0)


# the layout before manifests: OUT/checkpoint, renamed to OUT/checkpoint.old during a save
def _to_legacy(step_dir: str, target: str) -> None:
    os.remove(os.path.join(step_dir, ckpt.MANIFEST))
    os.rename(step_dir, target)


def _args(tmp_path, out, **kw):
    base = dict(out=str(out), config=write_config(tmp_path / "cfg.json", tiny_config()), batch_size=2,
                clip_seconds=1.0, workers=0, progress=False, save_every=2, log_every=1, lr=1e-3, warmup=0,
                mode="finetune", lora_rank=4)
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("layout", ["killed between the two renames", "killed inside the old folder's delete"])
def test_runs_of_the_old_layout_resume_from_their_newest_good_checkpoint(tmp_path, layout):
    ref = _args(tmp_path, tmp_path / "ref", steps=6)
    train(ref)
    run = _args(tmp_path, tmp_path / "run", steps=4)
    train(run)
    out = str(tmp_path / "run")
    steps = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert steps == ["step-00000002", "step-00000004"]
    if layout == "killed between the two renames":   # only checkpoint.old (step 4) is left
        _to_legacy(os.path.join(out, "checkpoints", steps[1]), os.path.join(out, "checkpoint.old"))
        shutil.rmtree(os.path.join(out, "checkpoints"))
    else:                                            # checkpoint (step 4) + a half-deleted checkpoint.old (step 2)
        _to_legacy(os.path.join(out, "checkpoints", steps[1]), os.path.join(out, "checkpoint"))
        _to_legacy(os.path.join(out, "checkpoints", steps[0]), os.path.join(out, "checkpoint.old"))
        os.remove(os.path.join(out, "checkpoint.old", "model.safetensors"))
        shutil.rmtree(os.path.join(out, "checkpoints"))
    summary = train(dataclasses.replace(run, steps=6, resume=True, keep_checkpoints=1))
    assert summary["step"] == 6
    _assert_same_checkpoint(latest_checkpoint(out), latest_checkpoint(str(tmp_path / "ref")))
    assert _log_rows(out) == _log_rows(str(tmp_path / "ref"))
    # the old folders were pruned like any older checkpoint (keep 1: only step 6 stays)
    assert sorted(os.listdir(out)) == ["checkpoints", "loss.csv"]
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-00000006"]


def test_a_run_into_a_used_out_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    from pfp.train.__main__ import main
    cfg = write_config(tmp_path / "cfg.json", tiny_config())
    out = tmp_path / "run"
    common = ["pretrain", "--config", cfg, "--out", str(out), "--batch-size", "1", "--clip-seconds", "1",
              "--workers", "0", "--no-progress", "--threads", "1", "--save-every", "1", "--log-every", "1"]
    assert main(common + ["--steps", "2"]) == 0
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in ("loss.csv",)}
    capsys.readouterr()
    assert main(common + ["--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "--resume" in err and "--overwrite" in err and "\n" not in err
    assert {p: os.path.getmtime(os.path.join(out, p)) for p in before} == before
    assert main(common + ["--steps", "3", "--overwrite"]) == 0
    rows = _log_rows(str(out))
    assert rows[0] == ["step", "loss", "lr"] and [r[0] for r in rows[1:]] == ["1", "2", "3"]


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    # a kill before the first save leaves a log and no checkpoint; a second header or a half line
    # from older versions is dropped too
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.csv").write_text("step,loss,lr,samples_per_s,elapsed_s\n1,0.5,0.001,3,1\n"
                                  "step,loss,lr,samples_per_s,elapsed_s\n2,0.4")
    train(_args(tmp_path, out, steps=2, resume=True))
    ref = tmp_path / "ref"
    train(_args(tmp_path, ref, steps=2))
    assert _log_rows(str(out)) == _log_rows(str(ref))


# ------------------------------------------------------------------------------------------------
# non-finite values
# ------------------------------------------------------------------------------------------------
def _nan_at(steps: set):
    """A loss that is NaN at the given 0-based steps (counted per call)."""
    from pfp.train.loop import _LossModule
    real = _LossModule.forward
    calls = [0]

    def forward(self, batch, generator):
        loss = real(self, batch, generator)
        calls[0] += 1
        return loss * float("nan") if calls[0] - 1 in steps else loss
    return forward


def test_a_nonfinite_loss_stops_the_run_and_saves_nothing_after_it(tmp_path, monkeypatch):
    from pfp._cli import RunFailure
    from pfp.train.loop import _LossModule
    monkeypatch.setattr(_LossModule, "forward", _nan_at({2}))
    out = tmp_path / "run"
    with pytest.raises(RunFailure, match=r"non-finite loss at step 3 .*newest checkpoint: step 2"):
        train(_args(tmp_path, out, steps=6, save_every=1))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000001", "step-00000002"]
    assert [r[0] for r in _log_rows(str(out))[1:]] == ["1", "2"]


def test_skip_nonfinite_skips_up_to_n_steps(tmp_path, monkeypatch):
    from pfp.train.loop import _LossModule
    monkeypatch.setattr(_LossModule, "forward", _nan_at({1, 3}))
    out = tmp_path / "run"
    summary = train(_args(tmp_path, out, steps=5, save_every=5, skip_nonfinite=2))
    assert summary["step"] == 5
    path = latest_checkpoint(str(out))
    state = ckpt.read_state(path)
    assert state["nonfinite_skipped"] == 2
    opt = ckpt.read_optimizer_state(path)
    assert max(float(s["step"]) for s in opt["state"].values()) == 3.0   # two of five updates skipped
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(path, "model.safetensors")).values())
    monkeypatch.setattr(_LossModule, "forward", _nan_at({0, 1, 2}))
    from pfp._cli import RunFailure
    with pytest.raises(RunFailure, match="non-finite loss at step 3"):
        train(_args(tmp_path, tmp_path / "again", steps=5, skip_nonfinite=2))


def test_weights_that_diverge_are_never_saved(tmp_path):
    from pfp._cli import RunFailure
    out = tmp_path / "run"
    with pytest.raises(RunFailure, match="non-finite|NaN or Inf"):
        train(_args(tmp_path, out, steps=8, save_every=1, lr=1e30, grad_clip=0.0, mode="pretrain", lora_rank=0))
    for step_dir in os.listdir(out / "checkpoints"):
        for name in ("model.safetensors", "optimizer.safetensors"):
            for k, v in load_file(out / "checkpoints" / step_dir / name).items():
                assert v.dtype not in (torch.float32, torch.float64) or torch.isfinite(v).all(), (step_dir, k)


def test_generate_stops_on_nonfinite_latents_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import pfp.generate as gen
    import pfp.sampler
    monkeypatch.setattr(pfp.sampler, "sample", lambda *a, **k: torch.full(a[1], float("nan")))
    assert gen.main(["--out", str(tmp_path / "v.mp4"), "--quiet", "--seconds", "0.5", "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: chunk 1: the sampler produced NaN") and "\n" not in err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# bad data, found before step 1
# ------------------------------------------------------------------------------------------------
def test_bad_videos_are_reported_before_step_1_and_skipped_or_refused(tmp_path, capsys):
    from pfp.train.__main__ import main
    data = tmp_path / "videos"
    write_video_folder(data, good=2, corrupt=1, short=1)
    cfg = write_config(tmp_path / "cfg.json", tiny_config())
    common = ["pretrain", "--config", cfg, "--data", str(data), "--steps", "1", "--batch-size", "1",
              "--clip-seconds", "1", "--workers", "0", "--no-progress", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "ok")]) == 0
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("data:"))
    assert "skipped 2 of 4 videos" in line and "v2.mp4" in line and "v3.mp4" in line and "too short" in line
    assert main(common + ["--out", str(tmp_path / "strict"), "--bad-data", "error"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "v2.mp4" in err and "\n" not in err
    assert not (tmp_path / "strict" / "checkpoints").exists()


def test_mix_synthetic_trains_on_a_folder_with_synthetic_scenes_mixed_in(tmp_path, monkeypatch):
    # --mix-synthetic: each clip of the folder replaced, with probability P, by a synthetic scene
    import pfp.data
    from pfp.train.__main__ import main
    data = tmp_path / "videos"
    write_video_folder(data, good=2, corrupt=0, short=0)
    cfg = write_config(tmp_path / "cfg.json", tiny_config())
    sources = []
    real_get = pfp.data.MixedVideos.get

    def get(self, index, generator=None):
        item = real_get(self, index, generator)
        sources.append(item["source"])
        return item
    monkeypatch.setattr(pfp.data.MixedVideos, "get", get)
    assert main(["pretrain", "--config", cfg, "--data", str(data), "--mix-synthetic", "0.5", "--steps", "2",
                 "--batch-size", "8", "--clip-seconds", "1", "--workers", "0", "--no-progress", "--threads", "1",
                 "--out", str(tmp_path / "run")]) == 0
    assert len(sources) == 16
    assert any(s.startswith("synthetic:") for s in sources) and any(s.endswith(".mp4") for s in sources)


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,named", [
    (["--lr", "inf"], "--lr"), (["--t-shift", "nan"], "--t-shift"), (["--grad-clip", "nan"], "--grad-clip"),
    (["--warmup", "-3"], "--warmup"), (["--clip-seconds", "0"], "--clip-seconds"), (["--threads", "0"], "--threads"),
    (["--threads", "-2"], "--threads"), (["--workers", "-1"], "--workers"), (["--max-minutes", "-1"], "--max-minutes"),
    (["--until", "0"], "--until"), (["--device", "tpu"], "--device"), (["--export", "out.txt"], "--export"),
    (["--export", "/proc/w.safetensors"], "--export"), (["--export", "/proc/nodir/w.safetensors"], "--export"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints"), (["--skip-nonfinite", "-1"], "--skip-nonfinite"),
    (["--lora-alpha", "nan"], "--lora-alpha"), (["--weight-decay", "-inf"], "--weight-decay"),
    (["--data", "no/such/folder"], "--data"), (["--init", "missing.safetensors"], "--init"),
    (["--config", "missing.json"], "--config"), (["--resume", "--overwrite"], "--overwrite"),
    (["--bad-data", "ignore"], "--bad-data"), (["--steps", "x"], "--steps"),
    (["--clip-seconds", "0.9"], "--clip-seconds 0.9 is 1.8 chunks of 0.5 s"),
])
def test_train_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, flags, named):
    from pfp.train.__main__ import main
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--out", "run", "--no-progress"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err, err
    assert os.listdir(tmp_path) == []


def test_resume_takes_the_runs_own_flags_and_refuses_others(tmp_path, capsys, monkeypatch):
    from pfp.train.__main__ import main
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "cfg.json", tiny_config())
    common = ["--config", cfg, "--out", "run", "--clip-seconds", "1", "--workers", "0", "--no-progress",
              "--threads", "1", "--save-every", "2"]
    assert main(["pretrain", *common, "--steps", "2", "--batch-size", "2", "--seed", "7"]) == 0
    capsys.readouterr()
    # values that define the run, given otherwise, are refused before anything runs
    for argv, named in ((["pretrain", "--seed", "8"], "--seed 8 differs from the run being resumed"),
                        (["pretrain", "--batch-size", "3"], "--batch-size 3 differs"),
                        (["pretrain", "--clip-seconds", "1.5"], "--clip-seconds 1.5 differs"),
                        (["finetune", "--lora-rank", "0", "--clip-seconds", "1"], "mode finetune differs"),
                        (["pretrain", "--steps", "1"], "--steps 1 is before step 2 of the checkpoint"),
                        (["pretrain", "--until", "1"], "--until 1 is before step 2")):
        assert main([argv[0], *common, "--resume", "--steps", "4", *argv[1:]]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err, err
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-00000002"]
    # the run's own --steps too: run again with no --steps, it is already done (at 2, not 1000)
    assert main(["pretrain", *common, "--resume"]) == 0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-00000002"]
    # a flag given counts as given even at its default value (--steps 1000 would extend the run)
    from pfp.train.__main__ import _given_flags, _parser
    given = _given_flags(_parser(), ["pretrain", "--steps", "1000", "--no-progress"])
    assert {"mode", "steps", "progress"} <= given and "lr" not in given
    # flags left out take the run's values; a changed learning rate is said, and used
    assert main(["pretrain", *common, "--resume", "--steps", "4", "--lr", "2e-3"]) == 0
    assert "resume: --lr 0.002 differs from the run's" in capsys.readouterr().err
    with open(os.path.join(latest_checkpoint(tmp_path / "run"), "state.json")) as f:
        recorded = json.load(f)["args"]
    assert (recorded["seed"], recorded["batch_size"], recorded["lr"]) == (7, 2, 2e-3)


def test_finetune_refuses_a_clip_without_room_for_a_history(tmp_path, capsys, monkeypatch):
    # one chunk would leave the compressor without a gradient for the whole run
    from pfp.train.__main__ import main
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--out", "run", "--no-progress", "--clip-seconds", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "finetune takes at least two chunks" in err and "e.g. 1, 1.5 or 2" in err and "\n" not in err, err
    assert os.listdir(tmp_path) == []


def test_train_damaged_inputs_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from pfp.train.__main__ import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cut.json").write_text(json.dumps(tiny_config().to_dict())[:50])
    weights = _weights_file(tmp_path, "w.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    for flags, named in ((["--config", "cut.json"], "config cut.json is not readable JSON"),
                         (["--init", "w.safetensors"], "w.safetensors is not a readable safetensors file")):
        assert main(["pretrain", "--out", "run", "--no-progress", "--steps", "1"] + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err, err
        assert not (tmp_path / "run").exists()


def test_an_error_raised_in_a_data_worker_is_reported_as_its_own_line():
    from pfp._cli import one_line
    exc = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                       "last):\n  File \"x.py\", line 1, in f\nRuntimeError: /data/a.mp4: cannot decode: bad data\n")
    assert one_line(exc) == "RuntimeError: /data/a.mp4: cannot decode: bad data"


def test_train_out_that_cannot_be_written_is_refused_up_front(tmp_path, capsys):
    from pfp.train.__main__ import main
    (tmp_path / "file").write_text("x")
    for out, named in (("/proc/pfp-run", "--out"), (str(tmp_path / "file"), "is a file")):
        assert main(["pretrain", "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out") and named in err and "\n" not in err, err


def _weights_file(tmp_path, name, mutate=None, meta=None):
    from pfp.weights import build_model
    model = build_model(tiny_config())
    tensors = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
    if mutate:
        mutate(tensors)
    path = tmp_path / name
    save_file(tensors, str(path), metadata=meta or {"format": "pfp.PFPModel/1",
                                                     "config": json.dumps(tiny_config().to_dict())})
    return str(path)


def _first_float(tensors):
    return next(k for k, v in tensors.items() if v.is_floating_point())


def test_generate_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import pfp.generate as gen
    monkeypatch.chdir(tmp_path)
    cases = []
    cases.append((["--out", "/proc/v.mp4"], "--out"))
    (tmp_path / "folder.mp4").mkdir()
    cases.append((["--out", "folder.mp4"], "is a folder"))
    cases.append((["--timings", "missing/t.csv"], "--timings"))
    cases.append((["--out", "v.mp4", "--timings", "v.mp4"], "different files"))
    (tmp_path / "latin1.json").write_bytes(json.dumps([{"start": 0, "end": 1, "prompt": "café"}], ensure_ascii=False)
                                           .encode().replace(b"\xc3\xa9", b"\xe9"))
    cases.append((["--storyboard", "latin1.json"], "latin1.json: not UTF-8"))
    cases.append((["--seconds", "1e9"], "--seconds 1e+09 would make"))
    nan = _weights_file(tmp_path, "nan.safetensors", lambda t: t[_first_float(t)].fill_(float("nan")))
    cases.append((["--checkpoint", nan], "holds NaN or Inf"))
    ints = _weights_file(tmp_path, "int.safetensors", lambda t: t.update({k: v.long() for k, v in t.items()}))
    cases.append((["--checkpoint", ints], "dtype int64"))
    cut = _weights_file(tmp_path, "cut.safetensors", meta={"format": "pfp.PFPModel/1",
                                                          "config": json.dumps(tiny_config().to_dict())[:40]})
    cases.append((["--checkpoint", cut], "config metadata is not a valid config"))
    # a training run whose only checkpoint has a truncated model.safetensors
    run = tmp_path / "run"
    train(_args(tmp_path, run, steps=1, save_every=1, mode="pretrain", lora_rank=0))
    model_file = os.path.join(latest_checkpoint(str(run)), "model.safetensors")
    with open(model_file, "r+b") as f:
        f.truncate(os.path.getsize(model_file) // 2)
    cases.append((["--checkpoint", str(run)], "no complete checkpoint"))
    cases.append((["--checkpoint", os.path.dirname(model_file)], "model.safetensors has"))
    before = sorted(os.listdir(tmp_path))
    for flags, named in cases:
        args = flags + ([] if "--out" in flags else ["--out", "v.mp4"]) + ["--quiet", "--steps", "1"]
        assert gen.main(args) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and named in err and "\n" not in err, (flags, err)
        assert sorted(os.listdir(tmp_path)) == before, flags


def test_generate_checks_optional_dependencies_before_work(tmp_path, capsys, monkeypatch):
    import pfp.generate as gen
    monkeypatch.setitem(sys.modules, "PIL", None)       # as if Pillow were not installed
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("generation started"))
    assert gen.main(["--out", str(tmp_path / "v.mp4"), "--contact-sheet", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --contact-sheet needs pillow: pip install pillow"
    assert os.listdir(tmp_path) == []


def test_a_value_error_once_the_work_started_is_a_failure_not_bad_input(tmp_path, capsys, monkeypatch):
    # exit 2 says "your input": a ValueError from inside the sampler, mid-run, is exit 1
    import pfp.generate as gen
    import pfp.sampler as sampler

    def broken(*args, **kwargs):
        raise ValueError("something inside went wrong")
    monkeypatch.setattr(sampler, "sample", broken)
    assert gen.main(["--out", str(tmp_path / "v.mp4"), "--quiet", "--steps", "1"]) == 1
    assert capsys.readouterr().err.strip() == "error: something inside went wrong"
    assert gen.main(["--out", str(tmp_path / "v.mp4"), "--quiet", "--steps", "0"]) == 2   # checked first
    assert os.listdir(tmp_path) == []
    from pfp._cli import run_cli, work_started

    def checks_then_work():
        work_started()
        raise FileNotFoundError("a file went away")
    assert run_cli(checks_then_work) == 1 and run_cli(lambda: int("x")) == 2   # reset for each run


def test_a_killed_writer_leaves_no_temp_file_for_long(tmp_path):
    # a temp file of a dead process beside the target is removed by the next write of it
    from pfp._io import atomic_target, remove_stale_temps
    script = ("import os, sys; sys.path.insert(0, %r)\nfrom pfp._io import atomic_target\n"
              "with atomic_target(%r, '.mp4') as tmp:\n    open(tmp, 'wb').write(b'x')\n    os.kill(os.getpid(), 9)\n"
              % (ROOT, str(tmp_path / "v.mp4")))
    subprocess.run([sys.executable, "-c", script], timeout=60)
    stale = os.listdir(tmp_path)
    assert len(stale) == 1 and ".tmp-" in stale[0] and not (tmp_path / "v.mp4").exists()
    with atomic_target(tmp_path / "other.mp4") as tmp:  # another target's temps are not touched
        open(tmp, "wb").write(b"y")
    assert stale[0] in os.listdir(tmp_path)
    with atomic_target(tmp_path / "v.mp4") as tmp:
        open(tmp, "wb").write(b"z")
    assert sorted(os.listdir(tmp_path)) == ["other.mp4", "v.mp4"]
    assert remove_stale_temps(tmp_path / "v.mp4") == []


@pytest.mark.parametrize("kwargs,named", [
    ({"stride": 2.5}, "stride must be an int"), ({"stride": True}, "stride must be an int"),
    ({"stride": (1, 2.0, 1)}, "stride must be an int"), ({"padding": 100000}, "GiB, more than the"),
])
def test_conv_arguments_that_cannot_work_are_refused_with_a_message(kwargs, named):
    import pfp_kernels as pk
    x, w = torch.randn(1, 2, 3, 5, 5), torch.randn(4, 2, 3, 3, 3)
    with pytest.raises(ValueError, match=named):
        pk.conv3d_act(x, w, None, **kwargs)
    if "padding" in kwargs:
        with pytest.raises(ValueError, match=named):
            pk.causal_conv3d_act(x, w, None, padding_hw=kwargs["padding"])
    else:
        with pytest.raises(ValueError, match=named):
            pk.causal_conv3d_act(x, w, None, **kwargs)
    assert math.isfinite(pk.conv3d_act(x, w, None, stride=2).sum().item())


def test_a_dash_value_goes_to_its_flag_and_a_flag_is_never_taken_as_a_value():
    # "--vram -1GiB" reaches the flag's own check (which names the bad value) instead of argparse's
    # "expected one argument"; a registered flag after a flag that wants a value stays a flag
    from pfp._cli import Parser, UsageError
    p = Parser(prog="x")
    p.add_argument("--vram")
    p.add_argument("--lr", type=float)
    p.add_argument("--json", action="store_true")
    p.add_argument("rest", nargs="*")
    ns = p.parse_args(["--vram", "-1GiB", "--lr", "-inf", "--json"])
    assert ns.vram == "-1GiB" and ns.lr == float("-inf") and ns.json
    assert p.parse_args(["--vram=-2GiB"]).vram == "-2GiB"
    assert p.parse_args(["--", "--vram", "-x"]).rest == ["--vram", "-x"]   # after "--" nothing is joined
    with pytest.raises(UsageError, match="argument --vram: expected one argument"):
        p.parse_args(["--vram", "--json"])
    # abbreviations are flags to argparse, on either side: never swallowed, and joined when they
    # name a one-value flag
    with pytest.raises(UsageError, match="argument --vram: expected one argument"):
        p.parse_args(["--vram", "--js"])
    assert p.parse_args(["--vr", "-3GiB"]).vram == "-3GiB"
    p.add_argument("--jobs")
    with pytest.raises(UsageError, match="ambiguous option: --j"):
        p.parse_args(["--vram", "--j"])   # a prefix of two flags is a flag still, as argparse says
