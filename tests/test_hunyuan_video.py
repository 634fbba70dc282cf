"""HunyuanVideo backbone: parity with diffusers' forward and blocks, both context modes, masks, LoRA."""
import copy
import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import HunyuanVideoTransformer3DModel  # noqa: E402

from pfp.backbones import grid_positions  # noqa: E402
from pfp.backbones.hunyuan_video import HunyuanVideoBackbone, pack_text  # noqa: E402
from pfp.compressor import Context  # noqa: E402

from _tiny_pfp import TINY_HUNYUAN, tiny_hunyuan_backbone  # noqa: E402


def _upstream(scale: float = 0.0):
    """A seeded tiny diffusers model; ``scale`` > 0 redraws every parameter from N(0, scale) (default
    inits leave some paths near zero, which would hide a wrong one)."""
    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(**TINY_HUNYUAN).eval()
    if scale:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, scale)
    return m


def _text(batch=2, length=7, pad_from=4, pooled=True):
    g = torch.Generator().manual_seed(3)
    states = torch.randn(batch, length, 16, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if pad_from is not None:
        mask[-1, pad_from:] = False
    pool = torch.randn(batch, 8, generator=g) if pooled else torch.zeros(batch, 8)
    return states, mask, pool


def _diffusers_forward(model, x, t, states, mask, pooled, dtype=None):
    dtype = dtype or x.dtype
    guidance = torch.full((x.shape[0],), 6.0, dtype=dtype) * 1000.0
    return model(x.to(dtype), t * 1000, states.to(dtype), mask.long(), pooled.to(dtype), guidance=guidance,
                 return_dict=False)[0]


@pytest.mark.parametrize("pad_from", [None, 4, 1])
def test_matches_diffusers_forward_in_fp32(pad_from):
    up = _upstream(0.3)
    bb = HunyuanVideoBackbone(copy.deepcopy(up)).eval()
    x, t = torch.randn(2, 4, 3, 6, 8), torch.tensor([0.3, 0.8])
    states, mask, pooled = _text(pad_from=pad_from)
    with torch.no_grad():
        want = _diffusers_forward(up, x, t, states, mask, pooled)
        got = bb(x, t, *pack_text(states, mask, pooled)[:1], text_mask=pack_text(states, mask, pooled)[1])
    torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loaded_in_reduced_precision_matches_diffusers_within_one_step(tmp_path, dtype):
    _upstream().save_pretrained(tmp_path / "hy")
    up = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "hy", torch_dtype=dtype).eval()
    bb = HunyuanVideoBackbone.from_pretrained(str(tmp_path / "hy"), torch_dtype=dtype).eval()
    assert bb.compute_dtype == dtype
    x, t = torch.randn(2, 4, 3, 6, 8), torch.tensor([0.3, 0.8])
    states, mask, pooled = _text()
    text, tm = pack_text(states, mask, pooled)
    with torch.no_grad():
        want = _diffusers_forward(up, x, t, states, mask, pooled, dtype).float()
        got = bb(x, t, text, text_mask=tm)   # fp32 latents and text in, the model's dtype out
    assert got.dtype == dtype
    # one step of the dtype at the output's largest magnitude, plus the rounding (half a step of the
    # binade below) of a value just under a power of two on one side and over it on the other
    one_step = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(want.abs().max().item()))
    assert (got.float() - want).abs().max() <= 1.5 * one_step, ((got.float() - want).abs().max(), one_step)


