"""Training: a step lowers the loss, resume is bit-exact, 2-process gloo data parallelism agrees."""
import dataclasses
import math
import os
import socket

import pytest
import torch
from safetensors.torch import load_file

from pfp.train import ObjectiveConfig, TrainArgs, random_omega, step_generator, train
from pfp.train.objectives import flow_loss, shifted_logit_normal, training_timesteps
from pfp.train.checkpoint import latest_checkpoint
from pfp.train.loop import _batch, _dataset, _LossModule
from pfp.weights import build_model

from _tiny_pfp import fixed_batch_losses, tiny_config, write_config


def _args(tmp_path, out, **kw):
    base = dict(out=str(out), config=write_config(tmp_path / "cfg.json", tiny_config()), batch_size=2,
                clip_seconds=1.0, workers=0, progress=False, save_every=2, log_every=1, lr=1e-3, warmup=0)
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(mode):
    losses = fixed_batch_losses(mode)
    assert losses[-1] < 0.8 * losses[0], losses


def test_random_omega_is_random_per_sample_and_step():
    sets = set()
    for step in range(20):
        om = random_omega(16, 4, 4, step_generator(0, step, 0))
        assert om.shape[0] == 4 and 1 <= om.shape[1] <= 4
        assert (om[:, 1:] > om[:, :-1]).all()  # sorted, distinct
        sets.update(tuple(r.tolist()) for r in om)
    assert len(sets) > 40  # never a fixed pattern


