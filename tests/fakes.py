"""Tiny random-weight models written to disk in the official checkpoint formats and Hugging Face repo layouts.

The reference models come from diffusers / transformers (test-only oracles); the files we write are what the
official repos ship, so our loaders are exercised exactly as on real checkpoints."""

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The real vocabularies (clip_l/, t5_xxl/, umt5_xxl/, qwen3/ tokenizer files): only the tests *about* those vocabularies
# use them, from $RF_TOKENIZERS or the workplace's ../shared/tokenizers, and skip without them. Everything else runs on
# the tiny tokenizers below, so a fresh clone runs the rest of the suite.
TOKENIZERS = Path(os.environ.get("RF_TOKENIZERS") or Path(__file__).resolve().parents[2] / "shared" / "tokenizers")

LONG_PROMPT = (
    "a highly detailed photograph of an astronaut riding a horse on the surface of mars, " * 30
)  # > 512 T5 tokens

# Prompts for tokenizer parity tests: case, punctuation, numbers, scripts, emoji, whitespace, truncation.
VARIED_PROMPTS = [
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
    LONG_PROMPT,
    LONG_PROMPT.upper(),
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


def random_prompts(n: int, seed: int = 0, suffixes=("", "'s", "'ll", " <|endoftext|>", "</s>")) -> list[str]:
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
    return [
        "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40))) + rng.choice(suffixes)
        for _ in range(n)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Tiny tokenizers: the real ones' pipelines (normalisers, pre-tokenizers, special tokens, chat template) with a small
# vocabulary trained here on the prompts above, written in the files the official repos ship. Our tokenizers and
# transformers' read the same files, so pipeline parity tests compare like with like without ../shared.

TINY_CORPUS_REPEAT = 3


def _tiny_corpus() -> list[str]:
    captions = [f"a {c} {s} on a gradient" for c in ("red", "green", "blue") for s in ("square", "circle", "frame")]
    return (VARIED_PROMPTS + captions + random_prompts(300, seed=1)) * TINY_CORPUS_REPEAT


def write_clip_tokenizer(folder: Path) -> Path:
    """CLIP's byte-level BPE (`vocab.json` + `merges.txt`): every byte symbol bare and with "</w>", ~500 merges, the
    two special tokens last, so that <|endoftext|> is the largest id as in the real vocabulary (CLIP pools there)."""
    from flux1 import CLIP_WORD_PATTERN

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=900, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab, merges = model["vocab"], model["merges"]
    for symbol in sorted(alphabet):
        for s in (symbol, symbol + "</w>"):
            vocab.setdefault(s, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_t5_tokenizer(folder: Path, umt5: bool = False) -> Path:
    """A SentencePiece-Unigram `tokenizer.json` laid out as T5's (<pad> 0, </s> 1, <unk> 2, 100 <extra_id_*>) or umT5's
    (<pad> 0, </s> 1, <s> 2, <unk> 3), with the Metaspace pre-tokenizer and an </s>-appending post-processor."""
    specials = ["<pad>", "</s>", "<s>", "<unk>"] if umt5 else ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    # As the real files: T5 normalises with SentencePiece's precompiled NFKC map (NFKC here), strips trailing spaces
    # and turns runs of spaces into one "\u2581"; umT5 only collapses runs of spaces.
    if umt5:
        tok.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    else:
        steps = [normalizers.NFKC(), normalizers.Strip(left=False, right=True)]
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(Regex(" {2,}"), "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", special=True, normalized=False) for i in range(99, -1, -1)])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


# Qwen2/3's pre-tokenizer pattern (from its tokenizer.json): contractions, letter runs with one leading non-letter,
# single digits, punctuation runs, newlines, spaces.
QWEN3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A Jinja chat template that writes what Qwen3's does for one user message with add_generation_prompt (thinking on:
# nothing more; off: an empty think block), for transformers' apply_chat_template.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def write_qwen3_tokenizer(folder: Path) -> Path:
    """Qwen3's byte-level BPE `tokenizer.json` + `tokenizer_config.json` (pad <|endoftext|>, chat template)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "errors": "replace",
        "model_max_length": 131072,
        "chat_template": QWEN3_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# Vocabulary sizes of the tiny text encoders: at least the tiny tokenizers' (checked in write_tiny_tokenizer).
TINY_CLIP_VOCAB, TINY_T5_VOCAB, TINY_QWEN3_VOCAB = 1100, 512, 720
_TINY_WRITERS = {
    "clip": (lambda f: write_clip_tokenizer(f), TINY_CLIP_VOCAB),
    "t5": (lambda f: write_t5_tokenizer(f), TINY_T5_VOCAB),
    "umt5": (lambda f: write_t5_tokenizer(f, umt5=True), TINY_T5_VOCAB),
    "qwen3": (lambda f: write_qwen3_tokenizer(f), TINY_QWEN3_VOCAB),
}
_TINY_CACHE: dict[str, Path] = {}


def write_tiny_tokenizer(kind: str, folder: Path) -> Path:
    """Write the tiny tokenizer files of `kind` (clip, t5, umt5, qwen3) into folder; trained once per session."""
    import tempfile

    writer, vocab_size = _TINY_WRITERS[kind]
    if kind not in _TINY_CACHE:
        built = writer(Path(tempfile.mkdtemp(prefix=f"tiny-{kind}-")))
        files = {p.name: p for p in built.iterdir()}
        if "tokenizer.json" in files:
            size = json.loads(files["tokenizer.json"].read_text())
            size = len(size["model"]["vocab"]) + len(size["added_tokens"])
        else:
            size = len(json.loads(files["vocab.json"].read_text()))
        assert size <= vocab_size, f"tiny {kind} tokenizer has {size} ids; raise its TINY_*_VOCAB"
        _TINY_CACHE[kind] = built
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in _TINY_CACHE[kind].iterdir():
        shutil.copy(f, folder / f.name)
    return folder


# Tiny FLUX.1: 2 heads of 32 channels (rope axes (4, 14, 14), the (16, 56, 56) split scaled down), 2 + 2 blocks.
FLUX_TINY = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)
# Four levels like the real AE (8x downsampling); GroupNorm(32) needs widths that are multiples of 32.
AE_TINY = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def rel(a, b) -> float:
    """Relative L2 error of a against the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_rel(a, b) -> float:
    """Largest absolute error relative to the reference's largest magnitude."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check_wan_vae(pipe, ref, pixels, latent_shape):
    """Our encode and decode of `pixels` against diffusers' AutoencoderKLWan `ref` fed the same weights (its latents
    normalised by its config's latents_mean / latents_std, as diffusers' Wan pipelines do): both within 1e-5."""
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        ours = pipe.encode(pixels)
        theirs = (ref.encode(pixels).latent_dist.mode() - mean) / std
        assert ours.shape == latent_shape
        assert rel(ours, theirs) < 1e-5
        decoded = pipe.decode(ours)
        ref_decoded = ref.decode(ours * std + mean).sample
    assert decoded.shape == pixels.shape and ref_decoded.abs().mean() > 0.05
    assert rel(decoded, ref_decoded) < 1e-5


def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (diffusers zero-initialises some output layers, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# diffusers -> BFL (the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers, dimension-agnostic;
# checked against diffusers' own converter in test_flux1.py)


def flux_to_bfl(sd: dict, names=None) -> dict:
    """diffusers' FLUX.1 (or, with names=flux2_klein, FLUX.2) transformer state dict -> BFL names: the module's own
    DIFFUSERS_* maps inverted, dimension-agnostic."""
    import flux1

    names = names or flux1
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if param == "weight" and re.search(r"\.norm_(added_)?[qk]$", module):
            param = "scale"  # BFL's RMSNorm calls its weight "scale"
        if module == "norm_out.linear":  # diffusers stores (scale, shift); BFL (shift, scale)
            scale, shift = value.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
        elif module in names.DIFFUSERS_TOP:
            out[f"{names.DIFFUSERS_TOP[module]}.{param}"] = value
        elif m := re.match(r"(single_)?transformer_blocks\.(\d+)\.(.+)", module):
            renames = names.DIFFUSERS_SINGLE if m[1] else names.DIFFUSERS_DOUBLE
            if m[3] in renames:
                out[f"{'single' if m[1] else 'double'}_blocks.{m[2]}.{renames[m[3]]}.{param}"] = value
        else:
            raise KeyError(key)
    # Fused projections: BFL concatenates q, k, v (and, in FLUX.1's single blocks, the MLP input) into one linear.
    for prefix, block, groups in (
        ("transformer_blocks", "double_blocks", names.DIFFUSERS_FUSED_DOUBLE),
        ("single_transformer_blocks", "single_blocks", getattr(names, "DIFFUSERS_FUSED_SINGLE", {})),
    ):
        for i in sorted({int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".")}):
            for target, sources in groups.items():
                for param in ("weight", "bias"):
                    parts = [sd.get(f"{prefix}.{i}.{s}.{param}") for s in sources]
                    if parts[0] is not None:  # FLUX.2 has no biases
                        out[f"{block}.{i}.{target}.{param}"] = torch.cat(parts)
    return out


def diffusers_flux_velocity(ref, x, sigma, cond: dict, guidance=None):
    """diffusers' FluxTransformer2DModel on our latent layout (B, 16, H, W) and conditioning dict; returns its output
    in diffusers' packed layout, which is flux1.patchify of ours."""
    import flux1

    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
    return ref(
        hidden_states=flux1.patchify(x),
        encoder_hidden_states=cond["txt"],
        pooled_projections=cond["vec"],
        timestep=sigma,
        img_ids=flux1.image_ids(x.shape[2] // 2, x.shape[3] // 2, "cpu"),
        txt_ids=torch.zeros(cond["txt"].shape[1], 3),
        guidance=guidance,
        return_dict=False,
    )[0]


def tiny_flux_transformer(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return randomize(FluxTransformer2DModel(**{**FLUX_TINY, **overrides}), std=0.15, seed=seed).eval()


def tiny_ae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize(AutoencoderKL(**AE_TINY), std=0.05, seed=seed).eval()


def tiny_clip(seed: int = 0, vocab_size: int = 49408, hidden_size: int = 24, eos_token_id: int = 2, std=0.3):
    """eos_token_id=2 as in FLUX.1-dev's text_encoder/config.json: pooled at argmax(input_ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
        projection_dim=hidden_size,
    )
    return randomize(CLIPTextModel(config), std=std, seed=seed).eval()


def tiny_t5(seed: int = 0, vocab_size: int = 32128, d_model: int = 48, std=0.3):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )
    model = randomize(T5EncoderModel(config), std=std, seed=seed).eval()
    with torch.no_grad():  # a strong position bias, so a wrong relative bucket changes the output
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
    return model


def write_flux1_repo(
    root: Path,
    transformer_file: str = "flux1-dev.safetensors",
    prefix: str = "",
    vae_format: str = "bfl",
    seed: int = 0,
    **transformer_overrides,
) -> dict:
    """A FLUX.1 repo in the official layout; returns the diffusers/transformers reference models."""
    from flux1 import ae_from_diffusers

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    transformer = tiny_flux_transformer(seed, **transformer_overrides)
    bfl = {prefix + k: v.contiguous() for k, v in flux_to_bfl(transformer.state_dict()).items()}
    save_file(bfl, root / transformer_file)

    ae = tiny_ae(seed + 1)
    if vae_format == "bfl":
        save_file({k: v.contiguous() for k, v in ae_from_diffusers(ae.state_dict()).items()}, root / "ae.safetensors")
    else:
        ae.save_pretrained(root / "vae")

    clip, t5 = tiny_clip(seed + 2, vocab_size=TINY_CLIP_VOCAB), tiny_t5(seed + 3, vocab_size=TINY_T5_VOCAB)
    clip.save_pretrained(root / "text_encoder", max_shard_size="40KB")
    t5.save_pretrained(root / "text_encoder_2", max_shard_size="40KB")
    write_tiny_tokenizer("clip", root / "tokenizer")
    write_tiny_tokenizer("t5", root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return {"transformer": transformer, "ae": ae, "clip": clip, "t5": t5, "root": root}


def diffusers_flux_pipeline(refs: dict):
    """diffusers' FluxPipeline assembled from the same reference modules and the repo's (tiny) tokenizer files."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(refs["root"] / "tokenizer"), model_max_length=77)
    tokenizer_2 = T5TokenizerFast(tokenizer_file=str(refs["root"] / "tokenizer_2" / "tokenizer.json"))
    return FluxPipeline(
        scheduler=scheduler,
        vae=refs["ae"],
        text_encoder=refs["clip"],
        tokenizer=tokenizer,
        text_encoder_2=refs["t5"],
        tokenizer_2=tokenizer_2,
        transformer=refs["transformer"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Z-Image: the official repo layout is the diffusers one (transformer/, text_encoder/, tokenizer/, vae/, scheduler/).

ZIMAGE_TINY = dict(
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=32,
    axes_dims=[8, 12, 12],
    axes_lens=[256, 64, 64],
)


def tiny_zimage_transformer(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    return randomize(ZImageTransformer2DModel(**ZIMAGE_TINY), std=0.2, seed=seed).eval()


def tiny_qwen3(
    seed: int = 0, vocab_size: int = 151936, hidden_size: int = 32, causal_lm: bool = False, num_layers: int = 3
):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    model = (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)
    return randomize(model, std=0.2, seed=seed).eval()


def write_zimage_repo(root: Path, shift: float = 3.0, seed: int = 0) -> dict:
    root = Path(root)
    transformer, ae = tiny_zimage_transformer(seed), tiny_ae(seed + 1)
    qwen = tiny_qwen3(seed + 2, vocab_size=TINY_QWEN3_VOCAB)
    transformer.save_pretrained(root / "transformer", max_shard_size="200KB")
    ae.save_pretrained(root / "vae")
    qwen.save_pretrained(root / "text_encoder", max_shard_size="40KB")
    write_tiny_tokenizer("qwen3", root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": shift,
        "use_dynamic_shifting": False,
    }
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return {"transformer": transformer, "ae": ae, "text_encoder": qwen, "root": root}


def diffusers_zimage_pipeline(refs: dict, shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer

    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False),
        vae=refs["ae"],
        text_encoder=refs["text_encoder"],
        tokenizer=AutoTokenizer.from_pretrained(refs["root"] / "tokenizer"),
        transformer=refs["transformer"],
    )


# ---------------------------------------------------------------------------------------------------------------------
# Wan2.2 TI2V-5B: the official repo layout (config.json + sharded DiT safetensors in Wan's names at the root,
# Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) or the -Diffusers one (transformer/, vae/,
# text_encoder/, tokenizer/, scheduler/). The official files are written from diffusers/transformers models with our own
# inverses of diffusers' converters (wan22.DIT_FROM_DIFFUSERS, wan22.vae_from_diffusers, UMT5_TO_WAN below).

WAN_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,  # rope axes (8, 8, 8)
    in_channels=48,
    out_channels=48,
    text_dim=32,
    freq_dim=256,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
UMT5_TINY = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def wan_vae_tiny_config() -> dict:
    """The Wan2.2 VAE layout (residual stages, 2x2 patchify, 48 channels) at widths 8 (encoder) and 16 (decoder)."""
    import wan22

    return dict(
        base_dim=8,
        decoder_base_dim=16,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=list(wan22.WAN22_VAE_MEAN),
        latents_std=list(wan22.WAN22_VAE_STD),
    )


# transformers' UMT5EncoderModel names -> Wan's own (wan/modules/t5.py), the inverse of wan22.UMT5_FROM_WAN.
UMT5_TO_WAN = [
    (r"^shared\.", "token_embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (
        r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
        r"blocks.\1.pos_embedding.embedding.",
    ),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
]


def umt5_to_wan(sd: dict) -> dict:
    import wan22

    return {wan22.rename(k, UMT5_TO_WAN): v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}


def tiny_wan_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return randomize(WanTransformer3DModel(**{**WAN_TINY, **overrides}), std=0.15, seed=seed).eval()


def tiny_wan_vae(seed: int = 0, config: dict | None = None):
    """A random AutoencoderKLWan: the Wan2.2 layout (wan_vae_tiny_config) unless `config` (wan21_vae_tiny_config())."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return randomize(AutoencoderKLWan(**(config or wan_vae_tiny_config())), std=0.08, seed=seed).eval()


def tiny_umt5(seed: int = 0, vocab_size: int = TINY_T5_VOCAB, bf16: bool = True):
    """A tiny UMT5EncoderModel with strong per-layer position biases; with bf16, every weight is rounded to bf16 (the
    official .pth is stored in bf16) so that the reference holds exactly the values the checkpoint does."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", **UMT5_TINY)
    model = randomize(UMT5EncoderModel(config), std=0.3, seed=seed).eval()
    with torch.no_grad():
        for block in model.encoder.block:  # a wrong bucket or a shared table would change the output
            block.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
        if bf16:
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    return model


def save_sharded(sd: dict, folder: Path, stem: str, shards: int) -> Path:
    """`stem-0000i-of-0000n.safetensors` shards and their `stem.safetensors.index.json`, as from_pretrained reads."""
    keys = list(sd)
    size = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i * size : (i + 1) * size]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index


def _write_wan_dit(model, folder: Path, model_type: str, shards: int) -> None:
    """One WanModel in the official layout: float32 safetensors shards in Wan's names (as the real checkpoints) and
    its config.json."""
    import wan22

    folder.mkdir(parents=True, exist_ok=True)
    dit = {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in model.state_dict().items()}
    save_sharded(dit, folder, "diffusion_pytorch_model", shards=shards)
    config = {
        "_class_name": "WanModel",
        "model_type": model_type,
        "dim": 48,
        "ffn_dim": 64,
        "freq_dim": 256,
        "in_dim": model.config.in_channels,
        "out_dim": model.config.out_channels,
        "num_heads": 2,
        "num_layers": 2,
        "text_len": 512,
        "eps": 1e-6,
    }
    (folder / "config.json").write_text(json.dumps(config))


def _write_umt5(umt5, root: Path, layout: str) -> None:
    """The umT5 encoder and its tokenizer: official, Wan's bf16 .pth and google/umt5-xxl/; diffusers, text_encoder/
    (saved in bf16; `umt5` is left in float32) and tokenizer/."""
    if layout == "official":
        t5 = {k: v.bfloat16() for k, v in umt5_to_wan(umt5.state_dict()).items()}
        torch.save(t5, root / "models_t5_umt5-xxl-enc-bf16.pth")
        write_tiny_tokenizer("umt5", root / "google" / "umt5-xxl")
    else:
        umt5.to(torch.bfloat16).save_pretrained(root / "text_encoder", max_shard_size="100KB")
        umt5.float()
        write_tiny_tokenizer("umt5", root / "tokenizer")


def _umt5_tokenizer(root: Path):
    """The tokenizer of a repo written by _write_umt5, in either layout."""
    from transformers import T5TokenizerFast

    folder = root / ("google/umt5-xxl" if (root / "google").is_dir() else "tokenizer")
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def write_wan22_repo(root: Path, layout: str = "official", seed: int = 0) -> dict:
    """A tiny Wan2.2 TI2V-5B repo; returns the reference diffusers/transformers modules (fp32)."""
    import wan22

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    transformer, vae, umt5 = tiny_wan_transformer(seed), tiny_wan_vae(seed + 1), tiny_umt5(seed + 2)
    if layout == "official":
        _write_wan_dit(transformer, root, "ti2v", shards=3)
        torch.save(wan22.vae_from_diffusers(vae.state_dict()), root / "Wan2.2_VAE.pth")
        _write_umt5(umt5, root, layout)
    elif layout == "diffusers":
        transformer.save_pretrained(root / "transformer", max_shard_size="100KB")
        vae.save_pretrained(root / "vae")
        _write_umt5(umt5, root, layout)
        (root / "scheduler").mkdir(exist_ok=True)
        scheduler = {
            "_class_name": "UniPCMultistepScheduler",
            "flow_shift": 5.0,
            "prediction_type": "flow_prediction",
            "use_flow_sigmas": True,
            "num_train_timesteps": 1000,
        }
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
    else:
        raise ValueError(layout)
    return {"transformer": transformer, "vae": vae, "text_encoder": umt5, "root": root}


def wan_scheduler(shift: float = 5.0):
    """The -Diffusers repos' scheduler: UniPC on flow sigmas (diffusers starts at sigma 1, the official code at
    1 - 1/1000; the pipeline parity tests pass diffusers' sigmas to ours)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    )


def diffusers_sigmas(steps: int, shift: float = 5.0) -> torch.Tensor:
    """wan_scheduler(shift)'s sigmas for `steps` steps, to pass to our pipelines in the parity tests."""
    import wan22

    scheduler = wan_scheduler(shift)
    scheduler.set_timesteps(steps)
    # Our integer timesteps are diffusers' (its sigmas start at 1 - 1e-6, the official ones at 0.9998).
    assert wan22.model_timestep(scheduler.sigmas[:-1]).long().tolist() == scheduler.timesteps.tolist()
    return scheduler.sigmas


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (a random field upsampled), so resizing and cropping change it measurably."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((4, 6, 3)) * 255).astype(np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def diffusers_wan_pipeline(refs: dict, image_to_video: bool = False, shift: float = 5.0):
    """diffusers' WanPipeline (text-to-video) or WanImageToVideoPipeline (TI2V's image-to-video) with the reference
    modules, the repo's tokenizer and expand_timesteps=True (per-token timesteps, as the TI2V-5B-Diffusers repo)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    tokenizer = _umt5_tokenizer(refs["root"])
    common = dict(
        tokenizer=tokenizer, text_encoder=refs["text_encoder"], vae=refs["vae"], scheduler=wan_scheduler(shift)
    )
    if image_to_video:
        return WanImageToVideoPipeline(
            **common, transformer=refs["transformer"], image_encoder=None, image_processor=None, expand_timesteps=True
        )
    return WanPipeline(**common, transformer=refs["transformer"], expand_timesteps=True)


# ---------------------------------------------------------------------------------------------------------------------
# Wan2.2 A14B (T2V / I2V): two experts in the official layout (high_noise_model/ and low_noise_model/, each a
# config.json and sharded safetensors in Wan's names; Wan2.1_VAE.pth; the umT5 .pth and tokenizer as for TI2V-5B) or the
# -Diffusers one (transformer/ = high noise, transformer_2/ = low noise, vae/ in the Wan2.1 config).


def wan21_vae_tiny_config() -> dict:
    """The Wan2.1 VAE layout (flat stages, no patchify, 16 channels) at width 8; dim_mult and num_res_blocks as the
    real model, which diffusers' single-file converter assumes."""
    import wan22

    return dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        temperal_downsample=[False, True, True],
        latents_mean=list(wan22.WAN21_VAE_MEAN),
        latents_std=list(wan22.WAN21_VAE_STD),
    )


def write_wan22_a14b_repo(root: Path, kind: str = "t2v", layout: str = "official", seed: int = 0) -> dict:
    """A tiny Wan2.2 T2V-A14B or I2V-A14B repo (two experts of different weights; I2V's take 36 input channels);
    returns the reference diffusers/transformers modules (fp32): transformer (high noise), transformer_2 (low noise)."""
    import wan22

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    in_channels = 36 if kind == "i2v" else 16
    high, low = (tiny_wan_transformer(seed + i, in_channels=in_channels, out_channels=16) for i in (0, 10))
    vae, umt5 = tiny_wan_vae(seed + 1, wan21_vae_tiny_config()), tiny_umt5(seed + 2)
    if layout == "official":
        _write_wan_dit(high, root / "high_noise_model", kind, shards=2)
        _write_wan_dit(low, root / "low_noise_model", kind, shards=2)
        torch.save(wan22.vae_from_diffusers(vae.state_dict()), root / "Wan2.1_VAE.pth")
        _write_umt5(umt5, root, layout)
    elif layout == "diffusers":
        high.save_pretrained(root / "transformer", max_shard_size="100KB")
        low.save_pretrained(root / "transformer_2", max_shard_size="100KB")
        vae.save_pretrained(root / "vae")
        _write_umt5(umt5, root, layout)
        boundary = 0.9 if kind == "i2v" else 0.875
        pipeline = "WanImageToVideoPipeline" if kind == "i2v" else "WanPipeline"
        (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "boundary_ratio": boundary}))
    else:
        raise ValueError(layout)
    return {"transformer": high, "transformer_2": low, "vae": vae, "text_encoder": umt5, "root": root}


