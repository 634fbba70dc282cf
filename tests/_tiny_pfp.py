"""A very small PFP config shared by the training and generation tests (fast on a CPU)."""
import json

from pfp.weights import PFPConfig


def tiny_config(context_mode: str = "cached", inner_dim: int = 32) -> PFPConfig:
    return PFPConfig(
        video_size=(32, 32), fps=8.0, chunk_frames=4, rate="2x2x2", compressor_hidden=(8, 8, 8),
        context_mode=context_mode,
        vae={"kind": "patch", "spatial_factor": 4, "temporal_factor": 1, "scale": 2.0},
        text={"kind": "tiny", "dim": 16, "max_length": 12, "num_layers": 0},
        dit={"kind": "tiny", "inner_dim": inner_dim, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "freq_dim": 16},
    )


def fixed_batch_losses(mode: str, device: str = "cpu", autocast_dtype=None, steps: int = 8) -> list:
    """Losses of ``steps`` AdamW steps of the tiny model on one fixed batch, with the same Omega,
    noise and t every step (so a working training step must lower them)."""
    import torch

    from pfp.train import ObjectiveConfig, TrainArgs, step_generator
    from pfp.train.loop import _batch, _dataset, _LossModule
    from pfp.weights import build_model
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).to(device)
    batch = _batch(_dataset(TrainArgs(clip_seconds=1.0), cfg), step_generator(0, 0, 0, "data"), 2)
    lm = _LossModule(model, mode, ObjectiveConfig(), 4, torch.device(device), autocast_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = lm(batch, step_generator(0, 0, 0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def write_config(path, config: PFPConfig) -> str:
    with open(path, "w") as f:
        json.dump(config.to_dict(), f)
    return str(path)


def save_tiny_wan_vae(path, z_dim: int = 4, seed: int = 0):
    """Save a tiny random diffusers ``AutoencoderKLWan`` with Wan's time structure (temporal factor 4:
    1 + 4k frames) and a 4x spatial factor to ``path``; returns the model. Skips without diffusers."""
    import pytest
    import torch
    try:
        from diffusers import AutoencoderKLWan
    except Exception as e:  # pragma: no cover - environment dependent
        pytest.skip(f"diffusers AutoencoderKLWan unavailable: {e}")
    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1,
                             temperal_downsample=[True, True],
                             latents_mean=[0.05 * i for i in range(z_dim)],
                             latents_std=[1.0 + 0.1 * i for i in range(z_dim)]).eval()
    model.save_pretrained(str(path))
    return model


def save_tiny_umt5(path, seed: int = 0):
    """Save a tiny random transformers ``UMT5EncoderModel`` (d_model 32) and a locally built word-level
    tokenizer to ``path`` (the layout :class:`pfp.text.UMT5TextEncoder` loads). Skips without them."""
    import pytest
    import torch
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from tokenizers.processors import TemplateProcessing
        from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
    except Exception as e:  # pragma: no cover - environment dependent
        pytest.skip(f"transformers/tokenizers with UMT5 unavailable: {e}")
    words = "a red green blue circle square on background and the".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    model = UMT5EncoderModel(cfg).eval()
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return model, fast


def wan_config(vae_path, text_path=None, context_mode: str = "cached") -> PFPConfig:
    """The tiny config over a local Wan VAE (temporal factor 4, 4x spatial) and optionally a local UMT5:
    chunks of 8 frames = 2 latent frames (rate 2x2x2 needs an even count)."""
    text = ({"kind": "umt5", "path": str(text_path), "max_length": 8} if text_path is not None else
            {"kind": "tiny", "dim": 16, "max_length": 12, "num_layers": 0})
    return PFPConfig(
        video_size=(32, 32), fps=8.0, chunk_frames=8, rate="2x2x2", compressor_hidden=(8, 8, 8),
        context_mode=context_mode, vae={"kind": "wan", "path": str(vae_path)}, text=text,
        dit={"kind": "tiny", "inner_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "freq_dim": 16},
    )


def assert_stream_matches_full(model, res, mode: str, lr_expected) -> None:
    """What ``generate`` streamed equals the whole-video computation: the LR latents equal
    ``lr_expected`` (training's encode of to_low_res of the whole video), the context equals one
    compressor call over all latents, and in cached mode the K/V equal one ``cache_context``."""
    import torch
    with torch.no_grad():
        assert lr_expected.shape == res.lr_latents.shape
        torch.testing.assert_close(res.lr_latents, lr_expected, atol=1e-5, rtol=1e-5)
        full = model.compressor(res.latents, res.lr_latents)
        torch.testing.assert_close(res.context.tokens, full.tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res.context.positions, full.positions)
        if mode == "cached":
            kv = model.backbone.cache_context(full)
            for a, b in zip(res.context_cache.keys + res.context_cache.values, kv.keys + kv.values):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def write_video_folder(root, good: int, corrupt: int, short: int):
    """A folder of 32x32 8 fps videos with storyboards: ``good`` of 2 s, ``corrupt`` whose data after
    the first third is random bytes, and ``short`` of 2 frames."""
    import json
    import os

    import torch

    from pfp.data.video_folder import write_video
    root.mkdir()
    story = json.dumps([{"start": 0, "end": 10, "prompt": "a red circle"}])
    g = torch.Generator().manual_seed(0)
    for i in range(good + corrupt + short):
        frames = 2 if i >= good + corrupt else 16
        path = root / f"v{i}.mp4"
        write_video(path, torch.rand(3, frames, 32, 32, generator=g) * 2 - 1, 8.0)
        (root / f"v{i}.json").write_text(story)
        if good <= i < good + corrupt:         # a header that opens, data that does not decode
            data = bytearray(path.read_bytes())
            data[len(data) // 3:] = os.urandom(len(data) - len(data) // 3)
            path.write_bytes(bytes(data))


TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64)
"""A tiny diffusers WanTransformer3DModel config: inner 24, 2 blocks, 4 latent channels, text width 16."""


def tiny_wan_backbone(context_mode: str = "cached"):
    """A seeded tiny ``WanBackbone`` (:data:`TINY_WAN`) whose output projection is not zero, in eval
    mode; skips without diffusers."""
    import pytest
    import torch
    pytest.importorskip("diffusers")
    from pfp.backbones import WanBackbone
    torch.manual_seed(0)
    bb = WanBackbone.from_config(context_mode=context_mode, **TINY_WAN)
    with torch.no_grad():
        bb.transformer.proj_out.weight.normal_(0, 0.05)
    return bb.eval()


TINY_HUNYUAN = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                    num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                    text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 6))
"""A tiny diffusers HunyuanVideoTransformer3DModel config: inner 24, 2 dual-stream and 2 single-stream
blocks, 4 latent channels, text width 16 with an 8-wide pooled vector."""


def tiny_hunyuan_backbone(context_mode: str = "cached"):
    """A seeded tiny ``HunyuanVideoBackbone`` (:data:`TINY_HUNYUAN`), in eval mode; skips without
    diffusers."""
    import pytest
    import torch
    pytest.importorskip("diffusers")
    from pfp.backbones.hunyuan_video import HunyuanVideoBackbone
    torch.manual_seed(0)
    return HunyuanVideoBackbone.from_config(context_mode=context_mode, **TINY_HUNYUAN).eval()


def save_tiny_hunyuan_text(root, seed: int = 0):
    """Save HunyuanVideo's two text encoders, tiny and random, in a pipeline folder's layout:
    ``text_encoder/`` (a 3-layer transformers LlamaModel, width 16), ``tokenizer/``,
    ``text_encoder_2/`` (a CLIPTextModel, width 8) and ``tokenizer_2/`` (word-level tokenizers built
    here). Returns the crop_start of the prompt template under the tiny Llama tokenizer. Skips
    without transformers/tokenizers."""
    import pytest
    import torch
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from tokenizers.processors import TemplateProcessing
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast
    except Exception as e:  # pragma: no cover - environment dependent
        pytest.skip(f"transformers/tokenizers with Llama and CLIP unavailable: {e}")
    from pfp.text import HUNYUAN_PROMPT_TEMPLATE
    words = "a red green blue circle square on background and the video describe".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3, **{w: i + 4 for i, w in enumerate(words)}}

    def tokenizer(template):
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = TemplateProcessing(single=template, special_tokens=[("<s>", 3), ("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       bos_token="<s>")
    torch.manual_seed(seed)
    llama = LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        pad_token_id=0, bos_token_id=3, eos_token_id=1)).eval()
    tok, tok2 = tokenizer("<s> $A"), tokenizer("<s> $A </s>")
    for name, part in (("text_encoder", llama), ("tokenizer", tok), ("text_encoder_2", clip), ("tokenizer_2", tok2)):
        part.save_pretrained(str(root / name))
    return len(tok(HUNYUAN_PROMPT_TEMPLATE.split("{}")[0])["input_ids"])