def _reference_with_context(model, x_full, n_ctx_frames, states, mask, pooled, mode, ctx_valid=None):
    """diffusers' own modules over ``[context frames ; target frames ; text]`` at timestep 0, with
    an attention mask saying who reads whom: ``joint``, every token reads every real token;
    ``cached``, context tokens read only context tokens of the same or an earlier frame. Returns
    the target frames' velocity."""
    b, _, t, h, w = x_full.shape
    p = model.config.patch_size
    hw = (h // p) * (w // p)
    nc = n_ctx_frames * hw
    zeros = torch.zeros(b)
    guidance = torch.full((b,), 6.0) * 1000.0
    rope = model.rope(x_full)
    temb, _ = model.time_text_embed(zeros, pooled, guidance)
    hidden = model.x_embedder(x_full)
    text = model.context_embedder(states, zeros, mask)
    n_latent, n = hidden.shape[1], hidden.shape[1] + text.shape[1]
    valid = torch.cat([torch.ones(b, n_latent, dtype=torch.bool), mask], 1)
    if ctx_valid is not None:
        valid[:, :nc] = ctx_valid
    allowed = valid[:, None, :].expand(b, n, n).clone()
    if mode == "cached":
        frame = torch.arange(nc) // hw
        allowed[:, :nc, :] = False
        allowed[:, :nc, :nc] = (frame[None, :] <= frame[:, None])[None] & valid[:, None, :nc]
        allowed[:, torch.arange(nc), torch.arange(nc)] = True   # a padded context token reads itself
    attn_mask = allowed[:, None]
    for blk in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        hidden, text = blk(hidden, text, temb, attn_mask, rope)
    out = model.proj_out(model.norm_out(hidden, temb))[:, nc:]
    tt = t - n_ctx_frames
    out = out.reshape(b, tt, h // p, w // p, -1, 1, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _as_context(bb, x_ctx, valid=None):
    """The context frames as context tokens (the patch embedding), on their own grid positions."""
    tokens = bb.patch_embedding(x_ctx).flatten(2).transpose(1, 2)
    _, _, t, h, w = x_ctx.shape
    grid = bb.token_grid(t, h, w)
    return Context(tokens, grid_positions(*grid), valid)


@pytest.mark.parametrize("mode", ["joint", "cached"])
@pytest.mark.parametrize("context_padding", [False, True])
def test_context_modes_match_diffusers_blocks_over_context_and_target(mode, context_padding):
    # with every token at timestep 0 and an empty pooled text the three streams share one
    # modulation, so the context's tokens are what diffusers' own blocks see as earlier frames
    up = _upstream(0.2)
    bb = HunyuanVideoBackbone(copy.deepcopy(up), context_mode=mode).eval()
    k = 2
    x_full = torch.randn(2, 4, k + 2, 4, 6)
    states, mask, pooled = _text(pooled=False)
    hw = 2 * 3
    valid = None
    if context_padding:   # sample 1 has one real context frame of two
        valid = torch.ones(2, k * hw, dtype=torch.bool)
        valid[1, hw:] = False
    with torch.no_grad():
        want = _reference_with_context(up, x_full, k, states, mask, pooled, mode, valid)
        ctx = _as_context(bb, x_full[:, :, :k], valid)
        text, tm = pack_text(states, mask, pooled)
        got = bb(x_full[:, :, k:], torch.zeros(2), text, ctx, t_start=k, text_mask=tm)
        torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)
        if mode == "cached":   # the same through a cache, built whole and frame by frame
            whole = bb.cache_context(ctx)
            first = bb.cache_context(Context(ctx.tokens[:, :hw], ctx.positions[:hw],
                                             None if valid is None else valid[:, :hw]))
            grown = bb.cache_context(Context(ctx.tokens[:, hw:], ctx.positions[hw:],
                                             None if valid is None else valid[:, hw:]), first)
            assert len(whole.keys) == len(bb.blocks) == 4
            for cache in (whole, grown):
                got = bb(x_full[:, :, k:], torch.zeros(2), text, cache, t_start=k, text_mask=tm)
                torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)


