"""FLUX.2-klein: official-layout loading and parity with diffusers/transformers fed the same weights (fp32, tiny
configs): transformer, autoencoder, Qwen3 text features, the whole Flux2KleinPipeline (text to image, base with CFG,
editing with reference images), LoRA files both ways, and sample.py end to end."""

import json
import shutil

import numpy as np
import pytest
import torch
from fakes import (
    TOKENIZERS,
    VARIED_PROMPTS,
    diffusers_flux2_pipeline,
    diffusers_flux2_velocity,
    flux2_to_bfl,
    random_prompts,
    rel,
    tiny_flux2_transformer,
    write_flux2_repo,
)
from PIL import Image
from safetensors.torch import load_file, save_file

import flux2_klein as fk
import lora
import sample

PROMPTS = ["a photo of a cat", "一只在雪地里的狐狸, watercolor, highly detailed, soft morning light, 4k!"]


@pytest.fixture(scope="module")
def pipe(flux2_repo):
    return fk.load(flux2_repo[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref_pipe(flux2_repo):
    return diffusers_flux2_pipeline(flux2_repo[1])


def ours_from_diffusers(ref_pipe, latents):
    """diffusers' pipeline returns de-normalised latents (B, 32, H/8, W/8); ours are patchified and normalised."""
    bn = ref_pipe.vae.bn
    z = ref_pipe._patchify_latents(latents)
    return (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)


def picture(width, height, seed):
    """A smooth random picture (a random image would make the autoencoder's output mostly noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x * rng.random() + 4 * y * rng.random() + rng.random() * 6) for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# The key inverse used to write the fake checkpoints is checked against diffusers' own converter.


@pytest.mark.parametrize("guidance_embeds", [False, True])  # klein, and FLUX.2-dev's guidance embedder
def test_bfl_inverse_round_trips_through_diffusers_converter(guidance_embeds):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    original = tiny_flux2_transformer(guidance_embeds=guidance_embeds).state_dict()
    bfl = flux2_to_bfl(original)
    assert not any(k.endswith(".bias") for k in bfl)  # FLUX.2 has no biases
    assert ("guidance_in.in_layer.weight" in bfl) == guidance_embeds
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def test_load_reads_official_layout_exactly(flux2_repo, pipe):
    root, refs = flux2_repo
    assert (root / "text_encoder" / "model.safetensors.index.json").is_file()  # sharded, as the real repo
    assert pipe.variant == "flux2-klein-4b" and pipe.defaults.steps == 4 and pipe.defaults.cfg == 1.0
    p = pipe.transformer.params
    assert (p.depth, p.depth_single_blocks, p.num_heads, p.hidden_size, p.context_in_dim) == (2, 2, 2, 32, 48)
    assert p.axes_dim == (4, 4, 4, 4) and p.mlp_ratio == 3.0 and not p.guidance_embed
    # load_into's strict load refused any missing/unexpected key; also check every tensor arrived intact.
    on_disk = load_file(root / "flux-2-klein-4b.safetensors")
    ours = pipe.transformer.state_dict()
    assert ours.keys() == on_disk.keys() and all(torch.equal(ours[k], v) for k, v in on_disk.items())
    # Qwen3: 27 of the 28 layers are built, no final norm.
    assert len(pipe.text_encoder.layers) == 27 and refs["text_encoder"].config.num_hidden_layers == 28
    # The diffusers vae/: every tensor but BatchNorm's update counter, renamed to BFL's names.
    vae = load_file(root / "vae" / "diffusion_pytorch_model.safetensors")
    ae = pipe.ae.state_dict()
    assert len(ae) == len(vae) - 1 and "bn.num_batches_tracked" in vae
    assert torch.equal(ae["encoder.quant_conv.weight"], vae["quant_conv.weight"])
    assert torch.equal(ae["bn.running_var"], vae["bn.running_var"]) and ae["bn.running_var"].dtype == torch.float32


def test_bfl_ae_file_loads_the_same(flux2_repo, pipe, tmp_path):
    """BFL's ae.safetensors layout (as in the FLUX.2-dev repo, BatchNorm counter included) gives the same AE."""
    ae = flux2_repo[1]["ae"]
    bfl = {k: v.contiguous() for k, v in fk.ae_from_diffusers(ae.state_dict()).items()}
    assert "encoder.quant_conv.weight" in bfl and "decoder.post_quant_conv.weight" in bfl
    save_file(bfl, tmp_path / "ae.safetensors")
    loaded = fk.load_ae(tmp_path / "ae.safetensors")
    a, b = loaded.state_dict(), pipe.ae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = fk.load_ae(tmp_path / "ae.safetensors", dtype=torch.bfloat16)  # the BatchNorm statistics stay exact
    assert half.encoder.conv_in.weight.dtype == torch.bfloat16 and torch.equal(half.bn.running_var, b["bn.running_var"])
    # A whole repo with ae.safetensors instead of vae/ loads too.
    repo = tmp_path / "repo"
    shutil.copytree(flux2_repo[0], repo, ignore=shutil.ignore_patterns("vae"))
    shutil.copy(tmp_path / "ae.safetensors", repo)
    assert fk.load(repo, dtype=torch.float32).ae.state_dict().keys() == b.keys()


def test_load_errors_are_clear(flux2_repo, tmp_path):
    with pytest.raises(ValueError, match="unknown FLUX.2-klein variant"):
        fk.load("flux2-klein-7b")
    repo = tmp_path / "repo"
    shutil.copytree(flux2_repo[0], repo)
    shutil.rmtree(repo / "vae")
    with pytest.raises(FileNotFoundError, match="vae/"):
        fk.load(repo)
    # A FLUX.1 or biased checkpoint is refused with a clear message.
    sd = load_file(repo / "flux-2-klein-4b.safetensors")
    save_file({**sd, "vector_in.in_layer.weight": torch.zeros(1)}, repo / "flux-2-klein-4b.safetensors")
    with pytest.raises(ValueError, match="FLUX.1 checkpoint"):
        fk.load_transformer(repo / "flux-2-klein-4b.safetensors")
    save_file({**sd, "img_in.bias": torch.zeros(32)}, repo / "flux-2-klein-4b.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected .*img_in\.bias"):
        fk.load_transformer(repo / "flux-2-klein-4b.safetensors")


def test_variants_and_detection(flux2_repo, tmp_path):
    assert sample.resolve_model("flux2") == (fk, "flux2-klein-4b")
    repos = {"flux2-klein-4b": "klein-4B", "flux2-klein-9b": "klein-9B"}
    repos |= {"flux2-klein-base-4b": "klein-base-4B", "flux2-klein-base-9b": "klein-base-9B"}
    for name, v in fk.VARIANTS.items():
        assert (v.steps, v.cfg, v.distilled) == ((4, 1.0, True) if "base" not in name else (50, 4.0, False))
        assert v.repo == f"black-forest-labs/FLUX.2-{repos[name]}"
    repo = tmp_path / "repo"
    shutil.copytree(flux2_repo[0], repo)
    (repo / "flux-2-klein-4b.safetensors").rename(repo / "flux-2-klein-base-4b.safetensors")
    assert fk.load(repo, dtype=torch.float32).variant == "flux2-klein-base-4b"
    (repo / "flux-2-klein-base-4b.safetensors").rename(repo / "my-finetune.safetensors")
    (repo / "model_index.json").write_text(json.dumps({"is_distilled": False}))
    assert fk.detect_variant(repo) == "flux2-klein-base-4b"
    assert set(fk.component_files(fk.VARIANTS["flux2-klein-4b"])) >= {"vae/*", "text_encoder/*", "tokenizer/*"}


# ---------------------------------------------------------------------------------------------------------------------
# Parts against diffusers / transformers


def test_rope_axes_from_repo_config(tmp_path):
    """An uneven RoPE split of the head, which the BFL file's shapes cannot tell: read from transformer/config.json."""
    refs = write_flux2_repo(tmp_path, axes_dims_rope=(2, 6, 4, 4), num_layers=1, num_single_layers=1)
    pipe = fk.load(tmp_path, dtype=torch.float32)
    assert pipe.transformer.params.axes_dim == (2, 6, 4, 4)
    x, txt, references = torch.randn(1, 128, 3, 4), torch.randn(1, 6, 48), [torch.randn(1, 128, 2, 2)]
    with torch.no_grad():
        ours = pipe.velocity(x, 0.4, {"txt": txt}, references)
        theirs = diffusers_flux2_velocity(refs["transformer"], x, 0.4, txt, references)
    assert rel(ours, theirs) < 1e-5
    (tmp_path / "transformer" / "config.json").unlink()
    assert fk.load(tmp_path, dtype=torch.float32).transformer.params.axes_dim == (4, 4, 4, 4)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"axes_dims_rope": [3, 5, 4, 4]}))
    with pytest.raises(ValueError, match=r"RoPE axes \(3, 5, 4, 4\) \(transformer/config.json\)"):
        fk.load(tmp_path, dtype=torch.float32)


