"""FLUX.1 text encoders: tokenizers and encoders against transformers (the test-only parity oracle), and loading."""

import random
from pathlib import Path

import pytest
import torch
from fakes import TOKENIZERS, tiny_clip, tiny_t5
from safetensors.torch import save_file

from flux1 import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5Encoder,
    T5Tokenizer,
    load_clip,
    load_t5,
    read_weights,
    t5_relative_position_buckets,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers, on the real CLIP-L and T5-XXL vocabularies.

LONG = "a highly detailed photograph of an astronaut riding a horse on the surface of mars, " * 30  # > 512 T5 tokens

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "A PHOTO OF A CAT!!!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "repeated     spaces    inside",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "it's a dog's life, isn't it? we'll see, you'd know, they've gone, I'm here, they're there",
    "IT'S SHOUTED, DON'T",
    "quotes: 'single' \"double\" `back` \u2018curly\u2019 \u201ccurly\u201d",
    "numbers 0 1 23 456 7890 3.14159 1,000,000 2nd 3rd 4th 1e-5",
    "version v1.2.3-beta+build.42 at 12:30pm on 2024/01/02",
    "email someone@example.com and url https://example.com/path?q=1&r=2#frag",
    "hashtags #sunset #nofilter @user",
    "math: x^2 + y^2 = z^2, a<b>c, 50% off, $100, \u20ac20, \u00a35",
    "punctuation runs ... !!! ??? ,,, ;;; ::: --- ___ *** ((())) [[[]]] {{{}}}",
    "brackets (a) [b] {c} <d> |e| /f/ \\g\\ ~h~",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade co\u00f6perate",
    "cafe\u0301 composed vs decomposed accents",  # NFC turns e + combining acute into \u00e9
    "\u00c9COLE \u00c0 PARIS, \u00dcBER STRA\u00dfE, \u0130STANBUL",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587\u5b57\u7b26 \ud55c\uad6d\uc5b4",
    "\u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u039a\u0395\u0399\u039c\u0395\u039d\u039f",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0939\u093f\u0928\u094d\u0926\u0940",
    "emoji \U0001f431\U0001f680\U0001f308 and \U0001f469\u200d\U0001f4bb zwj and flags \U0001f1eb\U0001f1f7",
    "skin tones \U0001f44d\U0001f3fd and variation selector \u2764\ufe0f",
    "full width \uff21\uff22\uff23 \uff11\uff12\uff13 and ideographic\u3000space",
    "ligatures \ufb01 \ufb02 and fractions \u00bd \u2153 and superscripts x\u00b2 \u2122 \u00a9 \u00ae",
    "zero\u200bwidth\u200cjoiner\u200dthings and soft\u00adhyphen",
    "non\u00a0breaking\u00a0space and en\u2002space and thin\u2009space",
    "dashes \u2013 \u2014 \u2212 and ellipsis \u2026 and bullet \u2022",
    "roman numerals \u2160 \u2161 \u2162 and circled \u2460 \u2461",
    "arabic-indic digits \u0661\u0662\u0663 and devanagari digits \u0967\u0968",
    "<|startoftext|> a special token typed in the prompt <|endoftext|>",
    "<|ENDOFTEXT|> upper-case special token text",
    "</s> <pad> <unk> <extra_id_0> <extra_id_99> t5 special tokens typed in",
    "html &amp; entities &lt;b&gt; and <b>tags</b>",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious floccinaucinihilipilification",
    "a" * 300,
    "word " * 100,  # > 77 CLIP tokens
    "1234567890" * 20,  # each digit is its own CLIP word
    LONG,
    LONG.upper(),
    "a cinematic shot of a baby racoon wearing an intricate italian priest robe",
    "photo of a red sports car parked on a cobblestone street, golden hour, 35mm film, bokeh",
    "oil painting, portrait of a woman, renaissance style, by leonardo da vinci",
    "a cute corgi, trending on artstation, 8k, unreal engine, octane render, ultra-detailed",
    "masterpiece, best quality, (extremely detailed:1.2), [negative], {curly}, <lora:name:0.8>",
    'text that says "Hello, World!" written in neon letters on a brick wall',
    "a sign reading 'FLUX.1 [dev]' in a store window",
    "mixed\u3000\u65e5\u672c\u8a9etext\u3068English\u6df7\u5728",
    "\u0000null and \u0007bell control characters",
    "\ufeffbyte order mark at start",
    "private use \ue000 and unassigned \U000e0001 tag",
    "surrogate-free astral \U0001d54f\U0001d550 math letters",
    "\u00b5 micro and \u03bc mu, \u212b angstrom and \u00c5 A-ring, \u2126 ohm",
    "Turkish dotless \u0131 and dotted \u0130, German \u1e9e capital sharp s",
    "\t\n\r ",
    "trailing newline\n",
    "q",
]