def test_cached_context_is_prompt_free_and_shared_by_the_batch():
    bb = tiny_hunyuan_backbone("cached")
    ctx = _as_context(bb, torch.randn(1, 4, 2, 4, 6))
    x, t = torch.randn(2, 4, 2, 4, 6), torch.tensor([0.4, 0.7])
    states, mask, pooled = _text()
    text, tm = pack_text(states, mask, pooled)
    with torch.no_grad():
        cache = bb.cache_context(ctx)            # one history, computed once, with no prompt at all
        both = bb(x, t, text, cache, t_start=2, text_mask=tm)
        for i in range(2):                       # the batch-1 cache serves each sample as its own
            alone = bb(x[i:i + 1], t[i:i + 1], text[i:i + 1], cache, t_start=2, text_mask=tm[i:i + 1])
            torch.testing.assert_close(both[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        none = bb(x, t, text, None, t_start=2, text_mask=tm)
    assert (both - none).abs().max() > 1e-3      # the context is read


def test_context_mask_equals_each_sample_alone():
    bb = tiny_hunyuan_backbone("cached")
    hw = 6
    tokens = torch.randn(2, 2 * hw, bb.inner_dim)
    positions = grid_positions(2, 2, 3)
    valid = torch.ones(2, 2 * hw, dtype=torch.bool)
    valid[0, hw:] = False
    x, t = torch.randn(2, 4, 2, 4, 6), torch.tensor([0.4, 0.7])
    states, mask, pooled = _text()
    text, tm = pack_text(states, mask, pooled)
    for mode in ("cached", "joint"):
        bb.context_mode = mode
        with torch.no_grad():
            ctx = Context(tokens, positions, valid)
            both = bb(x, t, text, bb.cache_context(ctx) if mode == "cached" else ctx, t_start=2, text_mask=tm)
            junk = tokens.clone()
            junk[~valid] = 1e3
            again = bb(x, t, text, Context(junk, positions, valid), t_start=2, text_mask=tm)
            torch.testing.assert_close(again, both, atol=2e-5, rtol=1e-5)
            for i, n in enumerate((hw, 2 * hw)):
                alone = bb(x[i:i + 1], t[i:i + 1], text[i:i + 1], Context(tokens[i:i + 1, :n], positions[:n]),
                           t_start=2, text_mask=tm[i:i + 1])
                torch.testing.assert_close(both[i:i + 1], alone, atol=2e-5, rtol=1e-5)



@pytest.mark.parametrize("context_masked", [False, True])
def test_denoising_through_context_kv_buffers_equals_the_plain_cache(context_masked):
    # The buffers' tails hold the target's and the text's K/V, the text's padding as their key mask
    # (sample 0's prompt is padded, sample 1's not); every step equals the plain cache's velocity
    bb = tiny_hunyuan_backbone("cached")
    hw = 6
    valid = torch.ones(1, 2 * hw, dtype=torch.bool)
    if context_masked:
        valid[0, 3:7] = False
    ctx = Context(torch.randn(1, 2 * hw, bb.inner_dim), grid_positions(2, 2, 3), valid)
    states, mask, pooled = _text()
    text, tm = pack_text(states, mask, pooled)
    first = None
    with torch.no_grad():
        cache = bb.cache_context(ctx)
        for step, t in enumerate((torch.tensor([0.9, 0.8]), torch.tensor([0.4, 0.3]))):
            x = torch.randn(2, 4, 2, 4, 6)
            bb.use_context_kv_buffers(False)
            want = bb(x, t, text, cache, t_start=2, text_mask=tm)
            bb.use_context_kv_buffers(True)
            got = bb(x, t, text, cache, t_start=2, text_mask=tm)
            torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=0)
            buffers = cache._joint
            assert buffers is not None and len(buffers) == len(bb.blocks)
            if step == 1:
                assert buffers is first
            first = buffers
        nt = 2 * 2 * 3
        assert buffers[0].capacity > nt   # the text's K/V too
        buffers[-1].values[:, : cache.num_tokens].fill_(1e3)   # the steps read the context from the buffers
        assert (bb(x, t, text, cache, t_start=2, text_mask=tm) - want).abs().max() > 1e-3
    bb.use_context_kv_buffers(False)

def test_per_token_timesteps():
    bb = tiny_hunyuan_backbone()
    x = torch.randn(1, 4, 2, 4, 6)
    states, mask, pooled = _text(batch=1, pad_from=None)
    text, tm = pack_text(states, mask, pooled)
    with torch.no_grad():
        one = bb(x, torch.tensor([0.6]), text, text_mask=tm)
        per_frame = bb(x, torch.tensor([[0.6, 0.6]]), text, text_mask=tm)
        per_token = bb(x, torch.full((1, 12), 0.6), text, text_mask=tm)
        mixed = bb(x, torch.tensor([[0.2, 0.6]]), text, text_mask=tm)
    torch.testing.assert_close(per_frame, one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(per_token, one, atol=1e-6, rtol=1e-6)
    assert (mixed - one).abs().max() > 1e-3


def test_every_block_call_goes_through_the_block_module_and_checkpointing_recomputes():
    bb = tiny_hunyuan_backbone("cached")
    calls = []
    for i, blk in enumerate(bb.blocks):
        blk.register_forward_pre_hook(lambda m, args, i=i: calls.append(i))
    ctx = _as_context(bb, torch.randn(1, 4, 1, 4, 6))
    x, t = torch.randn(2, 4, 2, 4, 6), torch.tensor([0.4, 0.7])
    text, tm = pack_text(*_text())
    with torch.no_grad():
        cache = bb.cache_context(ctx)
        assert calls == [0, 1, 2, 3]
        calls.clear()
        bb(x, t, text, cache, t_start=1, text_mask=tm)
        assert calls == [0, 1, 2, 3]
    calls.clear()
    bb.set_gradient_checkpointing(True)
    bb(x, t, text, ctx, t_start=1, text_mask=tm).square().mean().backward()
    assert all(calls.count(i) == 2 for i in range(4)), calls
    assert bb.patch_embedding.weight.grad is not None


def test_lora_targets_the_blocks_only_and_trains():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from pfp.train.loop import lora_target_modules
    bb = tiny_hunyuan_backbone("joint")
    peft_bb = get_peft_model(bb, LoraConfig(r=2, lora_alpha=2, target_modules=lora_target_modules(bb)))
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in peft_bb.named_parameters() if ".lora_A." in n})
    # per dual block: 8 attention + 4 MLP linears; per single block: q, k, v, proj_mlp, proj_out
    assert len(wrapped) == 2 * 12 + 2 * 5, wrapped
    assert not any("context_embedder" in n or n.endswith("transformer.proj_out") for n in wrapped)
    ctx = _as_context(bb, torch.randn(1, 4, 1, 4, 6))
    text, tm = pack_text(*_text())
    out = peft_bb(torch.randn(2, 4, 2, 4, 6), torch.tensor([0.4, 0.7]), text, ctx, t_start=1, text_mask=tm)
    out.square().mean().backward()
    grads = [p.grad for n, p in peft_bb.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_bad_inputs_are_refused_with_the_reason():
    bb = tiny_hunyuan_backbone()
    x, t = torch.randn(1, 4, 2, 4, 6), torch.tensor([0.5])
    text, tm = pack_text(*_text(batch=1))
    with pytest.raises(ValueError, match="condition"):
        bb(x, t, text, text_mask=tm, condition=torch.randn(1, 4, 2, 4, 6))
    with pytest.raises(ValueError, match="text states must be 16 wide"):
        bb(x, t, torch.randn(1, 5, 12))
    with pytest.raises(ValueError, match="pack_text"):
        bb(x, t, torch.randn(1, 1, 16))
    with pytest.raises(ValueError, match="cross-attention"):
        bb.add_memory_attention(32)
    with pytest.raises(ValueError, match="image_condition_type"):
        HunyuanVideoBackbone(HunyuanVideoTransformer3DModel(**{**TINY_HUNYUAN, "image_condition_type": "latent_concat",
                                                               "in_channels": 9}))


def test_text_encoder_matches_the_pipelines_encode_prompt(tmp_path):
    from diffusers import HunyuanVideoPipeline

    from _tiny_pfp import save_tiny_hunyuan_text
    from pfp.backbones.hunyuan_video import unpack_text
    from pfp.text import HUNYUAN_PROMPT_TEMPLATE, HunyuanTextEncoder
    crop = save_tiny_hunyuan_text(tmp_path)
    enc = HunyuanTextEncoder.from_pretrained(tmp_path, max_length=10, crop_start=crop)
    pipe = HunyuanVideoPipeline(text_encoder=enc.llama, tokenizer=enc.tokenizer, transformer=None, vae=None,
                                scheduler=None, text_encoder_2=enc.clip, tokenizer_2=enc.clip_tokenizer)
    prompts = ["a red circle on the background", "blue square"]
    want, want_pooled, want_mask = pipe.encode_prompt(
        prompts, prompt_template={"template": HUNYUAN_PROMPT_TEMPLATE, "crop_start": crop}, max_sequence_length=10,
        device=torch.device("cpu"))
    out = enc(prompts)
    assert out.tokens.shape == (2, 11, 16) and out.mask.dtype == torch.bool
    states, mask, pooled = unpack_text(out.tokens, out.mask, 8)
    assert torch.equal(mask, want_mask.bool())
    torch.testing.assert_close(states, want * want_mask[..., None], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="lacks text_encoder_2, tokenizer_2"):
        import shutil
        shutil.rmtree(tmp_path / "text_encoder_2")
        shutil.rmtree(tmp_path / "tokenizer_2")
        HunyuanTextEncoder.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# the whole model from a local pipeline folder: config kinds, generation, training, checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory):
    """A tiny HunyuanVideo pipeline folder: transformer/, vae/ and the two text encoders."""
    from diffusers import AutoencoderKLHunyuanVideo

    from _tiny_pfp import save_tiny_hunyuan_text
    root = tmp_path_factory.mktemp("hunyuan")
    crop = save_tiny_hunyuan_text(root)
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(**TINY_HUNYUAN)
    with torch.no_grad():   # diffusers zero-inits nothing here, but make the head clearly non-trivial
        transformer.proj_out.weight.normal_(0, 0.1)
    transformer.save_pretrained(root / "transformer")
    AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                              norm_num_groups=4).save_pretrained(root / "vae")
    return root, crop