def test_velocity_matches_diffusers(pipe, flux2_repo):
    ref = flux2_repo[1]["transformer"]
    torch.manual_seed(0)
    x, txt, sigma = torch.randn(2, 128, 3, 5), torch.randn(2, 20, 48), torch.tensor([0.3, 0.85])
    references = [torch.randn(1, 128, 4, 2), torch.randn(1, 128, 2, 3)]  # two references of different sizes
    with torch.no_grad():
        ours = pipe.velocity(x, sigma, {"txt": txt}, references)
        theirs = diffusers_flux2_velocity(ref, x, sigma, txt, references)
        plain = pipe.velocity(x, sigma, {"txt": txt})
        plain_theirs = diffusers_flux2_velocity(ref, x, sigma, txt)
    assert theirs.abs().mean() > 1e-2
    assert rel(ours, theirs) < 1e-5 and rel(plain, plain_theirs) < 1e-5
    assert rel(ours, plain) > 1e-3  # the references really take part
    swapped = pipe.velocity(x, sigma, {"txt": txt}, references[::-1])
    assert rel(swapped, ours) > 1e-4  # their order (time positions 10, 20) matters


def test_guidance_embedder_only_when_present(pipe):
    """A FLUX.2-dev-style checkpoint (guidance_in) takes distilled guidance as diffusers does; klein refuses it."""
    ref = tiny_flux2_transformer(seed=4, guidance_embeds=True)
    sd = flux2_to_bfl(ref.state_dict())
    with torch.device("meta"):
        model = fk.Flux2(fk.flux2_params_from_state_dict(sd))
    model = fk.load_into(model, sd, "test").eval()
    assert model.guidance_in is not None
    torch.manual_seed(1)
    x, txt, ids = torch.randn(1, 12, 128), torch.randn(1, 7, 48), fk.token_ids(3, 4, 0, "cpu")
    with torch.no_grad():
        ours = model(x, ids, txt, fk.text_ids(7, "cpu"), torch.tensor([0.6]), torch.tensor([3.5]))
        theirs = ref(x, txt, torch.tensor([0.6]), ids[None], fk.text_ids(7, "cpu")[None], torch.tensor([3.5]))[0]
    assert rel(ours, theirs) < 1e-5
    with pytest.raises(ValueError, match="no guidance embedder"):
        pipe.velocity(torch.zeros(1, 128, 2, 2), 0.5, {"txt": torch.zeros(1, 4, 48)}, guidance=3.5)