@pytest.fixture(scope="module")
def tokenizer_files() -> Path:
    if not (TOKENIZERS / "clip_l" / "vocab.json").is_file() or not (TOKENIZERS / "t5_xxl" / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer files not found under {TOKENIZERS} (clip_l/vocab.json, t5_xxl/tokenizer.json)")
    return TOKENIZERS


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """Random strings from a mix of scripts, symbols and whitespace, to catch what the hand-written list misses."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        " \t\n\r\x0b\x0c\u00a0\u2002\u3000\u200b",
        "\u00e0\u00e9\u00ee\u00f5\u00fc\u00e7\u00f1\u00c5\u00df\u0301\u0308",
        "\u65e5\u672c\u8a9e\u4e2d\u6587\u3042\u30a2\ud55c",
        "\u0440\u0443\u0441\u03b1\u03b2\u0627\u05d0\u0939",
        "\U0001f431\U0001f680\u2764\ufe0f\u200d\U0001f3fd",
        "\ufb01\u00bd\u00b2\u2122\u2160\u2460\uff21\uff11",
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40))]
        out.append("".join(chars) + rng.choice(["", "'s", "'ll", " <|endoftext|>", "</s>"]))
    return out


def test_clip_tokenizer_matches_transformers(tokenizer_files):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    folder = tokenizer_files / "clip_l"
    ours = CLIPTokenizer(folder / "vocab.json", folder / "merges.txt")
    # The v5 keywords are vocab=/merges= (v4's vocab_file=/merges_file= silently give all-<unk> ids in v5).
    refs = [
        HFCLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")),
        HFCLIPTokenizer.from_pretrained(folder),  # how FluxPipeline loads it
    ]
    for ref in refs:
        assert ref("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    prompts = PROMPTS + random_prompts(300)
    ids = ours(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    for ref in refs:
        expected = ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
        for prompt, got, want in zip(prompts, ids.tolist(), expected):
            assert got == want, f"CLIP ids differ for {prompt!r}"
    assert ours(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    truncated = ours(["word " * 100])[0]
    assert truncated[0] == 49406 and truncated[-1] == 49407 and (truncated[1:-1] != 49407).all()
    assert ours("a photo of a cat").shape == (1, 77)  # a bare string is one prompt


def test_t5_tokenizer_matches_transformers(tokenizer_files):
    from transformers import T5TokenizerFast

    path = tokenizer_files / "t5_xxl" / "tokenizer.json"
    ours = T5Tokenizer(path)
    refs = [T5TokenizerFast(tokenizer_file=str(path)), T5TokenizerFast.from_pretrained(path.parent)]
    prompts = PROMPTS + random_prompts(300, seed=1)
    ids = ours(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 512)
    for ref in refs:
        expected = ref(prompts, padding="max_length", max_length=512, truncation=True).input_ids
        for prompt, got, want in zip(prompts, ids.tolist(), expected):
            assert got == want, f"T5 ids differ for {prompt!r}"
    long = ours([LONG])[0]
    assert long[-1] == 1 and (long != 0).all()  # truncated to 512, still ending with </s>
    short = ours(["a photo of a cat"])[0].tolist()
    assert short[short.index(1) + 1 :] == [0] * (511 - short.index(1))
    assert T5Tokenizer(path, max_length=256)([LONG]).shape == (1, 256)  # FLUX.1-schnell's length


# ----------------------------------------------------------------------------------------------------------------------
# Encoders: tiny transformers models with random weights, saved sharded, loaded with our loaders.


def save_sharded(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    return folder


def clip_ids(eos: int, legacy: bool) -> torch.Tensor:
    """(6, 77) ids: BOS, random tokens, EOS at varied positions, EOS padding. In the non-legacy case the random
    tokens include ids larger than EOS, so argmax pooling would pick a wrong position."""
    g = torch.Generator().manual_seed(0)
    low, high = (10, eos) if legacy else (10, 1000)
    ids = torch.randint(low, high, (6, 77), generator=g)
    ids[:, 0] = 0
    for row, end in enumerate([1, 5, 17, 40, 75, 76]):
        ids[row, end:] = eos
    return ids


@pytest.mark.parametrize("legacy", [True, False], ids=["eos_id_2_argmax", "eos_id_5_first_match"])
def test_clip_encoder_matches_transformers(tmp_path, legacy):
    eos = 999 if legacy else 5
    ref = tiny_clip(vocab_size=1000, hidden_size=32, eos_token_id=2 if legacy else eos)
    folder = save_sharded(ref, tmp_path / "clip")
    ours = load_clip(folder)
    assert isinstance(ours, CLIPTextModel) and not ours.training
    assert all(not p.requires_grad for p in ours.parameters())

    ids = clip_ids(eos, legacy)
    if not legacy:
        assert (ids.argmax(-1) != (ids == eos).int().argmax(-1)).any()  # the two pooling rules disagree here
    with torch.no_grad():
        got = ours(ids)
        out = ref(input_ids=ids)
    want = out.pooler_output
    assert got.shape == (6, 32)
    err = rel_err(got, want)
    print(f"CLIP pooled max rel err ({'legacy' if legacy else 'eos match'}): {err:.2e}")
    assert err <= 1e-5
    # Non-trivial: the hidden states differ across positions, so pooling at a wrong position would be caught.
    hidden = out.last_hidden_state
    assert (hidden[:, 1:] - hidden[:, :1]).abs().amin(dim=-1).amax() > 1e-2


def test_clip_keys_are_the_legacy_checkpoint_keys(tmp_path):
    """Our keys equal those of transformers 4.x checkpoints such as FLUX.1's (text_model.*), and the loader's
    fix-ups (position_ids buffer, text_projection head) work on a single-file checkpoint."""
    from transformers import CLIPTextModelWithProjection

    ref = tiny_clip(vocab_size=1000, hidden_size=32)
    with_projection = CLIPTextModelWithProjection(ref.config)
    legacy_keys = {k for k in with_projection.state_dict() if k.startswith("text_model.")}
    assert set(CLIPTextModel(CLIPTextConfig.from_dict(ref.config.to_dict())).state_dict()) == legacy_keys

    folder = tmp_path / "legacy"
    folder.mkdir()
    ref.config.to_json_file(folder / "config.json")
    sd = {f"text_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["text_projection.weight"] = torch.zeros(512, 32)
    save_file(sd, folder / "model.safetensors")
    ids = clip_ids(999, legacy=True)
    with torch.no_grad():
        assert rel_err(load_clip(folder)(ids), ref(input_ids=ids).pooler_output) <= 1e-5


def test_full_size_configs_match_transformers():
    """FLUX.1-dev's config.json values give our defaults, and the same keys and shapes as transformers (on meta)."""
    from transformers import CLIPTextConfig as HFCLIPConfig
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    from transformers import T5Config as HFT5Config

    clip = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    clip |= dict(max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)
    t5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    t5 |= dict(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
    assert CLIPTextConfig.from_dict(clip | {"projection_dim": 768, "bos_token_id": 0}) == CLIPTextConfig()
    assert T5Config.from_dict(t5 | {"dense_act_fn": "gelu_new", "is_gated_act": True}) == T5Config()
    with torch.device("meta"):
        pairs = [
            (CLIPTextModel(CLIPTextConfig()), CLIPTextModelWithProjection(HFCLIPConfig(**clip, projection_dim=768))),
            (T5Encoder(T5Config()), T5EncoderModel(HFT5Config(**t5))),
        ]
    for ours, ref in pairs:
        skip = ("text_projection.weight", "encoder.embed_tokens.weight")  # the head we drop, transformers' tied alias
        want = {k: v.shape for k, v in ref.state_dict().items() if k not in skip}
        assert {k: v.shape for k, v in ours.state_dict().items()} == want


def test_t5_encoder_matches_transformers(tmp_path):
    ref = tiny_t5(vocab_size=1000, d_model=32)
    folder = save_sharded(ref, tmp_path / "t5")
    ours = load_t5(folder)
    assert isinstance(ours, T5Encoder) and not ours.training

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 1000, (2, 64), generator=g)
    ids[0, 40] = 1  # </s> then <pad>, as the tokenizer gives; attended to like any token (no mask)
    ids[0, 41:] = 0
    with torch.no_grad():
        got = ours(ids)
        want = ref(input_ids=ids).last_hidden_state
    assert got.shape == (2, 64, 32)
    err = rel_err(got, want)
    print(f"T5 last_hidden_state max rel err: {err:.2e}")
    assert err <= 1e-5
    # Non-trivial: distant positions land in the log-spaced buckets and the outputs vary along the sequence.
    assert (want[:, 1:] - want[:, :1]).abs().amin(dim=-1).amax() > 1e-2


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 20), (64, 256), (8, 16)])
def test_t5_relative_buckets_match_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 300  # offsets -299..299, past max_distance on both sides
    positions = torch.arange(length)
    offset = positions[None, :] - positions[:, None]
    want = T5Attention._relative_position_bucket(offset, True, num_buckets, max_distance)
    got = t5_relative_position_buckets(length, num_buckets, max_distance)
    assert torch.equal(got, want)
    # Every bucket is used except "after the query, distance 0", which cannot happen (a T5 quirk).
    assert got.unique().tolist() == [b for b in range(num_buckets) if b != num_buckets // 2]


def test_t5_tied_embedding_only_checkpoint(tmp_path):
    """A checkpoint holding only encoder.embed_tokens (the tied alias of shared) loads, single file."""
    ref = tiny_t5(vocab_size=1000, d_model=32)
    folder = tmp_path / "t5"
    folder.mkdir()
    ref.config.to_json_file(folder / "config.json")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
    save_file(sd, folder / "model.safetensors")
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert rel_err(load_t5(folder)(ids), ref(input_ids=ids).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_half_precision(tmp_path, dtype):
    """bf16 runs fully in bf16, fp16 keeps `wo` in fp32; both track transformers loaded in the same dtype."""
    from transformers import T5EncoderModel

    ref = tiny_t5(vocab_size=1000, d_model=32)
    folder = save_sharded(ref, tmp_path / "t5")
    ours = load_t5(folder, dtype=dtype)
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert ours.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == dtype
    ref_half = T5EncoderModel.from_pretrained(folder, dtype=dtype).eval()
    assert ref_half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == wo.dtype
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids)
        want = ref_half(input_ids=ids).last_hidden_state
        exact = ref(input_ids=ids).last_hidden_state
    assert got.dtype == want.dtype == dtype and torch.isfinite(got).all()
    # This tiny model's peaked attention amplifies rounding, so compare rounding errors rather than outputs:
    # ours must stay as close to the fp32 result as transformers in the same dtype is.
    ours_err, ref_err = (got.float() - exact).abs().mean().item(), (want.float() - exact).abs().mean().item()
    print(f"T5 {dtype}: mean abs err vs fp32 {ours_err:.2e} (transformers {ref_err:.2e})")
    assert ours_err <= 1.2 * ref_err and rel_err(got, want) <= 5e-2


# ----------------------------------------------------------------------------------------------------------------------
# Loading errors.


def test_read_weights_paths(tmp_path):
    ref = tiny_t5(vocab_size=1000, d_model=32)
    folder = save_sharded(ref, tmp_path / "t5")
    from_folder = read_weights(folder)
    from_index = read_weights(folder / "model.safetensors.index.json")
    assert from_folder.keys() == from_index.keys() and "shared.weight" in from_folder
    single = tmp_path / "single.safetensors"
    save_file({"a": torch.ones(2)}, single)
    assert torch.equal(read_weights(single)["a"], torch.ones(2))
    diffusers_folder = tmp_path / "transformer"
    diffusers_folder.mkdir()
    save_file({"b": torch.zeros(3)}, diffusers_folder / "diffusion_pytorch_model.safetensors")
    assert list(read_weights(diffusers_folder)) == ["b"]


def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_clip(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_weights(tmp_path / "nope.safetensors")

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_t5(no_config)

    ref = tiny_clip(vocab_size=1000, hidden_size=32)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    ref.config.to_json_file(no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_clip(no_weights)

    sharded = save_sharded(ref, tmp_path / "sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated download
    with pytest.raises(ValueError, match=f"{shard.name} is not a valid safetensors file"):
        load_clip(sharded)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name} listed in model.safetensors.index.json"):
        load_clip(sharded)

    extra = tmp_path / "extra"
    extra.mkdir()
    ref.config.to_json_file(extra / "config.json")
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(1)
    save_file(sd, extra / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected \(e.g. \['text_model.encoder.layers.0.mlp.fc3.weight'\]\)"):
        load_clip(extra)
    del sd["encoder.layers.0.mlp.fc3.weight"], sd["final_layer_norm.bias"]
    save_file(sd, extra / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing \(e.g. \['text_model.final_layer_norm.bias'\]\)"):
        load_clip(extra)
