"""FLUX.1 text encoders: tokenizers and encoders against transformers (the test-only parity oracle), and loading."""

from pathlib import Path

import pytest
import torch
from fakes import (
    LONG_PROMPT,
    TOKENIZERS,
    VARIED_PROMPTS,
    max_rel,
    random_prompts,
    tiny_clip,
    tiny_t5,
    write_tiny_tokenizer,
)
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

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers, on the real CLIP-L and T5-XXL vocabularies.


@pytest.fixture(scope="module")
def tokenizer_files() -> Path:
    if not (TOKENIZERS / "clip_l" / "vocab.json").is_file() or not (TOKENIZERS / "t5_xxl" / "tokenizer.json").is_file():
        pytest.skip(f"real tokenizer files not found under {TOKENIZERS} (clip_l/vocab.json, t5_xxl/tokenizer.json)")
    return TOKENIZERS


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
    prompts = VARIED_PROMPTS + random_prompts(300)
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
    prompts = VARIED_PROMPTS + random_prompts(300, seed=1)
    ids = ours(prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 512)
    for ref in refs:
        expected = ref(prompts, padding="max_length", max_length=512, truncation=True).input_ids
        for prompt, got, want in zip(prompts, ids.tolist(), expected):
            assert got == want, f"T5 ids differ for {prompt!r}"
    long = ours([LONG_PROMPT])[0]
    assert long[-1] == 1 and (long != 0).all()  # truncated to 512, still ending with </s>
    short = ours(["a photo of a cat"])[0].tolist()
    assert short[short.index(1) + 1 :] == [0] * (511 - short.index(1))
    assert T5Tokenizer(path, max_length=256)([LONG_PROMPT]).shape == (1, 256)  # FLUX.1-schnell's length


def test_tiny_tokenizers_match_transformers(tmp_path):
    """The tiny CLIP and T5 files every pipeline test uses give transformers' ids too (like against like)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    from transformers import T5TokenizerFast

    clip_dir, t5_dir = write_tiny_tokenizer("clip", tmp_path / "clip"), write_tiny_tokenizer("t5", tmp_path / "t5")
    prompts = VARIED_PROMPTS + random_prompts(100, seed=3)
    ours = CLIPTokenizer(clip_dir / "vocab.json", clip_dir / "merges.txt")
    ref = HFCLIPTokenizer.from_pretrained(clip_dir)
    assert ours(prompts).tolist() == ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    # From the file itself (diffusers_flux_pipeline's form): transformers 5's from_pretrained(folder) rebuilds T5's
    # normaliser from spiece.model's charsmap, which a tokenizer.json-only tiny folder does not have.
    ours, ref = T5Tokenizer(t5_dir / "tokenizer.json"), T5TokenizerFast(tokenizer_file=str(t5_dir / "tokenizer.json"))
    assert ours(prompts).tolist() == ref(prompts, padding="max_length", max_length=512, truncation=True).input_ids


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
    err = max_rel(got, want)
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
        assert max_rel(load_clip(folder)(ids), ref(input_ids=ids).pooler_output) <= 1e-5


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
    err = max_rel(got, want)
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
        assert max_rel(load_t5(folder)(ids), ref(input_ids=ids).last_hidden_state) <= 1e-5


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
    assert ours_err <= 1.2 * ref_err and max_rel(got, want) <= 5e-2


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
