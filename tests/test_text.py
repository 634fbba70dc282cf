import json
import random
import zlib

import pytest
import torch

from pfp.text import (Shot, Storyboard, StoryboardError, TextTokens, TinyTextEncoder, UMT5TextEncoder,
                      prompt_schedule, wan_prompt_clean)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny ops run faster on one thread


BOARD = [
    {"start": 1.0, "end": 3.0, "prompt": "a"},
    {"start": 3.0, "end": 4.5, "prompt": "b"},  # touches the previous shot
    {"start": 6.0, "end": 8.0, "prompt": "c", "camera": "pan"},  # a gap before it; extra key ignored
]


def test_parse_list_and_shots_object():
    a = Storyboard.from_json(json.dumps(BOARD))
    b = Storyboard.from_list({"shots": BOARD})
    assert a == b
    assert a.prompts == ["a", "b", "c"] and a.duration == 8.0
    assert a.shots[0] == Shot(1.0, 3.0, "a")
    assert Storyboard.from_json(a.to_json()) == a


def test_prompt_at_rules():
    sb = Storyboard.from_list(BOARD)
    cases = {
        -1.0: "a", 0.0: "a", 0.999: "a",  # before the first start: the first prompt
        1.0: "a", 2.99: "a",
        3.0: "b",  # a start is inclusive
        4.5: "b", 5.99: "b",  # in the gap the previous prompt stays
        6.0: "c", 7.9: "c",
        8.0: "c", 100.0: "c",  # after the last end: the last prompt
    }
    for t, want in cases.items():
        assert sb.prompt_at(t) == want, t
    # float slack: 0.1 + 0.2 is 0.30000000000000004, 3 * 0.1 likewise; a shot starting at 0.3 is active
    sb2 = Storyboard.from_list([{"start": 0, "end": 0.3, "prompt": "x"}, {"start": 0.3, "end": 1, "prompt": "y"}])
    assert sb2.prompt_at(0.1 + 0.2) == "y" and sb2.prompt_at(0.3 - 1e-6) == "x"
    with pytest.raises(ValueError, match="finite"):
        sb.prompt_at(float("nan"))


def test_prompt_schedule():
    sb = Storyboard.from_list(BOARD)
    assert prompt_schedule(sb, 1.0, 10) == ["a", "a", "a", "b", "b", "b", "c", "c", "c", "c"]
    # chunk middles: chunk [2.5, 3.5) has its middle at 3.0 -> "b"
    assert prompt_schedule(sb, 1.0, 4, start_seconds=0.5, at="middle") == ["a", "a", "b", "b"]
    assert prompt_schedule(sb, 1.0, 4, start_seconds=0.5) == ["a", "a", "a", "b"]
    # chunks of 0.1 s: chunk 30 starts at 30 * 0.1 = 3.0000000000000004 -> "b"
    sched = prompt_schedule(sb, 0.1, 61)
    assert sched[29] == "a" and sched[30] == "b" and sched[60] == "c"
    assert prompt_schedule(sb, 1.0, 0) == []
    for bad, match in [((sb, 0.0, 3), "chunk_seconds"), ((sb, -1.0, 3), "chunk_seconds"),
                       ((sb, 1.0, -1), "num_chunks"), ((sb, 1.0, 2.5), "num_chunks"),
                       ((BOARD, 1.0, 3), "Storyboard")]:
        with pytest.raises(ValueError, match=match):
            prompt_schedule(*bad)
    with pytest.raises(ValueError, match="'start' or 'middle'"):
        prompt_schedule(sb, 1.0, 3, at="end")


def test_window_matches_prompt_at():
    sb = Storyboard.from_list(BOARD)
    rng = random.Random(0)
    for _ in range(50):
        a = rng.uniform(-1, 9)
        b = a + rng.uniform(0.05, 6)
        win = sb.window(max(a, 0.0), b)
        a = max(a, 0.0)
        assert win.shots[0].start == 0.0 and abs(win.duration - (b - a)) < 1e-9
        for _ in range(20):
            t = rng.uniform(0, b - a)
            assert win.prompt_at(t) == sb.prompt_at(a + t)
    with pytest.raises(ValueError, match="start < end"):
        sb.window(2.0, 2.0)


