"""Z-Image's (and FLUX.2-klein's) Qwen3 text side against transformers, the test-only parity oracle: chat template and
tokenizer on the real Qwen3 vocabulary, the truncated encoder on a tiny random Qwen3, and loading."""

import json
from pathlib import Path

import pytest
import torch
from fakes import LONG_PROMPT, TOKENIZERS, VARIED_PROMPTS, max_rel, random_prompts, randomize, write_tiny_tokenizer
from safetensors.torch import load_file, save_file

from zimage import Qwen3Config, Qwen3Encoder, Qwen3Tokenizer, encode_captions, load_qwen3

# ----------------------------------------------------------------------------------------------------------------------
# Chat template and tokenizer, on the real Qwen3 files.

PROMPTS = VARIED_PROMPTS + [
    "line one\nline two\n\nline four\n\n\n",
    "\n\nstarts with newlines",
    "IT'S SHOUTED, DON'T, WE'LL",
    "\u4e00\u53ea\u5728\u8349\u5730\u4e0a\u5954\u8dd1\u7684\u72d7\uff0c\u9633\u5149\u660e\u5a9a\u3002",
    "<|im_start|>system\nspecial tokens typed in the prompt<|im_end|>",
    "<|endoftext|> pad token text, and <|ENDOFTEXT|> in upper case",
    "<think>reasoning typed in</think> and <tool_call>x</tool_call>",
    "<tool_response>looks like a tool response</tool_response>",
    "<|vision_start|><|image_pad|><|vision_end|> <|fim_prefix|>",
    "{{ jinja }} {% if x %} {# comment #} and {'role': 'user'}",
    "1234567890" * 20,  # each digit is its own Qwen3 token
    "\u4e2d" * 600,  # > 512 tokens
    LONG_PROMPT * 2,
    (LONG_PROMPT * 2).upper(),
]
QWEN3_SUFFIXES = ("", "'s", "'LL", " <|im_end|>", "<|endoftext|>", "<think>", "\n")


@pytest.fixture(scope="module")
def qwen3_files() -> Path:
    folder = TOKENIZERS / "qwen3"
    if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"real Qwen3 tokenizer files not found under {folder} (tokenizer.json, tokenizer_config.json)")
    return folder


@pytest.fixture(scope="module")
def tokenizers(qwen3_files):
    """(ours, transformers'), the latter loaded as diffusers' ZImagePipeline loads its `tokenizer/`."""
    from transformers import AutoTokenizer

    return Qwen3Tokenizer(qwen3_files / "tokenizer.json"), AutoTokenizer.from_pretrained(qwen3_files)


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """(ours, transformers') on the tiny Qwen3 tokenizer of tests/fakes.py: for the tests that need ids, not the real
    vocabulary."""
    from transformers import AutoTokenizer

    folder = write_tiny_tokenizer("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))
    return Qwen3Tokenizer(folder / "tokenizer.json"), AutoTokenizer.from_pretrained(folder)


def test_tiny_tokenizer_matches_transformers(tiny_tokenizers):
    """The tiny files every pipeline test uses give the same ids to both sides (so those tests compare like with
    like), with the real pipeline's behaviour: chat template, special tokens kept whole, padding, truncation."""
    ours, ref = tiny_tokenizers
    prompts = PROMPTS + random_prompts(40, seed=2, suffixes=QWEN3_SUFFIXES)
    for enable_thinking in (True, False):
        texts = ours.chat(prompts, enable_thinking=enable_thinking)
        assert texts == [hf_chat(ref, p, enable_thinking) for p in prompts]
        ids, mask = ours(texts)
        expected = ref(texts, padding="max_length", max_length=512, truncation=True)
        assert ids.tolist() == expected.input_ids and mask.tolist() == expected.attention_mask
    assert ours.pad_id == ref.pad_token_id
    im_start = ref.convert_tokens_to_ids("<|im_start|>")
    assert ours(ours.chat("a cat"))[0][0, 0] == im_start


def hf_chat(ref, prompt: str, enable_thinking: bool) -> str:
    messages = [{"role": "user", "content": prompt}]
    return ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )


def test_chat_template_matches_transformers(tokenizers):
    ours, ref = tokenizers
    prompts = PROMPTS + random_prompts(40, suffixes=QWEN3_SUFFIXES)
    for enable_thinking in (True, False):
        texts = ours.chat(prompts, enable_thinking=enable_thinking)
        for prompt, text in zip(prompts, texts):
            assert text == hf_chat(ref, prompt, enable_thinking), f"chat template differs for {prompt!r}"
    assert ours.chat("a cat") == ["<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"]
    assert ours.chat("a cat", enable_thinking=False) == [
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ]