def test_resume_is_bit_exact(tmp_path):
    # one run of 4 steps, against 2 steps + resume to 4; LoRA on, so adapters and optimizer state resume too
    a = _args(tmp_path, tmp_path / "a", mode="finetune", steps=4, lora_rank=4)
    train(a)
    b = _args(tmp_path, tmp_path / "b", mode="finetune", steps=2, lora_rank=4)
    train(b)
    b.steps, b.resume = 4, True
    train(b)
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta = load_file(os.path.join(latest_checkpoint(tmp_path / "a"), name))
        tb = load_file(os.path.join(latest_checkpoint(tmp_path / "b"), name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    assert any("lora_" in k for k in load_file(os.path.join(latest_checkpoint(tmp_path / "a"), "model.safetensors")))
    with open(tmp_path / "a" / "loss.csv") as fa, open(tmp_path / "b" / "loss.csv") as fb:
        rows_a = [r.split(",")[:2] for r in fa.read().splitlines()]
        rows_b = [r.split(",")[:2] for r in fb.read().splitlines()]
    assert rows_a == rows_b


def _checkpoint_tensors(run) -> dict:
    return load_file(os.path.join(latest_checkpoint(run), "model.safetensors"))


def test_lora_checkpoints_leave_the_frozen_base_out_and_resume_from_init(tmp_path):
    # the base comes from an --init file; checkpoints hold only what trains, and a resume rebuilds
    # the rest from that file, bit-exactly
    base = tmp_path / "base.safetensors"
    train(_args(tmp_path, tmp_path / "pre", steps=1, export=str(base)))
    a = _args(tmp_path, tmp_path / "a", mode="finetune", steps=4, lora_rank=4, init=str(base))
    out = train(a)
    trained = {n for n, p in out["model"].named_parameters(remove_duplicate=False) if p.requires_grad}
    frozen = {n for n, p in out["model"].named_parameters(remove_duplicate=False)
              if not p.requires_grad and out["model"].is_saved_key(n)}
    saved = _checkpoint_tensors(tmp_path / "a")
    assert frozen and not frozen & saved.keys()
    assert trained <= saved.keys()
    full = {k for k in out["model"].state_dict() if out["model"].is_saved_key(k)}
    assert saved.keys() == full - frozen      # every buffer and trained tensor is still there

    b = _args(tmp_path, tmp_path / "b", mode="finetune", steps=2, lora_rank=4, init=str(base))
    train(b)
    b.steps, b.resume, b.init = 4, True, None    # the checkpoint names its base file itself
    train(b)
    tb = _checkpoint_tensors(tmp_path / "b")
    assert saved.keys() == tb.keys() and all(torch.equal(saved[k], tb[k]) for k in saved)


def test_lora_resume_refuses_a_changed_or_missing_base(tmp_path):
    base = tmp_path / "base.safetensors"
    train(_args(tmp_path, tmp_path / "pre", steps=1, export=str(base)))
    b = _args(tmp_path, tmp_path / "b", mode="finetune", steps=2, lora_rank=4, init=str(base))
    train(b)
    b.steps, b.resume = 4, True
    train(_args(tmp_path, tmp_path / "pre", steps=2, overwrite=True, export=str(base)))   # other weights, same file
    with pytest.raises(ValueError, match="differ from the ones it was trained on"):
        train(b)
    os.remove(base)
    b.init = None    # (given, the missing --init itself is refused first)
    with pytest.raises(ValueError, match="no longer exists"):
        train(b)


def test_text_cache_keeps_the_losses_and_encodes_each_prompt_once(tmp_path):
    # LoRA leaves the text encoder frozen, so its states are cached per prompt; the losses are the
    # uncached run's within the rounding of batched against one-prompt encoding
    a = train(_args(tmp_path, tmp_path / "a", mode="finetune", steps=4, lora_rank=4, p_uncond=0.5))
    b = train(_args(tmp_path, tmp_path / "b", mode="finetune", steps=4, lora_rank=4, p_uncond=0.5, text_cache="0"))
    stats = a["text_cache"]
    assert b["text_cache"] is None
    assert stats["hits"] + stats["misses"] == 4 * 2 and stats["misses"] == stats["prompts"]
    assert stats["hits"] > 0                                       # the empty prompt, at p_uncond 0.5
    with open(tmp_path / "a" / "loss.csv") as fa, open(tmp_path / "b" / "loss.csv") as fb:
        la = [float(r.split(",")[1]) for r in fa.read().splitlines()[1:]]
        lb = [float(r.split(",")[1]) for r in fb.read().splitlines()[1:]]
    assert len(la) == 4 and la == pytest.approx(lb, rel=1e-5)
    # a text encoder that trains (the tiny model's full pretraining) is never cached
    assert train(_args(tmp_path, tmp_path / "c", steps=1))["text_cache"] is None


def test_export_merges_lora_and_loads(tmp_path):
    from pfp.weights import load_weights
    args = _args(tmp_path, tmp_path / "r", mode="finetune", steps=1, lora_rank=4,
                 export=str(tmp_path / "w.safetensors"))
    train(args)
    model = load_weights(str(tmp_path / "w.safetensors"))
    assert not any("lora" in k for k in model.state_dict())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, args, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        out = train(args)
        if not args.fsdp:
            state = {k: v.detach().clone() for k, v in out["model"].state_dict().items()}
        else:
            state = {}
        torch.save({"state": state, "loss": out["loss"]}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_processes_agree(tmp_path):
    import torch.multiprocessing as mp
    args = _args(tmp_path, tmp_path / "ddp", mode="pretrain", steps=3, save_every=3)
    mp.spawn(_worker, args=(_free_port(), args, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # the ranks trained on different clips (else agreement would prove nothing) ...
    b0 = _batch(_dataset(args, tiny_config()), step_generator(0, 0, 0, "data"), 2)
    b1 = _batch(_dataset(args, tiny_config()), step_generator(0, 0, 1, "data"), 2)
    assert not torch.equal(b0["hr"], b1["hr"])
    # ... and the weights moved away from the initialisation, identically, and were saved by rank 0
    saved = load_file(os.path.join(latest_checkpoint(tmp_path / "ddp"), "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, r0["state"][k]), k


def test_fsdp2_two_gloo_processes_match_ddp(tmp_path):
    # FSDP2 (fully_shard per block + root) must train the same model as DDP on the same data
    import torch.multiprocessing as mp
    ddp = _args(tmp_path, tmp_path / "ddp", mode="pretrain", steps=2, save_every=2)
    mp.spawn(_worker, args=(_free_port(), ddp, str(tmp_path)), nprocs=2, join=True)
    fsdp = _args(tmp_path, tmp_path / "fsdp", mode="pretrain", steps=2, save_every=2, fsdp=True)
    mp.spawn(_worker, args=(_free_port(), fsdp, str(tmp_path)), nprocs=2, join=True)
    a = load_file(os.path.join(latest_checkpoint(tmp_path / "ddp"), "model.safetensors"))
    b = load_file(os.path.join(latest_checkpoint(tmp_path / "fsdp"), "model.safetensors"))
    assert a.keys() == b.keys()
    init = build_model(tiny_config()).trainable_state_dict()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
        moved += int(not torch.equal(a[k], init[k]))
    assert moved > 10


def test_wan_backbone_trains_through_the_cli_path(tmp_path):
    # a tiny, randomly initialised diffusers Wan transformer as the backbone: pretrain, then a LoRA finetune
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    cfg = tiny_config()
    cfg.dit = {"kind": "wan", "config": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                             in_channels=48, out_channels=48, text_dim=16, freq_dim=32, ffn_dim=64,
                                             num_layers=2, rope_max_seq_len=64)}
    path = write_config(tmp_path / "wan.json", cfg)
    out = train(_args(tmp_path, tmp_path / "pre", mode="pretrain", steps=2, config=path,
                      export=str(tmp_path / "pre.safetensors")))
    assert math.isfinite(out["loss"])
    out = train(_args(tmp_path, tmp_path / "ft", mode="finetune", steps=2, config=path, lora_rank=4,
                      init=str(tmp_path / "pre.safetensors")))
    lora = [n for n, p in out["model"].backbone.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path, mode):
    # the path a GPU run takes (bf16 autocast), exercised on CPU; the compressor stays in fp32
    out = train(_args(tmp_path, tmp_path / mode, mode=mode, steps=2, precision="bf16", grad_checkpointing=True,
                      lora_rank=4 if mode == "finetune" else 0))
    assert math.isfinite(out["loss"])


def test_cli_synthetic_size_ranges(tmp_path, capsys):
    # --sprite-radius / --pattern-period reach the synthetic dataset; a bad range is one clear line
    from pfp.train.__main__ import main
    cfg = write_config(tmp_path / "cfg.json", tiny_config())
    common = ["pretrain", "--config", cfg, "--steps", "1", "--batch-size", "1", "--clip-seconds", "1",
              "--workers", "0", "--no-progress", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "bad"), "--sprite-radius", "0.3", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --sprite-radius must be MIN MAX with 0 < MIN <= MAX <= 1") and "\n" not in err
    assert main(common + ["--out", str(tmp_path / "bad"), "--shot-seconds", "2", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --shot-seconds must be MIN MAX with 0 < MIN <= MAX") and "\n" not in err
    args = _args(tmp_path, tmp_path / "ok", sprite_radius=(0.2, 0.25), pattern_period=(0.4, 0.5), shot_seconds=(2.0, 4.0))
    ds = _dataset(args, build_model().config)
    assert ds.sprite_radius == (0.2, 0.25) and ds.pattern_period == (0.4, 0.5) and ds.shot_seconds == (2.0, 4.0)


def test_shots_of_half_the_clip_or_longer_train_without_scene_returns():
    # what --shot-seconds' help promises: a clip returns to a scene only with 3 or more shots
    from pfp.data import SyntheticMultiShotVideos, VideoSpec

    def returns(shot_seconds):
        data = SyntheticMultiShotVideos(40, VideoSpec(hr_size=16, hr_fps=8.0, hr_frames=32), seed=5,
                                        shot_seconds=shot_seconds)
        count = 0
        for i in range(len(data)):
            order = [shot.scene for shot in data.plan(i).shots]
            count += any(scene in order[:k - 1] for k, scene in enumerate(order) if k >= 2)
        return count
    assert returns((1.0, 3.0)) > 0       # the default does return
    assert returns((2.0, 4.0)) == 0      # a 4 s clip then holds two shots at most


def _captured_history(cfg, objective, monkeypatch, backbone_forward=None, batch_size=3):
    """The HR and LR history that finetune_loss hands to the compressor for the target chunk (its last
    call), the clip's own latents of the same length, and how many steps ran until one drew a history."""
    model = build_model(cfg)
    batch = _batch(_dataset(TrainArgs(clip_seconds=2.0), cfg), step_generator(0, 0, 0, "data"), batch_size)
    seen = []
    real_forward = model.compressor.forward
    monkeypatch.setattr(model.compressor, "forward", lambda hr, lr: seen.append((hr, lr)) or real_forward(hr, lr))
    if backbone_forward is not None:
        monkeypatch.setattr(model.backbone, "forward", backbone_forward)
    lm = _LossModule(model, "finetune", objective, cfg.chunk_latent_frames, torch.device("cpu"), None)
    for step in range(8):                                   # until a step draws a history (n > 0)
        lm(batch, step_generator(0, step, 0))
        if seen:
            hist, lr_hist = seen[-1]
            clip = model.vae.encode(batch["hr"])[:, :, :hist.shape[2]]
            lr_clip = model.vae.encode(batch["lr"])[:, :, :lr_hist.shape[2]]
            return hist, lr_hist, clip, lr_clip, step + 1
    raise AssertionError("no step drew a history")


def test_history_noise_noises_each_sample_within_the_level(monkeypatch):
    cfg = tiny_config()
    clean, _, clip, _, _ = _captured_history(cfg, ObjectiveConfig(), monkeypatch)
    torch.testing.assert_close(clean, clip, rtol=0, atol=0)  # off: the real history, untouched
    noisy, _, clip, _, _ = _captured_history(cfg, ObjectiveConfig(history_noise=0.5), monkeypatch)
    noise_part = (noisy - clip).flatten(1)
    # (1 - u) x + u n  =>  noisy - x = u (n - x): per sample a level u in (0, 0.5], different per sample
    levels = (noise_part.norm(dim=1) / (torch.randn_like(clip).flatten(1) - clip.flatten(1)).norm(dim=1))
    assert (noise_part.abs().amax(dim=1) > 0).all(), "every sample's history is noised"
    assert levels.max() < 0.75 and len(set(levels.round(decimals=3).tolist())) == levels.numel(), levels


@pytest.mark.parametrize("lr_phase", ["start", "end"])
def test_self_history_replaces_the_newest_chunk_with_the_models_estimate(monkeypatch, lr_phase):
    # A stand-in backbone whose clean estimate is always 0.25 (v = (x - 0.25) / t): with
    # self_history = 1 the newest history chunk must become exactly that, in both branches (the
    # PatchVAE is exact, so 0.25 decodes, resizes and re-encodes to 0.25), the rest stays real.
    cfg = dataclasses.replace(tiny_config(), lr_phase=lr_phase)
    lc, rt = cfg.chunk_latent_frames, 2

    def constant_estimate(x, t, *args, **kwargs):
        return (x - 0.25) / t.view(-1, 1, 1, 1, 1)

    hist, lr_hist, clip, lr_clip, _ = _captured_history(cfg, ObjectiveConfig(self_history=1.0), monkeypatch,
                                                     constant_estimate)
    assert hist.shape[2] % lc == 0 and hist.shape == clip.shape and lr_hist.shape == lr_clip.shape
    torch.testing.assert_close(hist[:, :, :-lc], clip[:, :, :-lc], rtol=0, atol=0)
    torch.testing.assert_close(hist[:, :, -lc:], torch.full_like(hist[:, :, -lc:], 0.25), rtol=0, atol=1e-6)
    first_new = (hist.shape[2] - lc) // rt                  # LR frame j spans HR latent frames rt*j ..
    torch.testing.assert_close(lr_hist[:, :, :first_new], lr_clip[:, :, :first_new], rtol=0, atol=1e-6)
    torch.testing.assert_close(lr_hist[:, :, first_new:], torch.full_like(lr_hist[:, :, first_new:], 0.25),
                               rtol=0, atol=1e-6)
    # off (the default): the real history in both branches, and no estimate is made
    calls = []
    hist, lr_hist, clip, lr_clip, steps = _captured_history(
        cfg, ObjectiveConfig(), monkeypatch, lambda x, t, *a, **k: calls.append(1) or constant_estimate(x, t))
    assert len(calls) == steps, "one backbone call per step (the loss), no estimate"
    torch.testing.assert_close(hist, clip, rtol=0, atol=0)
    torch.testing.assert_close(lr_hist, lr_clip, rtol=0, atol=0)


def test_self_history_picks_samples_at_its_rate(monkeypatch):
    cfg = tiny_config()
    lc = cfg.chunk_latent_frames
    hist, _, clip, _, _ = _captured_history(cfg, ObjectiveConfig(self_history=0.5), monkeypatch,
                                         lambda x, t, *a, **k: (x - 0.25) / t.view(-1, 1, 1, 1, 1), batch_size=16)
    replaced = [bool((h[:, -lc:] - 0.25).abs().max() < 1e-6) for h in hist]
    untouched = [bool(torch.equal(h, c)) for h, c in zip(hist, clip)]
    assert all(r != u for r, u in zip(replaced, untouched)), "each sample is either replaced or real"
    assert 0 < sum(replaced) < len(replaced), replaced      # both kinds (all alike: 2 in 65536)


@pytest.mark.parametrize("flag,value", [("--history-noise", "1.5"), ("--self-history", "1.2"),
                                        ("--self-history-t", "0 0.5"), ("--self-history-t", "0.8 0.2"),
                                        ("--p-no-history", "-0.1"),
                                        ("--p-uncond", "2"), ("--t-shift", "0"),
                                        ("--t-weight-power", "-1"), ("--t-weight-power", "5"),
                                        ("--t-uniform", "1.5"), ("--t-uniform", "-0.5")])
def test_cli_rejects_out_of_range_objective_flags(tmp_path, capsys, flag, value):
    from pfp.train.__main__ import main
    assert main(["finetune", "--out", str(tmp_path / "x"), "--steps", "1", "--no-progress", flag, *value.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} must be") and "\n" not in err, err
    assert not (tmp_path / "x").exists()


def test_training_timesteps_mix_in_uniform_ones():
    n = 20000
    # t_uniform = 0 draws exactly what the plain shifted logit-normal draws (older runs reproduce)
    plain = training_timesteps(n, torch.Generator().manual_seed(5), ObjectiveConfig(t_shift=5.0))
    assert torch.equal(plain, shifted_logit_normal((n,), torch.Generator().manual_seed(5), shift=5.0))
    low = {}
    for frac in (0.0, 0.5, 1.0):
        t = training_timesteps(n, torch.Generator().manual_seed(6), ObjectiveConfig(t_shift=5.0, t_uniform=frac))
        assert t.shape == (n,) and bool(((t >= 0) & (t <= 1)).all())
        low[frac] = (t < 0.2).float().mean().item()
    # shift 5 leaves ~0.1% of the samples below t = 0.2; uniform ones put 20% there
    assert low[0.0] < 0.01 and abs(low[1.0] - 0.2) < 0.015 and abs(low[0.5] - 0.1 - low[0.0] / 2) < 0.015, low


def test_flow_loss_weights_each_sample_by_a_power_of_t():
    g = torch.Generator().manual_seed(3)
    v, target = torch.randn(5, 3, 2, 3, 4, generator=g), torch.randn(5, 3, 2, 3, 4, generator=g)
    t = torch.tensor([0.01, 0.05, 0.3, 0.7, 1.0])
    # power 0 is the plain velocity MSE, bit for bit (runs before the flag reproduce)
    assert torch.equal(flow_loss(v, target, t, 0.0), torch.nn.functional.mse_loss(v, target))
    per = (v.double() - target.double()).pow(2).flatten(1).mean(1)
    for p in (1.0, 2.0):
        want = (per * t.double().clamp_min(0.05).pow(p)).mean()
        torch.testing.assert_close(flow_loss(v, target, t, p).double(), want, rtol=1e-6, atol=0)


def test_t_weight_power_2_is_the_mse_of_the_implied_clean_latent():
    # an x0-predicting backbone returns v = (x_t - x0_hat) / t; with the target noise - x0 the weighted
    # velocity error is exactly the x0 error, whatever t (>= the clamp)
    g = torch.Generator().manual_seed(4)
    x0, noise, x0_hat = (torch.randn(4, 2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.05, 0.2, 0.6, 0.99], dtype=torch.float64)
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    v = (xt - x0_hat) / t.view(-1, 1, 1, 1, 1)
    loss = flow_loss(v, noise - x0, t, 2.0)
    torch.testing.assert_close(loss.double(), (x0_hat - x0).pow(2).mean(), rtol=1e-5, atol=0)


def test_the_loss_weight_floor_is_the_backbones_own_min_t():
    # the weight max(t, min_t)^p must floor t where the x0 backbone's velocity divides by max(t, min_t),
    # also when peft wraps the backbone for LoRA
    from pfp.backbones.tiny_dit import TinyDiT
    from pfp.train.loop import apply_lora
    from pfp.train.objectives import _min_t
    model = build_model(tiny_config())
    model.backbone = TinyDiT(latent_channels=8, inner_dim=48, depth=1, num_heads=4, text_dim=16, freq_dim=32,
                             prediction="x0", min_t=0.2)
    assert _min_t(model.backbone) == 0.2
    apply_lora(model, rank=2)
    assert type(model.backbone).__name__ == "PeftModel" and _min_t(model.backbone) == 0.2


def test_several_data_workers_deliver_the_same_batches_in_step_order():
    from pfp.train.loop import _batches
    cfg = tiny_config()
    args = TrainArgs(clip_seconds=1.0, batch_size=2, steps=7, seed=3)
    dataset = _dataset(args, cfg)
    want = list(_batches(dataset, dataclasses.replace(args, workers=0), 0, 2))
    got = list(_batches(dataset, dataclasses.replace(args, workers=3), 0, 2))
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert torch.equal(g[k], w[k]), k
            else:
                assert g[k] == w[k], k


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_resume_bit_exact(tmp_path, fsdp):
    # under torchrun rank 0 recovers the run folder and every rank resumes from the checkpoint it
    # names: 2 steps + resume to 4 equals 4 steps, for DDP and for FSDP2
    import torch.multiprocessing as mp
    full = _args(tmp_path, tmp_path / "full", mode="pretrain", steps=4, save_every=2, fsdp=fsdp)
    mp.spawn(_worker, args=(_free_port(), full, str(tmp_path)), nprocs=2, join=True)
    part = _args(tmp_path, tmp_path / "part", mode="pretrain", steps=2, save_every=2, fsdp=fsdp)
    mp.spawn(_worker, args=(_free_port(), part, str(tmp_path)), nprocs=2, join=True)
    resumed = dataclasses.replace(part, steps=4, resume=True)
    mp.spawn(_worker, args=(_free_port(), resumed, str(tmp_path)), nprocs=2, join=True)
    a = load_file(os.path.join(latest_checkpoint(tmp_path / "full"), "model.safetensors"))
    b = load_file(os.path.join(latest_checkpoint(tmp_path / "part"), "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with open(tmp_path / "full" / "loss.csv") as fa, open(tmp_path / "part" / "loss.csv") as fb:
        assert [r.split(",")[:2] for r in fa.read().splitlines()] == [r.split(",")[:2] for r in fb.read().splitlines()]


@pytest.mark.parametrize("kind", ["only_lr", "without_lr", "large_patchify"])
def test_every_compressor_kind_pretrains_and_finetunes(tmp_path, kind):
    # the paper's Table 1 variants train through the same commands, from the config
    cfg = dataclasses.replace(tiny_config(), compressor_kind=kind)
    path = write_config(tmp_path / f"{kind}.json", cfg)
    out = train(_args(tmp_path, tmp_path / "pre", mode="pretrain", steps=2, config=path,
                      export=str(tmp_path / "pre.safetensors")))
    assert math.isfinite(out["loss"]) and out["model"].compressor.kind == kind
    out = train(_args(tmp_path, tmp_path / "ft", mode="finetune", steps=2, lora_rank=4, config=path,
                      init=str(tmp_path / "pre.safetensors")))
    assert math.isfinite(out["loss"]) and out["model"].compressor.kind == kind
    # a checkpoint of one kind is refused by a config of another, naming both
    with pytest.raises(ValueError, match=f"holds compressors for {kind} 2x2x2, lr_phase start but the config "
                                         f"asks for pfp 2x2x2"):
        train(_args(tmp_path, tmp_path / "mismatch", mode="finetune", steps=1, init=str(tmp_path / "pre.safetensors")))


def test_init_from_a_run_folder_takes_its_config_and_a_compressor_of_another_rate_is_refused(tmp_path):
    # a run folder as --init: its config, as a weights file's (not the built-in one)
    cfg = dataclasses.replace(tiny_config(), rate="2x2x1", sample_shift=7.0)
    path = write_config(tmp_path / "r221.json", cfg)
    train(_args(tmp_path, tmp_path / "pre", mode="pretrain", steps=1, config=path,
                export=str(tmp_path / "pre.safetensors")))
    out = train(_args(tmp_path, tmp_path / "again", mode="pretrain", steps=1, config=None, init=str(tmp_path / "pre")))
    assert out["model"].config.rate == "2x2x1" and out["model"].config.sample_shift == 7.0
    # weights of another rate have the same shapes here, and would load; they are refused, from a
    # folder and from a file alike, unless the compressor starts afresh
    other = write_config(tmp_path / "r222.json", dataclasses.replace(cfg, rate="2x2x2"))
    for init in (tmp_path / "pre", tmp_path / "pre.safetensors"):
        with pytest.raises(ValueError, match="holds compressors for pfp 2x2x1, .* asks for pfp 2x2x2, lr_phase start; use a config"):
            train(_args(tmp_path, tmp_path / "x", mode="pretrain", steps=1, config=other, init=str(init)))
    out = train(_args(tmp_path, tmp_path / "fresh", mode="pretrain", steps=1, config=other,
                      init=str(tmp_path / "pre.safetensors"), init_skip="compressor."))
    assert out["model"].config.rate == "2x2x2"


def test_init_skip_starts_the_compressor_afresh(tmp_path):
    # Table 2's "Without Pretrain": finetune from a pretrained file but with a fresh compressor;
    # also a compressor of another kind over a trained backbone
    pre = tmp_path / "pre.safetensors"
    train(_args(tmp_path, tmp_path / "pre", mode="pretrain", steps=2, export=str(pre)))
    from pfp.weights import read_weights
    tensors, _ = read_weights(str(pre))
    from pfp.train.loop import _load_init
    model = build_model(tiny_config())
    fresh = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    _load_init(model, str(pre), skip_prefix="compressor.")
    state = model.trainable_state_dict()
    comp = [k for k in state if k.startswith("compressor.")]
    assert comp and all(torch.equal(state[k], fresh[k]) for k in comp)
    assert not all(torch.equal(tensors[k], fresh[k]) for k in comp)          # the file's were trained
    assert all(torch.equal(state[k], tensors[k]) for k in state if k.startswith("backbone.blocks."))
    kind = write_config(tmp_path / "lp.json", dataclasses.replace(tiny_config(), compressor_kind="large_patchify"))
    out = train(_args(tmp_path, tmp_path / "lp", mode="pretrain", steps=1, config=kind, init=str(pre),
                      init_skip="compressor."))
    assert out["model"].compressor.kind == "large_patchify"
    with pytest.raises(ValueError, match="--init-skip 'nothing.' names no tensor"):
        train(_args(tmp_path, tmp_path / "x", mode="finetune", steps=1, init=str(pre), init_skip="nothing."))


@pytest.mark.parametrize("argv, message", [
    (["--init-skip", "compressor."], "--init-skip needs --init"),
    (["--init", "w.safetensors", "--init-skip", "a.", "--init-new", "b."], "not both"),
    (["--crop", "middle"], "argument --crop: invalid choice"),
    (["--max-zoom", "0.5"], "--max-zoom must be a finite number >= 1, got 0.5"),
    (["--mix-synthetic", "1"], "--mix-synthetic must be a finite number in [0, 1), got 1.0"),
    (["--mix-synthetic", "0.5"], "--mix-synthetic mixes synthetic scenes into a video folder's clips"),
    (["--storyboards", "maybe"], "argument --storyboards: invalid choice"),
    (["--text-cache", "12"], "--text-cache must be a positive size with a unit"),
    (["--text-cache=-1GiB"], "--text-cache must be a positive size with a unit"),
])
def test_cli_refuses_bad_init_and_data_flags(tmp_path, capsys, argv, message):
    from pfp.train.__main__ import main
    try:
        rc = main(["finetune", "--out", str(tmp_path / "r"), *argv])
    except SystemExit as e:   # argparse's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_compressor_lr_scales_only_the_compressors_own_steps(tmp_path):
    # Adam's first step moves each weight by about lr: a 10x --compressor-lr moves the compressor's
    # own weights 10x further and leaves every other step as it was
    from pfp.train.loop import _load_init
    from pfp.weights import save_weights
    init = tmp_path / "init.safetensors"
    model = build_model(tiny_config())
    with torch.no_grad():   # zero-initialised output layers would leave the layers before them still in step 1
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05)
    save_weights(model, str(init))
    start = build_model(tiny_config())
    _load_init(start, str(init))
    before = start.trainable_state_dict()
    moved = {}
    for name, extra in (("plain", {}), ("fast", {"compressor_lr": 1e-2})):
        out = train(_args(tmp_path, tmp_path / name, mode="pretrain", steps=1, init=str(init), **extra))
        after = out["model"].trainable_state_dict()
        moved[name] = {k: (after[k].float() - before[k].float()).abs().mean().item() for k in before}
    own = [k for k in before if k.startswith("compressor.") and ".patch_embed." not in k]
    rest = [k for k in before if k not in own and moved["plain"][k] > 0]
    assert all(moved["plain"][k] > 0 for k in own) and len(rest) > 20
    for k in own:
        assert 8 < moved["fast"][k] / moved["plain"][k] < 12, k
    for k in rest:
        assert moved["fast"][k] == pytest.approx(moved["plain"][k], rel=1e-5), k
    with pytest.raises(ValueError, match="started without --compressor-lr.*resume it without the flag"):
        train(_args(tmp_path, tmp_path / "plain", mode="pretrain", steps=2, init=str(init), resume=True,
                    compressor_lr=1e-2))