def test_autoencoder_matches_diffusers(pipe, ref_pipe):
    pixels = torch.from_numpy(np.array(picture(64, 48, 0))).permute(2, 0, 1)[None].float() / 127.5 - 1
    pixels = torch.cat([pixels, pixels.flip(-1)])
    ours = pipe.encode(pixels)
    with torch.no_grad():
        theirs = ref_pipe._encode_vae_image(pixels, generator=None)  # posterior mean, patchify, BatchNorm
        assert ours.shape == theirs.shape == (2, 128, 3, 4)
        assert rel(ours, theirs) < 1e-5
        z = torch.randn(2, 128, 3, 4, generator=torch.Generator().manual_seed(0))
        bn = ref_pipe.vae.bn
        raw = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4) + bn.running_mean.view(1, -1, 1, 1)
        theirs = ref_pipe.vae.decode(ref_pipe._unpatchify_latents(raw)).sample
    assert rel(pipe.decode(z), theirs) < 1e-5
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.encode(pixels[..., :40])


@pytest.mark.slow
def test_text_features_are_qwen3_layers_9_18_27(pipe, ref_pipe):
    prompts = [*PROMPTS, "", "long " * 600]  # the last is truncated at 512 tokens
    ours = pipe.encode_prompt(prompts)["txt"]
    assert ours.shape == (4, 512, 48)
    with torch.no_grad():
        theirs = ref_pipe._get_qwen3_prompt_embeds(ref_pipe.text_encoder, ref_pipe.tokenizer, prompts)
        ids, mask = pipe.tokenizer(pipe.tokenizer.chat(prompts, enable_thinking=False))
        hidden = ref_pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert rel(ours, theirs) < 1e-5
    # The three blocks of features are the raw outputs of layers 9, 18 and 27 (of 28), and not their neighbours.
    for block, k in zip(ours.split(16, dim=-1), fk.TEXT_LAYERS):
        assert rel(block, hidden[k]) < 1e-5 and rel(block, hidden[k + 1]) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# The whole pipeline against diffusers' Flux2KleinPipeline, from the same noise