def test_tokenizer_matches_transformers(tokenizers, qwen3_files):
    ours, ref = tokenizers
    config = json.loads((qwen3_files / "tokenizer_config.json").read_text())
    assert ours.pad_token == config["pad_token"] == ref.pad_token and ours.pad_id == ref.pad_token_id == 151643
    prompts = PROMPTS + random_prompts(40, seed=1, suffixes=QWEN3_SUFFIXES)
    for enable_thinking in (True, False):
        texts = ours.chat(prompts, enable_thinking=enable_thinking)
        # As ZImagePipeline (and Flux2KleinPipeline) tokenize: right padding to 512, truncation.
        ids, mask = ours(texts)
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (len(texts), 512)
        expected = ref(texts, padding="max_length", max_length=512, truncation=True)
        for prompt, got, got_mask, want, want_mask in zip(
            prompts, ids.tolist(), mask.tolist(), expected.input_ids, expected.attention_mask
        ):
            assert got == want and got_mask == want_mask, f"Qwen3 ids differ for {prompt!r}"
        # Padding to the longest text of the batch (what encode_captions uses).
        for start in range(0, len(texts), 16):
            ids, mask = ours(texts[start : start + 16], padding="longest")
            expected = ref(texts[start : start + 16], padding="longest", max_length=512, truncation=True)
            assert ids.tolist() == expected.input_ids and mask.tolist() == expected.attention_mask

    ids, mask = ours(ours.chat("a photo of a cat"))
    n = int(mask.sum())
    assert ids[0, :n].tolist() == [151644, 872, 198, 64, 6548, 315, 264, 8251, 151645, 198, 151644, 77091, 198]
    assert (ids[0, n:] == 151643).all() and (mask[0, n:] == 0).all()
    ids, mask = ours(ours.chat(LONG_PROMPT * 2))  # truncated: the end of the template is cut off, as in the pipelines
    assert mask.all() and ids[0, -1] != 151643
    assert ours("a bare string")[0].shape == (1, 512)  # a bare string is one text
    with pytest.raises(ValueError, match="padding must be"):
        ours("x", padding="do_not_pad")


# ----------------------------------------------------------------------------------------------------------------------
# Config


def test_config_from_dict():
    # Qwen/Qwen3-4B's config.json, as transformers 4.x wrote it.
    qwen3_4b = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "max_position_embeddings": 40960,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    assert Qwen3Config.from_dict(qwen3_4b) == Qwen3Config()
    v5 = {k: v for k, v in qwen3_4b.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert Qwen3Config.from_dict(v5).rope_theta == 5e5
    for change in (
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"hidden_act": "gelu"},
        {"attention_bias": True},
        {"use_sliding_window": True},
    ):
        with pytest.raises(ValueError, match="unsupported Qwen3 config"):
            Qwen3Config.from_dict({**qwen3_4b, **change})


# ----------------------------------------------------------------------------------------------------------------------
# Encoder: a tiny random Qwen3 (real vocabulary size, so the real tokenizer's ids work), saved sharded by transformers
# as Qwen3Model and as Qwen3ForCausalLM.

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def reference():
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3Model

    config = HFQwen3Config(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6,
    )
    return randomize(Qwen3Model(config), std=0.2, seed=0).eval()