def diffusers_wan_a14b_pipeline(refs: dict, kind: str = "t2v", shift: float = 12.0):
    """diffusers' WanPipeline (T2V-A14B, boundary_ratio 0.875) or WanImageToVideoPipeline (I2V-A14B, 0.9) with both
    reference experts: `transformer` above the boundary with guidance_scale, `transformer_2` below with
    guidance_scale_2."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    common = dict(
        tokenizer=_umt5_tokenizer(refs["root"]),
        text_encoder=refs["text_encoder"],
        vae=refs["vae"],
        scheduler=wan_scheduler(shift),
        transformer=refs["transformer"],
        transformer_2=refs["transformer_2"],
    )
    if kind == "i2v":
        return WanImageToVideoPipeline(**common, image_encoder=None, image_processor=None, boundary_ratio=0.9)
    return WanPipeline(**common, boundary_ratio=0.875)


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.2-klein: the BFL single file `flux-2-klein-*.safetensors` at the root, the diffusers `vae/` (or BFL's
# `ae.safetensors`), a Qwen3ForCausalLM `text_encoder/` and `tokenizer/`, as the open klein repos ship them.

FLUX2_TINY = dict(
    in_channels=128,  # 32 latent channels x 2x2, as the real model
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,  # 3 x the tiny Qwen3's hidden size
    axes_dims_rope=(4, 4, 4, 4),
    timestep_guidance_channels=256,
    guidance_embeds=False,
)
FLUX2_AE_TINY = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=32, norm_num_groups=32)
# 28 layers, so that Qwen3 layers 9, 18 and 27 (klein's) are real and one layer is left unbuilt.
FLUX2_QWEN3_LAYERS, FLUX2_QWEN3_HIDDEN = 28, 16


def flux2_to_bfl(sd: dict) -> dict:
    """diffusers' Flux2Transformer2DModel state dict -> BFL names (inverse of diffusers'
    convert_flux2_transformer_checkpoint_to_diffusers; checked against it in test_flux2_klein.py)."""
    import flux2_klein

    return flux_to_bfl(sd, flux2_klein)


def tiny_flux2_transformer(seed: int = 0, std: float = 0.15, **overrides):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return randomize(Flux2Transformer2DModel(**{**FLUX2_TINY, **overrides}), std=std, seed=seed).eval()


def tiny_flux2_ae(seed: int = 0):
    """AutoencoderKLFlux2 with non-trivial BatchNorm statistics (the defaults, mean 0 and variance 1, hide bugs)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    ae = randomize(AutoencoderKLFlux2(**FLUX2_AE_TINY), std=0.05, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    ae.bn.running_mean.copy_(0.3 * torch.randn(ae.bn.running_mean.shape, generator=g))
    ae.bn.running_var.copy_(0.5 + torch.rand(ae.bn.running_var.shape, generator=g))
    return ae


def write_flux2_repo(
    root: Path,
    transformer_file: str = "flux-2-klein-4b.safetensors",
    vae_format: str = "diffusers",
    seed: int = 0,
    distilled: bool = True,
    std: float = 0.15,
    **transformer_overrides,
) -> dict:
    """A FLUX.2-klein repo in the official layout; returns the diffusers/transformers reference models. `std`: of the
    transformer's random weights (smaller: an output closer to a trained model's unit scale)."""
    from flux2_klein import ae_from_diffusers

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    transformer = tiny_flux2_transformer(seed, std, **transformer_overrides)
    save_file({k: v.contiguous() for k, v in flux2_to_bfl(transformer.state_dict()).items()}, root / transformer_file)
    (root / "transformer").mkdir(exist_ok=True)  # the repo's diffusers transformer/: only its config is read
    (root / "transformer" / "config.json").write_text(json.dumps(dict(transformer.config)))
    ae = tiny_flux2_ae(seed + 1)
    if vae_format == "bfl":
        bfl = {k: v.contiguous() for k, v in ae_from_diffusers(ae.state_dict()).items()}
        save_file(bfl, root / "ae.safetensors")
    else:
        ae.save_pretrained(root / "vae")
    qwen = tiny_qwen3(seed + 2, TINY_QWEN3_VOCAB, FLUX2_QWEN3_HIDDEN, causal_lm=True, num_layers=FLUX2_QWEN3_LAYERS)
    qwen.save_pretrained(root / "text_encoder", max_shard_size="100KB")
    write_tiny_tokenizer("qwen3", root / "tokenizer")
    index = {"_class_name": "Flux2KleinPipeline", "is_distilled": distilled}
    (root / "model_index.json").write_text(json.dumps(index))
    return {"transformer": transformer, "ae": ae, "text_encoder": qwen, "root": root, "distilled": distilled}


def diffusers_flux2_pipeline(refs: dict, distilled: bool | None = None):
    """diffusers' Flux2KleinPipeline assembled from the same reference modules and the repo's tiny tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import AutoTokenizer

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=refs["ae"],
        text_encoder=refs["text_encoder"],
        tokenizer=AutoTokenizer.from_pretrained(refs["root"] / "tokenizer"),
        transformer=refs["transformer"],
        is_distilled=refs["distilled"] if distilled is None else distilled,
    )


def diffusers_flux2_velocity(ref, x, sigma, txt, references=()):
    """diffusers' Flux2Transformer2DModel on our latent layout (B, 128, h, w) with reference latents appended as
    Flux2KleinPipeline does; returns (B, 128, h, w)."""
    from diffusers import Flux2KleinPipeline as P

    b, c, h, w = x.shape
    img, ids = P._pack_latents(x), P._prepare_latent_ids(x)
    if references:
        ref_ids = P._prepare_image_ids(list(references))
        packed = torch.cat([P._pack_latents(r).squeeze(0) for r in references])[None].expand(b, -1, -1)
        img, ids = torch.cat([img, packed], 1), torch.cat([ids, ref_ids.expand(b, -1, -1)], 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(b)
    out = ref(
        hidden_states=img,
        encoder_hidden_states=txt,
        timestep=sigma,
        img_ids=ids,
        txt_ids=P._prepare_text_ids(txt),
        guidance=None,
        return_dict=False,
    )[0]
    return out[:, : h * w].transpose(1, 2).reshape(b, c, h, w)