def _hunyuan_config(root, crop, mode="cached"):
    from pfp.config import PFPConfig
    return PFPConfig(video_size=(64, 64), fps=8.0, chunk_frames=8, rate="2x2x2", compressor_hidden=(8, 8, 8),
                     context_mode=mode, vae={"kind": "hunyuan", "path": str(root)},
                     text={"kind": "hunyuan", "path": str(root), "max_length": 8, "crop_start": crop},
                     dit={"kind": "hunyuan_video", "path": str(root)}, sample_cfg=1.0)


@pytest.mark.parametrize("mode", ["cached", "joint"])
def test_generates_from_a_pipeline_folder_and_the_context_streams_exactly(hunyuan_dir, mode):
    from pfp.generate import generate
    from pfp.text import Storyboard
    from pfp.weights import build_model
    torch.manual_seed(0)
    model = build_model(_hunyuan_config(*hunyuan_dir, mode))
    assert isinstance(model.backbone, HunyuanVideoBackbone) and model.text_encoder.dim == 16
    with torch.no_grad():
        model.compressor.proj.weight.normal_(0, 0.1)
    story = Storyboard.from_list([{"start": 0, "end": 1, "prompt": "a red circle"},
                                  {"start": 1, "end": 3, "prompt": "a blue square on the background"}])
    res = generate(model, story, 3.0, steps=2, progress=False)
    assert res.video.shape == (3, 21, 64, 64) and torch.isfinite(res.video).all()
    assert res.latents.shape == (1, 4, 6, 8, 8)
    with torch.no_grad():   # the streamed context is one compressor call over the streamed latents
        full = model.compressor(res.latents, res.lr_latents)
        torch.testing.assert_close(res.context.tokens, full.tokens, atol=1e-5, rtol=1e-5)
        if mode == "cached":
            kv = model.backbone.cache_context(full)
            for a, b in zip(res.context_cache.keys + res.context_cache.values, kv.keys + kv.values):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the [context ; target ; text] buffers give the same video
    again = generate(model, story, 3.0, steps=2, progress=False, plan={"kv": "buffer"})
    torch.testing.assert_close(again.video, res.video, atol=1e-4, rtol=0)