def save_sharded(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    return folder


@pytest.fixture(scope="module")
def folders(reference, tmp_path_factory) -> dict[str, Path]:
    from transformers import Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("qwen3")
    causal = Qwen3ForCausalLM(reference.config)  # untied head, as Qwen3-8B (FLUX.2-klein-9B)
    causal.model.load_state_dict(reference.state_dict())
    causal.lm_head.weight.data.normal_(0, 0.2)
    folders = {
        "Qwen3Model": save_sharded(reference, root / "model"),
        "Qwen3ForCausalLM": save_sharded(causal, root / "lm"),
    }
    keys = json.loads((folders["Qwen3ForCausalLM"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" in keys and "model.norm.weight" in keys
    return folders


@pytest.fixture(scope="module")
def encoder(folders) -> Qwen3Encoder:
    return load_qwen3(folders["Qwen3Model"], num_layers=NUM_LAYERS - 1)


def reference_hidden_states(reference, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("layout", ["Qwen3Model", "Qwen3ForCausalLM"])
def test_load_layouts(folders, reference, layout):
    for num_layers in (0, 1, NUM_LAYERS - 1, NUM_LAYERS):
        model = load_qwen3(folders[layout], num_layers=num_layers)
        assert len(model.layers) == num_layers
        expected = {
            k: v
            for k, v in reference.state_dict().items()
            if k != "norm.weight" and not (k.startswith("layers.") and int(k.split(".")[1]) >= num_layers)
        }
        got = model.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
        assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_zimage_features_match_transformers(encoder, reference, tiny_tokenizers):
    tokenizer = tiny_tokenizers[0]
    prompts = ["a photo of a cat", "a cinematic shot of a baby racoon wearing an intricate italian priest robe, 35mm"]
    features = encode_captions(encoder, tokenizer, prompts)
    # The reference: ZImagePipeline's tokenization (padding to 512) and its feature, hidden_states[-2], unpadded.
    ids, mask = tokenizer(tokenizer.chat(prompts))
    hidden = reference_hidden_states(reference, ids, mask)
    assert len(hidden) == NUM_LAYERS + 1
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1]
    for i, f in enumerate(features):
        want = hidden[-2][i][mask[i].bool()]
        assert f.shape == want.shape == (lengths[i], 64)
        assert max_rel(f, want) < 1e-5
        # Not the final-normed last layer, and not some other layer.
        assert max_rel(f, hidden[-1][i][mask[i].bool()]) > 0.1 and max_rel(f, hidden[-3][i][mask[i].bool()]) > 0.1
    # No padding leak: each prompt alone gives the same features as in the padded batch.
    for prompt, f in zip(prompts, features):
        (alone,) = encode_captions(encoder, tokenizer, [prompt])
        assert max_rel(alone, f) < 1e-6


def test_klein_layers_match_transformers(encoder, reference, tiny_tokenizers):
    tokenizer = tiny_tokenizers[0]
    prompts = ["a photo of a cat", "", "\u4e00\u53ea\u72d7 and a much longer second prompt, with punctuation!"]
    ids, mask = tokenizer(tokenizer.chat(prompts, enable_thinking=False))  # padded to 512, as FLUX.2-klein does
    hidden = reference_hidden_states(reference, ids, mask)
    layers = [1, 2, 3]
    got = encoder(ids, mask, layers)
    # FLUX.2-klein keeps the padded positions, so they must match too.
    for k, g in zip(layers, got):
        assert g.shape == (3, 512, 64)
        assert max_rel(g, hidden[k]) < 1e-5, f"layer {k}"
    # Any order and the embeddings (k = 0).
    embeddings, layer_2 = encoder(ids, mask, [0, 2])
    assert torch.equal(embeddings, hidden[0]) and torch.equal(layer_2, got[1])
    with pytest.raises(ValueError, match="output_layers"):
        encoder(ids, mask, [NUM_LAYERS])


def test_bfloat16_matches_transformers(folders, tiny_tokenizers):
    from transformers import Qwen3Model

    tokenizer = tiny_tokenizers[0]
    ids, mask = tokenizer(tokenizer.chat(["a photo of a cat", "two dogs"]), padding="longest")
    model = load_qwen3(folders["Qwen3ForCausalLM"], num_layers=NUM_LAYERS - 1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    got = model(ids, mask, [1, NUM_LAYERS - 1])
    # Loaded as the pipelines load it (from_pretrained keeps RoPE's frequencies in fp32; `.to(bfloat16)` would not).
    ref = Qwen3Model.from_pretrained(folders["Qwen3Model"], dtype=torch.bfloat16).eval()
    hidden = reference_hidden_states(ref, ids, mask)
    m = mask.bool()
    # The same bf16 roundings as transformers (bit-identical on CPU here); a norm scaled in fp32 instead gives 4e-2.
    for k, g in zip([1, NUM_LAYERS - 1], got):
        assert g.dtype == torch.bfloat16 and max_rel(g[m], hidden[k][m]) < 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# Loading errors: one clear line each.


def one_line_error(exc_info):
    assert "\n" not in str(exc_info.value)


def test_loading_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found") as e:
        load_qwen3(tmp_path / "nowhere", num_layers=1)
    one_line_error(e)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json") as e:
        load_qwen3(tmp_path / "empty", num_layers=1)
    one_line_error(e)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folders["Qwen3Model"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights in") as e:
        load_qwen3(no_weights, num_layers=1)
    one_line_error(e)

    with pytest.raises(ValueError, match="num_layers must be in 0..4") as e:
        load_qwen3(folders["Qwen3Model"], num_layers=NUM_LAYERS + 1)
    one_line_error(e)

    # A key the model does not have (a q_proj bias), and a missing one (a kept layer's k_norm).
    state_dict = {}
    for shard in sorted(folders["Qwen3Model"].glob("*.safetensors")):
        state_dict.update(load_file(shard))
    extra, missing = tmp_path / "extra", tmp_path / "missing"
    for folder, sd in (
        (extra, {**state_dict, "layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
        (missing, {k: v for k, v in state_dict.items() if k != "layers.1.self_attn.k_norm.weight"}),
    ):
        folder.mkdir()
        (folder / "config.json").write_text((folders["Qwen3Model"] / "config.json").read_text())
        save_file(sd, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected .*q_proj\.bias") as e:
        load_qwen3(extra, num_layers=2)
    one_line_error(e)
    with pytest.raises(ValueError, match=r"1 missing .*k_norm") as e:
        load_qwen3(missing, num_layers=2)
    one_line_error(e)
    load_qwen3(missing, num_layers=1)  # layer 1 is dropped, so its missing weight does not matter

    with pytest.raises(FileNotFoundError, match="missing tokenizer file"):
        Qwen3Tokenizer(tmp_path / "tokenizer.json")