def generate_both(pipe, ref_pipe, steps=4, cfg=1.0, images=None, size=(48, 64), seed=4):
    h, w = size
    noise = torch.randn(2, 128, h // 16, w // 16, generator=torch.Generator().manual_seed(seed))
    ours = pipe.generate(PROMPTS, steps=steps, cfg=cfg, noise=noise, images=images, output="latent", progress=False)
    with torch.no_grad():
        theirs = ref_pipe(
            prompt=PROMPTS,
            image=images,
            guidance_scale=cfg,
            num_inference_steps=steps,
            latents=noise,
            output_type="latent",
            height=h,
            width=w,
        ).images
    return ours, ours_from_diffusers(ref_pipe, theirs)


@pytest.mark.slow
def test_generate_distilled_matches_diffusers(pipe, ref_pipe):
    ours, theirs = generate_both(pipe, ref_pipe)
    assert rel(ours, theirs) < 1e-4


@pytest.mark.slow
def test_generate_base_with_cfg_matches_diffusers(flux2_repo):
    base = fk.load(flux2_repo[0], variant="flux2-klein-base-4b", dtype=torch.float32)
    assert base.defaults.cfg == 4.0 and base.defaults.steps == 50
    ref_base = diffusers_flux2_pipeline(flux2_repo[1], distilled=False)
    ours, theirs = generate_both(base, ref_base, steps=3, cfg=4.0)
    assert rel(ours, theirs) < 1e-4
    plain, _ = generate_both(base, ref_base, steps=3, cfg=1.0)
    assert rel(ours, plain) > 1e-3  # CFG really changed the result


def test_editing_with_two_references_matches_diffusers(pipe, ref_pipe):
    images = [picture(100, 84, 1), picture(70, 66, 2)]  # center-cropped to 96x80 and 64x64
    latents = pipe.encode_references(images)
    assert [tuple(z.shape) for z in latents] == [(1, 128, 5, 6), (1, 128, 4, 4)]
    with torch.no_grad():
        prepared = [
            ref_pipe.image_processor.preprocess(im, height=h, width=w, resize_mode="crop")
            for im, (w, h) in zip(images, [(96, 80), (64, 64)])
        ]
        theirs, _ = ref_pipe.prepare_image_latents(prepared, 1, None, "cpu", torch.float32)
    assert rel(torch.cat([fk.tokens(z) for z in latents], 1), theirs) < 1e-5
    # Output size: the first reference's, as in diffusers (BFL's CLI match_image_size=0).
    ours, theirs = generate_both(pipe, ref_pipe, steps=3, images=images, size=(80, 96))
    assert rel(ours, theirs) < 1e-4
    plain, _ = generate_both(pipe, ref_pipe, steps=3, size=(80, 96))
    assert rel(ours, plain) > 1e-3
    out = pipe.generate(PROMPTS[0], steps=1, images=images, output="pt", progress=False)
    assert out.shape == (1, 3, 80, 96)


def test_references_are_encoded_once_per_call(pipe, monkeypatch):
    calls = []
    encode = pipe.ae.encode
    monkeypatch.setattr(pipe.ae, "encode", lambda x: calls.append(x.shape) or encode(x))
    images = [picture(64, 64, 3), picture(80, 64, 4)]
    pipe.generate(PROMPTS, steps=3, cfg=2.0, height=32, width=32, images=images, output="latent", progress=False)
    assert calls == [(1, 3, 64, 64), (1, 3, 64, 80)]


def test_reference_size_rules():
    # BFL's rules: at least 64 pixels a side, aspect at most 8, an area cap, then a center crop to multiples of 16.
    (one,) = fk.reference_pixels([picture(100, 70, 0)])
    assert one.shape == (1, 3, 64, 96) and -1 <= one.min() and one.max() <= 1
    big = picture(1100, 1000, 0)
    (alone,) = fk.reference_pixels([big])  # one reference: capped at 2024^2 pixels, so only cropped
    assert alone.shape[-2:] == (992, 1088)
    several = fk.reference_pixels([big, picture(64, 64, 1)])  # several: each capped at 1024^2 pixels
    w, h = int(1100 * (1024**2 / 1.1e6) ** 0.5), int(1000 * (1024**2 / 1.1e6) ** 0.5)
    assert several[0].shape[-2:] == (h // 16 * 16, w // 16 * 16) and several[1].shape[-2:] == (64, 64)
    huge = Image.new("RGB", (2100, 2000))
    (capped,) = fk.reference_pixels([huge])
    assert capped.shape[-2] * capped.shape[-1] <= 2024**2 < 2100 * 2000
    with pytest.raises(ValueError, match="at least 64"):
        fk.reference_pixels([picture(63, 200, 0)])
    with pytest.raises(ValueError, match="aspect ratio above 8"):
        fk.reference_pixels([picture(1000, 100, 0)])
    with pytest.raises(ValueError, match="at most 4 reference images"):
        fk.reference_pixels([picture(64, 64, 0)] * 5)


def test_batch_of_prompts_equals_one_at_a_time(pipe):
    images = [picture(64, 80, 5)]
    kw = dict(height=32, width=48, steps=2, output="latent", progress=False, cfg=2.0, negative_prompt="blurry")
    batch = pipe.generate(PROMPTS, seed=[3, 4], images=images, **kw)
    alone = torch.cat([pipe.generate(p, seed=s, images=images, **kw) for p, s in zip(PROMPTS, [3, 4])])
    assert rel(batch, alone) < 1e-5


@pytest.fixture(scope="module")
def smooth_pipe(flux2_repo):
    """A random model's velocity oscillates in time as fast as the highest timestep-embedding frequency and is nearly
    chaotic; a trained one is smooth. Damped weights and no high time frequencies make the tiny model's ODE smooth
    enough for step counts a test can afford (as in test_zimage.py). One prompt throughout, encoded once and cut to
    its first 32 tokens, so that each step is cheap (this test is about the solvers, not the text)."""
    smooth = fk.load(flux2_repo[0], device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, p in smooth.transformer.named_parameters():
            if "norm" not in name:
                p.mul_(0.5)
        w = smooth.transformer.time_in.in_layer.weight  # inputs: 128 cosines then 128 sines, fastest first
        w[:, :64], w[:, 128:192] = 0, 0
    cond = {"txt": smooth.encode_prompt(PROMPTS[0])["txt"][:, :32]}
    smooth.encode_prompt = lambda prompts: cond
    kw = dict(height=32, width=32, seed=0, output="latent", progress=False)
    return smooth, kw, smooth.generate(PROMPTS[0], steps=200, solver="unipc", **kw)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "unipc", "rfpc"])
def test_solvers_agree_as_steps_grow(smooth_pipe, solver):
    smooth, kw, fine = smooth_pipe
    errors = [rel(smooth.generate(PROMPTS[0], steps=n, solver=solver, **kw), fine) for n in (5, 40)]
    assert all(np.isfinite(errors)) and errors[1] < errors[0] / 4 and errors[1] < 0.05


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate("x", height=40, width=48, steps=1, progress=False)
    with pytest.raises(ValueError, match="no guidance embedder"):
        pipe.generate("x", height=32, width=32, steps=1, guidance=3.5, progress=False)
    with pytest.raises(ValueError, match="cannot read reference image"):
        pipe.generate("x", steps=1, images=[__file__], progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer: klein's chat template and ids on the real Qwen3 vocabulary (test_zimage_text.py checks the tokenizer
# itself; this checks what klein feeds it, prompt by prompt as diffusers' Flux2KleinPipeline does).


def test_klein_token_ids_match_transformers_real_vocabulary():
    folder = TOKENIZERS / "qwen3"
    if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"real Qwen3 tokenizer files not found under {folder}")
    from transformers import AutoTokenizer

    ours, ref = fk.Qwen3Tokenizer(folder / "tokenizer.json", fk.TEXT_LENGTH), AutoTokenizer.from_pretrained(folder)
    prompts = VARIED_PROMPTS + random_prompts(20, seed=3, suffixes=("", " <|im_end|>", "<think>", "\n"))
    assert len(prompts) >= 50
    ids, mask = ours(ours.chat(prompts, enable_thinking=False))
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        want = ref(text, padding="max_length", truncation=True, max_length=512)
        assert ids[i].tolist() == want.input_ids and mask[i].tolist() == want.attention_mask, prompt


# ---------------------------------------------------------------------------------------------------------------------
# LoRA: ours in diffusers, and files other tools write in ours


def velocity_both(pipe, ref_transformer, references=True):
    torch.manual_seed(5)
    x, txt, sigma = torch.randn(2, 128, 3, 4), torch.randn(2, 9, 48), torch.tensor([0.3, 0.8])
    refs = [torch.randn(1, 128, 2, 3)] if references else []
    with torch.no_grad():
        return pipe.velocity(x, sigma, {"txt": txt}, refs), diffusers_flux2_velocity(
            ref_transformer, x, sigma, txt, refs
        )


def fresh_ref_pipe(flux2_repo):
    import copy

    return diffusers_flux2_pipeline({**flux2_repo[1], "transformer": copy.deepcopy(flux2_repo[1]["transformer"])})


def test_trained_lora_loads_in_diffusers(flux2_repo, tmp_path):
    root, refs = flux2_repo
    trained = fk.load(root, dtype=torch.float32)
    names = lora.add_lora(trained.transformer, fk.LORA_TARGETS, rank=4, alpha=2.0)
    assert len(names) == 8 * 2 + 2 * 2
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_parameters(trained.transformer):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    path = tmp_path / "klein_lora.safetensors"
    lora.save(trained.transformer, path, fk.LORA_FORMAT, {"base_model": "flux2-klein-base-4b"}, dtype=torch.float32)
    keys = load_file(path).keys()
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
    for i in range(2):  # every single block has both linears (diffusers#13107)
        assert {f"diffusion_model.single_blocks.{i}.linear{j}.lora_B.weight" for j in (1, 2)} <= keys
    ref_pipe = fresh_ref_pipe(flux2_repo)
    ref_pipe.load_lora_weights(path)
    ours, theirs = velocity_both(trained, ref_pipe.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, velocity_both(trained, refs["transformer"])[1]) > 1e-2  # diffusers really applied it
    again = fk.load(root, dtype=torch.float32)
    again.load_lora(path)
    assert rel(velocity_both(again, refs["transformer"])[0], ours) < 1e-6


@pytest.mark.parametrize("family", ["peft", "kohya", "comfy"])
def test_loras_from_the_wild(flux2_repo, tmp_path, family):
    """A LoRA written by another tool loads into our model and gives what diffusers gives with the same LoRA."""
    root, refs = flux2_repo
    ref_pipe = fresh_ref_pipe(flux2_repo)
    targets = [  # diffusers' names: separate q/k/v, fused single-block linears, MLPs, a modulation, the final layer
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.1.attn.add_k_proj",
        "transformer_blocks.0.ff.linear_in",
        "transformer_blocks.1.ff_context.linear_out",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.1.attn.to_out",
        "double_stream_modulation_img.linear",
        "norm_out.linear",
    ]
    g = torch.Generator().manual_seed(0)
    pairs = {}
    for name in targets:
        m = ref_pipe.transformer.get_submodule(name)
        a, b = 0.3 * torch.randn(4, m.in_features, generator=g), 0.3 * torch.randn(m.out_features, 4, generator=g)
        pairs[name] = (a, b)
    peft = {f"transformer.{n}.lora_{k}.weight": t for n, (a, b) in pairs.items() for k, t in (("A", a), ("B", b))}
    save_file(peft, tmp_path / "peft.safetensors")
    ref_pipe.load_lora_weights(tmp_path / "peft.safetensors")
    pipe = fk.load(root, dtype=torch.float32)
    if family == "peft":
        path = tmp_path / "peft.safetensors"
    else:  # BFL names, fused q/k/v: kohya (lora_unet_ + alpha) or ComfyUI/ai-toolkit (diffusion_model. + lora_A/B)
        patches = {name: lora.Patch(down=a, up=b) for name, (a, b) in pairs.items()}
        bfl, unusable = lora.route(patches, fk.lora_aliases(pipe.transformer.params), pipe.transformer)
        assert not unusable
        state = {}
        for name, (a, b) in ((n, (p.down, p.up)) for n, p in bfl.items()):
            if family == "kohya":
                key, r = "lora_unet_" + name.replace(".", "_"), a.shape[0]
                state |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b * r / 3.0}
                state[f"{key}.alpha"] = torch.tensor(3.0)
            else:
                state |= {f"diffusion_model.{name}.lora_A.weight": a, f"diffusion_model.{name}.lora_B.weight": b}
        save_file(state, path := tmp_path / f"{family}.safetensors")
    touched = pipe.load_lora(path)
    assert len(touched) == 8  # q and v fused into one qkv LoRA
    ours, theirs = velocity_both(pipe, ref_pipe.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, velocity_both(pipe, refs["transformer"])[1]) > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# sample.py end to end