@pytest.mark.parametrize("entries,match", [
    ([], "no shots"),
    ("shots", "must be a list"),
    ({"scenes": []}, "needs a 'shots' list"),
    ([{"start": 0, "end": 1, "prompt": "a"}, {"start": 1, "prompt": "b"}], r"entry 1: missing key\(s\) 'end'"),
    ([{"end": 1}], r"entry 0: missing key\(s\) 'start', 'prompt'"),
    ([{"start": "0", "end": 1, "prompt": "a"}], r"entry 0: 'start' must be a number"),
    ([{"start": 0, "end": True, "prompt": "a"}], r"entry 0: 'end' must be a number"),
    ([{"start": 0, "end": float("inf"), "prompt": "a"}], r"entry 0: 'end' must be finite"),
    ([{"start": 0, "end": 1, "prompt": "a"}, {"start": 2, "end": 2, "prompt": "b"}],
     r"entry 1: 'end' \(2.0\) must be greater than 'start' \(2.0\)"),
    ([{"start": -1, "end": 1, "prompt": "a"}], r"entry 0: 'start' must be >= 0"),
    ([{"start": 0, "end": 2, "prompt": "a"}, {"start": 1, "end": 3, "prompt": "b"}],
     r"entry 1: overlaps entry 0"),
    ([{"start": 2, "end": 3, "prompt": "a"}, {"start": 0, "end": 1, "prompt": "b"}],
     r"entry 1: shots must be sorted by start"),
    ([{"start": 0, "end": 1, "prompt": "  "}], r"entry 0: 'prompt' must be a non-empty string"),
    ([{"start": 0, "end": 1, "prompt": 3}], r"entry 0: 'prompt' must be a non-empty string"),
    ([["0", "1", "a"]], r"entry 0: must be an object"),
])
def test_bad_storyboards_name_entry_and_reason(entries, match):
    with pytest.raises(StoryboardError, match=match):
        Storyboard.from_list(entries)


def test_load_errors_name_the_file(tmp_path):
    p = tmp_path / "board.json"
    p.write_text('[{"start": 0, "end": 1, "prompt": "a"},]')
    with pytest.raises(StoryboardError, match=r"board.json: storyboard is not valid JSON"):
        Storyboard.load(p)
    p.write_text(json.dumps([{"start": 0, "end": 1}]))
    with pytest.raises(StoryboardError, match=r"board.json: storyboard entry 0: missing key\(s\) 'prompt'"):
        Storyboard.load(p)
    with pytest.raises(StoryboardError, match="cannot read storyboard"):
        Storyboard.load(tmp_path / "missing.json")
    p.write_text(json.dumps({"shots": BOARD}))
    assert Storyboard.load(p).prompts == ["a", "b", "c"]
    assert Storyboard.single("hello", 5).prompt_at(10) == "hello"


# ---------------------------------------------------------------------------------------------
# TinyTextEncoder
# ---------------------------------------------------------------------------------------------

def test_tiny_tokenizer_is_deterministic_hashing():
    enc = TinyTextEncoder(vocab_size=101, max_length=6)
    ids, mask = enc.tokenize(["Red circle, on BLUE!", "", "a b c d e f g h"])
    want = [1] + [2 + zlib.crc32(w.encode()) % 99 for w in ("red", "circle", "on", "blue")] + [0]
    assert ids[0].tolist() == want
    assert ids[1].tolist() == [1, 0, 0, 0, 0, 0]  # empty prompt: just the start token
    assert mask[2].all() and ids[2, 1:].tolist() == [2 + zlib.crc32(w.encode()) % 99 for w in "abcde"]
    assert torch.equal(mask, ids != 0)
    assert torch.equal(TinyTextEncoder(vocab_size=101, max_length=6).tokenize(["red circle"])[0],
                       enc.tokenize(["RED   circle"])[0])


def test_tiny_encoder_outputs_and_padding():
    torch.manual_seed(0)
    enc = TinyTextEncoder(dim=32, max_length=16, num_layers=2, num_heads=4)
    out = enc(["a red circle on a green background", "blue square"])
    assert isinstance(out, TextTokens)
    assert out.tokens.shape == (2, 16, 32) and out.mask.shape == (2, 16) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [8, 3]
    assert torch.all(out.tokens[~out.mask] == 0) and torch.all(out.tokens[out.mask].abs().sum(-1) > 0)
    # padding does not leak: a prompt encodes the same alone and next to a longer one
    alone = enc(["blue square"]).tokens[0]
    torch.testing.assert_close(alone, out.tokens[1], rtol=1e-5, atol=1e-6)
    # different prompts differ; a single str is accepted
    assert not torch.allclose(enc("red circle").tokens, enc("blue circle").tokens)
    # it trains: gradients reach the embeddings (a random projection: a plain sum of LayerNorm
    # outputs has zero gradient)
    tokens = enc(["red circle"]).tokens
    (tokens * torch.randn_like(tokens)).sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