def test_pretrains_finetunes_with_lora_and_refuses_another_models_checkpoint(hunyuan_dir, tmp_path, capsys):
    pytest.importorskip("peft")
    from pfp.generate import generate
    from pfp.text import Storyboard
    from pfp.train.__main__ import main
    from pfp.weights import load_weights

    from _tiny_pfp import tiny_config, write_config
    path = write_config(tmp_path / "cfg.json", _hunyuan_config(*hunyuan_dir))
    common = ["--steps", "2", "--batch-size", "2", "--clip-seconds", "2", "--workers", "0", "--no-progress",
              "--threads", "1", "--save-every", "2"]
    pre, ft = tmp_path / "pre.safetensors", tmp_path / "ft.safetensors"
    assert main(["pretrain", "--config", path, "--out", str(tmp_path / "pre"), "--export", str(pre), *common]) == 0
    assert main(["finetune", "--config", path, "--init", str(pre), "--lora-rank", "2", "--out", str(tmp_path / "ft"),
                 "--export", str(ft), *common]) == 0
    before, after = load_weights(str(pre)).backbone, load_weights(str(ft)).backbone
    a = after.blocks[0].attn.add_q_proj.weight        # a text-stream projection of a dual block
    assert not torch.equal(a, before.blocks[0].attn.add_q_proj.weight)   # its LoRA trained and was merged
    res = generate(load_weights(str(ft)), Storyboard.single("a red circle", 1.0), 1.0, steps=2, progress=False)
    assert torch.isfinite(res.video).all()
    # a checkpoint of another model (the tiny Wan-style DiT) is refused, naming what does not fit
    other = write_config(tmp_path / "tiny.json", tiny_config())
    tiny = tmp_path / "tiny.safetensors"
    assert main(["pretrain", "--config", other, "--out", str(tmp_path / "t"), "--export", str(tiny), *common]) == 0
    capsys.readouterr()
    assert main(["finetune", "--config", path, "--init", str(tiny), "--out", str(tmp_path / "x"), *common]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "from another config" in errors[0] and "backbone.transformer." in errors[0], errors


def test_config_refuses_a_mismatched_text_encoder_and_bad_keys(hunyuan_dir):
    import dataclasses
    cfg = _hunyuan_config(*hunyuan_dir)
    with pytest.raises(ValueError, match="go together"):
        dataclasses.replace(cfg, text={"kind": "tiny", "dim": 16}).check()
    with pytest.raises(ValueError, match="dit.guidance"):
        dataclasses.replace(cfg, dit={**cfg.dit, "guidance": -1}).check()
    with pytest.raises(ValueError, match="vae.warmup"):
        dataclasses.replace(cfg, vae={**cfg.vae, "warmup": 0}).check()
    with pytest.raises(ValueError, match="holds a 'AutoencoderKLHunyuanVideo' model"):
        dataclasses.replace(cfg, dit={"kind": "hunyuan_video", "path": str(hunyuan_dir[0]), "subfolder": "vae"}).check()


# ----------------------------------------------------------------------------------------------
# the memory planner: full-size HunyuanVideo traced without weights
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hunyuan_trace():
    from pfp import memory
    return memory.trace_preset(memory.preset("hunyuanvideo-13b-480p"), history_seconds=20)


def test_the_planner_traces_full_size_hunyuan_video_and_fits_12_and_80_gib(hunyuan_trace):
    from pfp import memory
    gib = 1 << 30
    trace = hunyuan_trace
    # 12.8 B parameters in bf16 (the 23.9 GiB), 60 blocks of context K/V at inner 3072
    assert abs(trace.transformer / gib - 23.9) < 0.1, trace.transformer / gib
    assert trace.layers == 60 and trace.target_tokens == 6 * 30 * 53
    assert trace.kv == 2 * 60 * trace.context_tokens * 3072 * 2
    whole = memory.choose(trace, 80 * gib)
    assert whole.fits and whole.choices["weights"] == "native" and whole.choices["offload"] == "none"
    # its blocks attend over [context ; target ; text]: each buffer's tail holds the 256 text K/V too
    # (CFG batch 2); 80 GiB has room for them, 24 GiB does not
    assert trace.kv_buffers == 2 * 60 * 2 * (trace.context_tokens + trace.target_tokens + 256) * 3072 * 2
    assert whole.choices["kv"] == "buffer" and all(ph.peak_bytes <= 80 * gib for ph in whole.phases)
    assert memory.choose(trace, 24 * gib).choices["kv"] != "buffer"
    small = memory.choose(trace, 12 * gib)
    assert small.fits and all(ph.peak_bytes <= 12 * gib for ph in small.phases)
    assert small.choices["weights"] == "fp8" and small.choices["offload"] == "block", small.choices
    # its VAE has no causal cache to keep, so 4x4 tiles shrink the decode: 8 GiB fits with them
    assert trace.transient["decode_tiled4"] < trace.transient["decode_tiled"] < trace.transient["decode"]
    eight = memory.choose(trace, 8 * gib)
    assert eight.fits and eight.choices["decode"] == "tiled4", eight.choices
    tiny = memory.choose(trace, 2 * gib)     # nothing fits: the smallest plan, to name in the refusal
    assert not tiny.fits and tiny.peak_bytes > 2 * gib and "smallest needs" in tiny.too_small("--vram 2GiB", "x")


def test_hunyuan_presets_build_configs_that_name_their_folders(tmp_path):
    from pfp import memory
    cfg = memory.preset_config(memory.preset("hunyuanvideo-13b-720p", rate="2x2x2"), str(tmp_path))
    assert cfg.dit["kind"] == "hunyuan_video" and cfg.text["kind"] == "hunyuan" and cfg.vae["kind"] == "hunyuan"
    assert cfg.rate == "2x2x2" and tuple(cfg.video_size) == (720, 1280) and cfg.sample_cfg == 1.0
    assert memory.preset("wan22-a14b-480p").experts == 2       # the name for the A14B preset
    with pytest.raises(ValueError, match="lacks|no config.json"):
        cfg.check()                                            # an empty folder is refused, naming what it lacks


@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_sampler_matches_hunyuan_video_pipeline_given_the_same_sigmas(true_cfg):
    # the whole conditioning path against diffusers' own pipeline: embedded guidance, the refined
    # and masked text, the pooled vector, the flow shift and (true_cfg > 1) a negative prompt
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    from pfp.sampler import sample
    steps, shift = 4, 7.0
    up = _upstream()
    bb = HunyuanVideoBackbone(copy.deepcopy(up)).eval()
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=up, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=None,
                                tokenizer_2=None)
    states, mask, pooled = _text(batch=2, length=6, pad_from=3)
    shape = (1, 4, 2, 4, 6)
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = pipe(prompt_embeds=states[:1], pooled_prompt_embeds=pooled[:1], prompt_attention_mask=mask[:1].long(),
                    negative_prompt_embeds=states[1:], negative_pooled_prompt_embeds=pooled[1:],
                    negative_prompt_attention_mask=mask[1:].long(), true_cfg_scale=true_cfg, guidance_scale=6.0,
                    latents=noise.clone(), height=32, width=48, num_frames=5, num_inference_steps=steps,
                    output_type="latent").frames
    text, tm = pack_text(states, mask, pooled)
    got = sample(bb, shape, text[:1], None, text_mask=tm[:1], uncond_text=text[1:], uncond_text_mask=tm[1:],
                 steps=steps, shift=shift, cfg=true_cfg, seed=3)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# training plans: the VAE's tiled encode
