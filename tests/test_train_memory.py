"""Training under a memory budget: the planner's training phases (pfp.train.memory) and the
placement that carries a plan out (pfp.offload.TrainPlacement)."""
import pytest
import torch

from _tiny_pfp import tiny_config, wan_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainee(config, mode="finetune", lora_rank=4):
    """A model as pfp.train builds it: LoRA on the backbone, trainable flags set, on the CPU."""
    from pfp.train.loop import TrainArgs, _set_trainable, apply_lora
    from pfp.weights import build_model
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():   # the zero-initialised heads would make the loss blind to the context and blocks
        model.compressor.proj.weight.normal_(0, 0.1)
        model.backbone.proj_out.weight.normal_(0, 0.05)
    if lora_rank:
        apply_lora(model, lora_rank)
    _set_trainable(model, TrainArgs(mode=mode), lora_rank > 0)
    return model


def _losses(model, config, placement=None, steps=3, mode="finetune"):
    from pfp.train import ObjectiveConfig, TrainArgs, step_generator
    from pfp.train.loop import _batch, _dataset, _LossModule
    batch = _batch(_dataset(TrainArgs(clip_seconds=2.0), config), step_generator(0, 0, 0, "data"), 2)
    lm = _LossModule(model, mode, ObjectiveConfig(self_history=0.5 if mode == "finetune" else 0.0),
                     config.chunk_latent_frames, torch.device("cpu"), None, phases=placement)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(steps):
        loss = lm(batch, step_generator(0, step, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _checkpointed(model):
    from pfp.train.loop import _plain_backbone
    _plain_backbone(model.backbone).set_gradient_checkpointing(True)   # as pfp.train does under a plan
    return model


@pytest.mark.parametrize("choices", [{"offload": "block"}, {"weights": "fp8"}])
def test_offloaded_blocks_load_one_at_a_time_in_the_backward_too(wan_vae_dir, choices):
    # checkpointing's early stop ends a block's recompute by raising inside it, so its forward
    # hook never runs; every recomputed block had stayed loaded until the next step (all 4 here)
    import dataclasses

    from pfp.offload import TrainPlacement
    config = wan_config(wan_vae_dir)
    config = dataclasses.replace(config, dit={**config.dit, "depth": 4})
    want = _losses(_checkpointed(_trainee(config)), config, steps=2)
    model = _checkpointed(_trainee(config))
    placement = TrainPlacement(model, "cpu", choices, park_to="nan")
    parts = placement.blocks.parts
    most = []
    for blk in model.backbone.blocks:   # after the placement's hooks: runs once its block is in
        blk.register_forward_pre_hook(lambda m, a: most.append(sum(p.loaded for p in parts)))
    got = _losses(model, config, placement, steps=2)
    assert most and max(most) == 1
    if "offload" in choices:
        assert got == want, (got, want)
    placement.close()


@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
@pytest.mark.parametrize("choices", [{"text": "cpu"}, {"swap": True}, {"text": "cpu", "swap": True},
                                     {"offload": "block"}, {"offload": "block", "swap": True, "text": "cpu"}])
def test_every_training_plan_gives_the_plain_runs_losses(wan_vae_dir, mode, choices):
    # parked parts hold NaN (park_to="nan"): a part used while the plan has it off the device
    # poisons the loss, so equal losses mean each phase had what it ran on (for offloaded blocks:
    # in the backward too, where checkpointing's recompute reads them); the trainable parameters
    # never move, so the optimizer's steps are the plain run's bit for bit
    from pfp.offload import TrainPlacement
    config = wan_config(wan_vae_dir)
    want = _losses(_checkpointed(_trainee(config, mode)), config, mode=mode)
    model = _checkpointed(_trainee(config, mode))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    placement = TrainPlacement(model, "cpu", choices, park_to="nan")
    got = _losses(model, config, placement, mode=mode)
    assert got == want, (got, want)
    if choices.get("swap") or choices.get("offload") == "block":
        assert placement.bytes_moved > 0
    frozen = [k for k, p in model.named_parameters() if not p.requires_grad]
    with placement.native():   # what checkpoints save: the blocks' frozen weights as they were
        state = model.state_dict()
        assert all(torch.equal(state[k], before[k]) for k in frozen if ".blocks." in k)
    placement.close()          # every part back in its original form
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in frozen)


@pytest.mark.parametrize("offload", ["none", "block"])
def test_fp8_frozen_weights_train_close_to_native_and_checkpoint_the_originals(wan_vae_dir, offload):
    # the blocks' frozen linear weights in float8 (QLoRA's idea): the losses follow the native run's
    # within fp8's rounding of those weights, the adapters train, and checkpoints hold the originals
    from pfp.offload import TrainPlacement
    config = wan_config(wan_vae_dir)
    want = _losses(_checkpointed(_trainee(config)), config)
    model = _checkpointed(_trainee(config))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    placement = TrainPlacement(model, "cpu", {"weights": "fp8", "offload": offload})
    linear = [m.weight for m in model.backbone.get_base_model().blocks.modules()
              if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert linear and all(w.dtype == torch.float8_e4m3fn for w in linear)   # stored in fp8 between runs
    got = _losses(model, config, placement)
    err = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert 0 < err < 0.05, (got, want)      # fp8 rounding of the weights: near, never equal
    with placement.native():
        state = model.state_dict()
        assert all(torch.equal(state[k], before[k]) for k, p in model.named_parameters() if not p.requires_grad)
    placement.close()
    assert all(w.dtype == torch.float32 for w in linear)


def test_a_text_encoder_that_trains_never_leaves_the_device():
    from pfp.train.memory import all_training_plans, trace_training
    model = _trainee(tiny_config(), mode="pretrain", lora_rank=0)     # the tiny model trains its text encoder
    trace = trace_training(model, 2, 2)
    assert trace.text_trains and {p.choices["text"] for p in all_training_plans(trace, None)} == {"gpu"}


def test_the_training_trace_counts_the_step_and_the_optimizer(wan_vae_dir):
    from pfp.train.memory import choose_training, estimate_training, trace_training
    config = wan_config(wan_vae_dir)
    model = _trainee(config)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    trace = trace_training(model, 2, 2)
    assert trace.trainable == 3 * trainable                  # the parameters and AdamW's two states
    assert trace.transient["step"] >= trainable              # the gradients at least, and the activations
    # the optimizer step: every gradient, and foreach AdamW's one temporary per parameter group
    assert 2 * trainable <= trace.transient["optimizer"] < 2 * trainable + (1 << 20)
    assert "self_history" not in trace.transient
    assert trace.vae > 0 and trace.frozen > 0 and trace.context_tokens > 0
    plain = estimate_training(trace, {}, None)
    swapped = estimate_training(trace, {"swap": True, "text": "cpu"}, None)
    assert swapped.peak_bytes < plain.peak_bytes and swapped.bytes_moved_per_chunk == trace.vae + trace.frozen
    tight = choose_training(trace, swapped.peak_bytes)        # something that fits that is chosen
    assert tight.fits and tight.peak_bytes <= swapped.peak_bytes and tight.choices != plain.choices
    assert choose_training(trace, 80 << 30).choices == plain.choices
    # fp8 stores the blocks' frozen linear weights in a byte each; block offload keeps two blocks
    fp8 = estimate_training(trace, {"weights": "fp8"}, None)
    offload = estimate_training(trace, {"offload": "block"}, None)
    assert fp8.peak_bytes < plain.peak_bytes + 2 * trace.largest_block
    assert offload.bytes_moved_per_chunk == 2 * trace.blocks


def test_the_optimizer_step_and_self_history_enter_the_peaks(wan_vae_dir):
    from pfp.memory import _with_allowance
    from pfp.train.memory import estimate_training, trace_training
    config = wan_config(wan_vae_dir)
    # the backbone trains whole: its gradients and AdamW's temporary outweigh the backward's activations
    whole = trace_training(_trainee(config, "pretrain", lora_rank=0), 1, 2)
    assert whole.transient["optimizer"] > whole.transient["step"]
    step = {p.name: p for p in estimate_training(whole, {}, None).phases}["step"]
    resident = whole.trainable + whole.frozen + whole.text + whole.vae   # the plain plan: all of it
    assert step.peak_bytes == _with_allowance(resident + whole.transient["optimizer"])
    # --self-history decodes the history and re-encodes its low-res videos in the encode phase
    model = _trainee(config)
    plain, redone = trace_training(model, 2, 3), trace_training(model, 2, 3, self_history=True)
    assert redone.transient["self_history"] > redone.transient["encode"] == plain.transient["encode"]
    peaks = [{p.name: p.peak_bytes for p in estimate_training(t, {}, None).phases}["encode"] for t in (plain, redone)]
    assert peaks[1] > peaks[0]
    # and with swap each side comes in twice a step (estimate, then its decode), as a step does
    from pfp.offload import TrainPlacement
    swap = {"swap": True, "text": "cpu"}
    moved = [estimate_training(t, swap, None).bytes_moved_per_chunk for t in (plain, redone)]
    assert moved[1] == 2 * moved[0]
    placement = TrainPlacement(_checkpointed(model), "cpu", swap)
    start = placement.bytes_moved
    _losses(model, config, placement, steps=3)   # finetune with self_history 0.5: step 1 redoes a history
    total = placement.bytes_moved - start
    placement.close()
    assert 2 * moved[0] + moved[1] == pytest.approx(total, rel=1e-3), (total, moved)


def test_the_loop_frees_the_last_steps_gradients_before_the_forward():
    # what the plan counts: gradients live from the backward to the optimizer step, not across a forward
    from pfp.train.loop import TrainArgs, _forward_backward
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    seen = []

    def runner(batch, gen):
        seen.append(weight.grad)
        return (weight * batch).sum()
    for _ in range(2):
        _forward_backward(runner, optimizer, [weight], torch.ones(3), None, TrainArgs(), torch.device("cpu"), 1)
        optimizer.step()
    assert seen == [None, None] and weight.grad is not None


def test_train_cli_plans_refuses_and_trains_under_a_budget(tmp_path, capsys):
    from pfp.train.__main__ import main
    common = ["finetune", "--steps", "2", "--batch-size", "2", "--clip-seconds", "1", "--workers", "0",
              "--no-progress", "--threads", "1", "--lora-rank", "2"]
    assert main([*common, "--out", str(tmp_path / "p"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "| step |" in out and "no budget" in out and not (tmp_path / "p").exists()   # nothing written
    assert main([*common, "--out", str(tmp_path / "q"), "--vram", "1MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vram 1MiB is too small" in err[0] and "smallest needs" in err[0]
    for bad in ("12", "-3GiB"):
        assert main([*common, "--out", str(tmp_path / "r"), f"--vram={bad}"]) == 2
        assert "--vram must be a positive size with a unit" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "s"), "--vram", "64GiB"]) == 0   # fits: trains
    assert (tmp_path / "s" / "loss.csv").is_file()


def test_full_size_wan_5b_finetune_is_traced_without_weights():
    # the model: Wan 2.2 TI2V-5B at 832x480, a 2 s clip (1 s of history, 1 s target), LoRA
    # rank 16; built on fake tensors from the preset's configs (no folder, no weights)
    from pfp import memory
    from pfp.train.memory import choose_training, trace_training_preset
    gib = 1 << 30
    trace = trace_training_preset(memory.preset("wan22-ti2v-5b-480p"), batch_size=1, clip_chunks=2, lora_rank=16)
    assert abs(trace.frozen / gib - 9.31) < 0.05 and abs(trace.text / gib - 10.58) < 0.05
    assert trace.target_tokens == 2340 and trace.context_tokens == 54
    assert 0.3 < trace.trainable / gib < 0.6          # rank-16 adapters and the compressor, with AdamW's states
    assert trace.transient["step"] > trace.transient["text"]
    whole = choose_training(trace, 80 * gib)
    assert whole.fits and whole.choices == {"weights": "native", "offload": "none", "text": "gpu", "swap": False,
                                            "encode": "whole"}
    mid = choose_training(trace, 24 * gib)
    assert mid.fits and mid.peak_bytes <= 24 * gib
    # 12 GiB: the bf16 transformer alone is 9.3 GiB, so its blocks go to fp8 or the host
    small = choose_training(trace, 12 * gib)
    assert small.fits and small.peak_bytes <= 12 * gib
    assert small.choices["weights"] == "fp8" or small.choices["offload"] == "block", small.choices
    eight = choose_training(trace, 8 * gib)
    assert eight.fits and eight.choices["offload"] == "block", eight.choices


def test_a_bf16_wan_backbone_finetunes(tmp_path):
    # a preset's transformer is read in bf16, and its compressor is built in the patch embedding's
    # dtype: the losses hand the compressor its own dtype (fp32 latents were refused before)
    import dataclasses
    pytest.importorskip("diffusers")
    from pfp.train import TrainArgs, train

    from pfp.backbones import WanBackbone
    from _tiny_pfp import TINY_WAN, write_config
    torch.manual_seed(0)
    WanBackbone.from_config(**{**TINY_WAN, "in_channels": 12, "out_channels": 12}).transformer.save_pretrained(
        tmp_path / "wan")
    config = dataclasses.replace(tiny_config(), dit={"kind": "wan", "path": str(tmp_path / "wan"), "dtype": "bf16"},
                                 vae={"kind": "patch", "spatial_factor": 2, "temporal_factor": 1})   # 12 channels
    path = write_config(tmp_path / "cfg.json", config)
    out = train(TrainArgs(mode="finetune", config=path, steps=2, batch_size=2, clip_seconds=1.0, workers=0,
                          out=str(tmp_path / "run"), lora_rank=2, progress=False, save_every=2))
    assert out["model"].compressor.dtype == torch.bfloat16 and out["loss"] == out["loss"]   # finite, not NaN


def test_train_runs_a_chosen_plan_and_resumes_from_the_original_weights(tmp_path, monkeypatch):
    # pfp.train under --vram with the blocks in fp8 and offloaded (forced: on a CPU the allowance
    # decides every budget): it trains and exports; its LoRA checkpoints leave the frozen base out
    # and fingerprint it as built, not as its fp8 rounding, so a resume under the same plan goes on
    import pfp.train.memory as train_memory
    from pfp.config import PFPConfig
    from pfp.train import TrainArgs, train
    from pfp.train.checkpoint import latest_checkpoint, load_checkpoint
    from pfp.train.loop import _fingerprint, _frozen_params, _set_trainable, apply_lora
    from pfp.weights import build_model
    monkeypatch.setattr(train_memory, "choose_training", lambda trace, budget, cached: train_memory.estimate_training(
        trace, {"weights": "fp8", "offload": "block", "swap": True}, None, cached))
    args = TrainArgs(mode="finetune", steps=2, batch_size=2, clip_seconds=1.0, workers=0, lora_rank=2,
                     out=str(tmp_path / "run"), progress=False, save_every=2, vram="64GiB",
                     export=str(tmp_path / "ft.safetensors"))
    out = train(args)
    assert out["loss"] == out["loss"] and (tmp_path / "ft.safetensors").is_file()   # finite; exported
    saved, state = load_checkpoint(latest_checkpoint(str(tmp_path / "run")), restore_rng=False)
    assert not any(k.endswith(".base_layer.weight") for k in saved) and any("lora_" in k for k in saved)
    torch.manual_seed(0)                     # what pfp.train built (seed 0, the built-in config)
    built = build_model(PFPConfig())
    apply_lora(built, 2)
    _set_trainable(built, args, lora=True)
    assert state["frozen_base"]["sha256"] == _fingerprint(_frozen_params(built))
    args.steps, args.resume = 4, True
    assert train(args)["step"] == 4