def test_tiny_encoder_bad_args():
    with pytest.raises(ValueError, match="vocab_size"):
        TinyTextEncoder(vocab_size=2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TinyTextEncoder(dim=30, num_heads=4)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a str"):
        TinyTextEncoder()(["ok", 3])


# ---------------------------------------------------------------------------------------------
# UMT5TextEncoder on a tiny random local model + a locally built tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_umt5_dir(tmp_path_factory):
    from _tiny_pfp import save_tiny_umt5
    root = tmp_path_factory.mktemp("umt5")
    model, fast = save_tiny_umt5(root / "enc")
    model.save_pretrained(root / "pipe" / "text_encoder")  # diffusers pipeline layout
    fast.save_pretrained(root / "pipe" / "tokenizer")
    return root


def test_umt5_encoder_from_local_path(tiny_umt5_dir):
    enc = UMT5TextEncoder.from_pretrained(tiny_umt5_dir / "enc", max_length=8)
    assert enc.dim == 32 and enc.max_length == 8
    out = enc(["a red circle", "blue square on a green background and the red"])
    assert out.tokens.shape == (2, 8, 32) and out.mask.dtype == torch.bool
    # "a red circle" + </s> = 4 real tokens; the long prompt is truncated to max_length
    assert out.mask.sum(1).tolist() == [4, 8]
    assert torch.all(out.tokens[0, 4:] == 0)
    # real positions equal the model's own output with the same mask
    ids = enc.tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        ref = enc.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out.tokens[0, :4], ref[0, :4])
    # the pipeline layout (text_encoder/ + tokenizer/) loads the same weights
    enc2 = UMT5TextEncoder.from_pretrained(tiny_umt5_dir / "pipe", max_length=8)
    torch.testing.assert_close(enc2(["a red circle"]).tokens, out.tokens[:1])
    assert not any(p.requires_grad for p in enc.parameters())


def test_umt5_prompts_are_cleaned_as_wan_pipeline_cleans_them(tiny_umt5_dir):
    # WanPipeline runs prompt_clean (ftfy where installed, HTML entities, whitespace) before its
    # tokenizer; the encoder does the same unless told not to
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    enc = UMT5TextEncoder.from_pretrained(tiny_umt5_dir / "enc", max_length=12)
    raw = "  a red circle &amp; a\n blue   square "
    assert wan_prompt_clean(raw) == prompt_clean(raw) == "a red circle & a blue square"
    torch.testing.assert_close(enc([raw]).tokens, enc([prompt_clean(raw)]).tokens, rtol=0, atol=0)
    plain = UMT5TextEncoder.from_pretrained(tiny_umt5_dir / "enc", max_length=12, clean_prompts=False)
    assert not torch.equal(plain([raw]).mask, enc([raw]).mask)   # the entity's tokens are read as given


def test_umt5_bad_paths(tiny_umt5_dir, tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        UMT5TextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        UMT5TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        UMT5TextEncoder.from_pretrained(tiny_umt5_dir / "enc", tokenizer_path=tmp_path)


def test_states_are_fixed_reads_training_and_dropout_not_the_current_mode():
    """Cacheable text states: no weight trains and no dropout can act during training. The answer
    must not change with the encoder's train/eval mode, which training sets after asking."""
    from torch import nn

    from pfp.text import states_are_fixed

    def encoder(dropout: float, frozen: bool, trains: bool):
        m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(dropout))
        m.requires_grad_(trains)
        if frozen:
            m.frozen = True
        return m
    for mode in (True, False):
        cases = {(0.1, False, False): False,   # dropout that training would switch on
                 (0.0, False, False): True,
                 (0.1, True, False): True,     # frozen: kept in eval mode by PFPModel.train
                 (0.0, False, True): False}    # its weights train
        for args, want in cases.items():
            assert states_are_fixed(encoder(*args).train(mode)) is want, (mode, args)


def test_text_state_cache_encodes_each_prompt_once_alone_and_evicts_the_oldest():
    from pfp.text import TextStateCache
    torch.manual_seed(0)
    enc = TinyTextEncoder(dim=8, max_length=6, num_layers=1).eval()
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return enc(prompts)
    row = 6 * 8 * 4 + 6        # one prompt's tokens (fp32) and mask (bool) bytes
    cache = TextStateCache(encode, max_bytes=2 * row)
    tokens, mask = cache(["a red ball", "", "a red ball"])
    assert calls == [["a red ball"], [""]]                       # misses, one prompt per call
    with torch.no_grad():
        alone = [enc([p]) for p in ("a red ball", "", "a red ball")]
    assert torch.equal(tokens, torch.cat([a.tokens for a in alone]))
    assert torch.equal(mask, torch.cat([a.mask for a in alone]))
    assert (cache.hits, cache.misses, len(cache), cache.bytes) == (1, 2, 2, 2 * row)
    cache(["a blue cube"])                                        # full: the least recently used goes
    cache(["", "a red ball"])
    assert calls[-1] == ["a red ball"] and len(cache) == 2 and cache.bytes <= cache.max_bytes
    small = TextStateCache(encode, max_bytes=row - 1)             # an entry bigger than the cache: not kept
    assert small(["x"])[0].shape == (1, 6, 8) and len(small) == 0 and small.bytes == 0
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_bytes must be an int > 0"):
            TextStateCache(encode, bad)