# ----------------------------------------------------------------------------------------------
def _small_tiles(vae):
    """Tile sizes that make diffusers tile a 64x64, 9-frame clip (its defaults: 256 px, 16 frames)."""
    m = vae.model
    m.tile_sample_min_height = m.tile_sample_min_width = 32
    m.tile_sample_stride_height = m.tile_sample_stride_width = 24
    m.tile_sample_min_num_frames, m.tile_sample_stride_num_frames = 4, 4


def test_tiled_encoding_runs_diffusers_tiled_encode_and_restores_the_whole_one(hunyuan_dir):
    from pfp.vae import HunyuanVAE
    vae = HunyuanVAE.from_pretrained(hunyuan_dir[0], subfolder="vae")
    _small_tiles(vae)
    torch.manual_seed(0)
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(video)
        with vae.tiled_encoding():
            assert vae.model.use_tiling and vae.model.use_framewise_encoding
            tiled = vae.encode(video)
        again = vae.encode(video)
    assert not vae.model.use_tiling and not vae.model.use_framewise_encoding
    assert torch.equal(whole, again) and tiled.shape == whole.shape
    err = ((tiled - whole).norm() / whole.norm()).item()
    # an approximation (each tile's GroupNorms see that tile): 0.73 of the latents' norm here, with
    # random weights, noise for a video and tiles of 32 px; real weights on real video were not measured
    assert 0 < err < 1, err