def test_sample_cli_text_to_image_and_editing(flux2_repo, zimage_repo, tmp_path, capsys):
    common = ["--weights", str(flux2_repo[0]), "--steps", "2", "--device", "cpu", "--quiet", "--seed", "7"]
    assert sample.main(["flux2", "a fox", "--size", "48x32", "--out", str(tmp_path / "t2i"), *common]) == 0
    a = Image.open(tmp_path / "t2i" / "00000-7.png")
    settings = json.loads(a.text["parameters"])
    assert a.size == (48, 32) and settings["variant"] == "flux2-klein-4b" and settings["model"] == "flux2"
    assert settings["steps"] == 2 and settings["cfg"] == 1.0 and "guidance" not in settings
    picture(100, 84, 1).save(tmp_path / "a.png")
    picture(70, 66, 2).save(tmp_path / "b.jpg")
    edit = [*common, "--out", str(tmp_path / "edit"), "--image", str(tmp_path / "a.png"), "--image"]
    assert sample.main(["flux2", "the fox in the room", *edit, str(tmp_path / "b.jpg")]) == 0
    b = Image.open(tmp_path / "edit" / "00000-7.png")
    settings = json.loads(b.text["parameters"])
    assert b.size == (96, 80)  # the first reference's size, cropped to multiples of 16
    assert settings["images"] == f"{tmp_path / 'a.png'}, {tmp_path / 'b.jpg'}" and settings["size"] == "96x80"
    capsys.readouterr()

    def one_line_error(argv, needle):
        assert sample.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err

    one_line_error(["flux2", "x", *edit, str(tmp_path / "missing.png")], "cannot read --image")
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    one_line_error(["flux2", "x", *edit, str(tmp_path / "broken.png")], "cannot read --image")
    picture(40, 200, 3).save(tmp_path / "small.png")
    one_line_error(["flux2", "x", *edit, str(tmp_path / "small.png")], "at least 64")
    one_line_error(["flux2", "x", *edit, str(tmp_path / "a.png"), "--image", str(tmp_path / "a.png"), "--image",
                    str(tmp_path / "a.png"), "--image", str(tmp_path / "a.png")], "at most 4")  # fmt: skip
    one_line_error(["flux2", "x", *common, "--guidance", "3", "--out", str(tmp_path / "g")], "no guidance embedder")
    zimage_run = ["zimage", "x", "--weights", str(zimage_repo[0]), "--image", str(tmp_path / "a.png"), *common[2:]]
    one_line_error(zimage_run, "zimage does not take --image")


def test_sample_cli_int8_and_offload(flux2_repo, tmp_path, monkeypatch):
    import int8

    quantized = []
    original = int8.quantize
    monkeypatch.setattr(int8, "quantize", lambda m: quantized.extend(original(m, min_features=16)) or quantized)
    common = ["flux2", "x", "--weights", str(flux2_repo[0]), "--size", "32x32", "--steps", "2", "--device", "cpu"]
    common += ["--quiet", "--seed", "3"]
    runs = {"plain": [], "int8": ["--int8"], "offload": ["--offload", "blocks"]}
    for name, extra in runs.items():
        assert sample.main([*common, "--out", str(tmp_path / name), *extra]) == 0
    assert "single_blocks.0.linear1" in quantized and not any("modulation" in n for n in quantized)
    plain, quant, offloaded = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))).astype(int) for d in runs)
    assert 0 < np.abs(plain - quant).mean() < 20  # close to float, but not the float path
    assert np.abs(plain - offloaded).max() <= 1