def test_a_tiled_encode_plan_traces_smaller_and_trains(hunyuan_dir, monkeypatch):
    # the training planner traces the tiled encode beside the whole one; TrainPlacement runs the
    # losses' encodes through it; a VAE without tiling is never offered it
    pytest.importorskip("peft")
    from pfp.offload import TrainPlacement
    from pfp.train.loop import _set_trainable, apply_lora, TrainArgs
    from pfp.train.memory import all_training_plans, estimate_training, trace_training
    from pfp.train.objectives import ObjectiveConfig, pretrain_loss
    from pfp.weights import build_model
    torch.manual_seed(0)
    model = build_model(_hunyuan_config(*hunyuan_dir))
    _small_tiles(model.vae)
    apply_lora(model, 2)
    _set_trainable(model, TrainArgs(mode="finetune"), lora=True)
    trace = trace_training(model, batch_size=1, clip_chunks=1)
    assert trace.encode_tiled is not None and trace.encode_tiled < trace.transient["encode"]
    assert trace.encode_tiled_extra_flops > 0
    plans = {p.choices["encode"]: p for p in all_training_plans(trace, None) if p.choices["weights"] == "native"
             and p.choices["offload"] == "none" and p.choices["text"] == "gpu" and not p.choices["swap"]}
    encode_peak = {k: next(ph.peak_bytes for ph in p.phases if ph.name == "encode") for k, p in plans.items()}
    assert encode_peak["tiled"] < encode_peak["whole"]

    calls = []
    tiled_encode = model.vae.model.tiled_encode
    monkeypatch.setattr(model.vae.model, "tiled_encode", lambda x: calls.append(x.shape) or tiled_encode(x))
    from pfp.train.loop import _batch, _dataset
    batch = _batch(_dataset(TrainArgs(clip_seconds=1.0), model.config), torch.Generator().manual_seed(0), 1)
    assert batch["hr"].shape[2] > 4        # more frames than a tile: diffusers tiles it in time too
    losses = {}
    for encode in ("whole", "tiled"):
        placement = TrainPlacement(model, "cpu", {"encode": encode})
        gen = torch.Generator().manual_seed(0)
        losses[encode] = pretrain_loss(model, model.backbone, batch, gen, ObjectiveConfig(), torch.device("cpu"),
                                       phases=placement).item()
        placement.close()
        assert bool(calls) == (encode == "tiled")
    # measured 1.1343 against 1.1456 (1%): the tiny VAE's latents differ, the objective barely
    assert abs(losses["tiled"] - losses["whole"]) < 0.1 * abs(losses["whole"]), losses

    from _tiny_pfp import tiny_config
    tiny = build_model(tiny_config())
    _set_trainable(tiny, TrainArgs(mode="pretrain"), lora=False)
    tiny_trace = trace_training(tiny, batch_size=1, clip_chunks=1)
    assert tiny_trace.encode_tiled is None
    assert {p.choices["encode"] for p in all_training_plans(tiny_trace, None)} == {"whole"}
    with pytest.raises(ValueError, match="encode='tiled' needs a VAE with tiled_encoding"):
        estimate_training(tiny_trace, {"encode": "tiled"}, None)
    with pytest.raises(ValueError, match="encode='tiled' needs a VAE with tiled_encoding"):
        TrainPlacement(tiny, "cpu", {"encode": "tiled"})


def test_full_size_hunyuan_video_finetune_fits_12_gib_with_a_tiled_encode():
    # HunyuanVideo's VAE normalises over every frame, so a whole 2 s 848x480 clip traces to ~33 GiB
    # of encoder activations; its tiled encode to ~1.5 GiB, which with fp8 blocks offloaded fits 12 GiB
    from pfp import memory
    from pfp.train.memory import choose_training, trace_training_preset
    gib = 1 << 30
    trace = trace_training_preset(memory.preset("hunyuanvideo-13b-480p"), batch_size=1, clip_chunks=2, lora_rank=16)
    assert trace.transient["encode"] > 20 * gib and trace.encode_tiled < 3 * gib
    assert trace.transient["step"] < 12 * gib   # the attention backward traced as the O(N) flash one, not scores
    whole = choose_training(trace, 80 * gib)
    assert whole.fits and whole.choices["encode"] == "whole" and whole.choices["weights"] == "native"
    small = choose_training(trace, 12 * gib)
    assert small.fits and small.choices["encode"] == "tiled" and small.choices["offload"] == "block", small.choices
    assert not choose_training(trace, 8 * gib).fits
