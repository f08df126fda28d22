"""FLUX.1 Redux (flux1.py): SigLIP preprocessing and features against transformers, the Redux prompt embeddings
against diffusers' FluxPriorReduxPipeline on the same weights, generate(images=...), and sample.py --image."""

import json

import numpy as np
import pytest
import torch
from fakes import diffusers_flux_pipeline, randomize, rel
from PIL import Image
from safetensors.torch import save_file
from test_sample import cli, one_line_error, tiny_run

import flux1
import sample

# A tiny SigLIP in the so400m layout: 56 px inputs in 14 px patches (16 tokens), width 32; the projection maps it to
# the tiny FLUX.1's T5 width (48, fakes.FLUX_TINY's joint_attention_dim).
SIGLIP_TINY = dict(
    hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
)
# The Redux repo's feature_extractor/preprocessor_config.json, at the tiny model's input size.
PREPROCESSOR = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 56, "width": 56},
}


def write_redux_repo(root, seed: int = 0, embedder_format: str = "bfl") -> dict:
    """A tiny black-forest-labs/FLUX.1-Redux-dev: flux1-redux-dev.safetensors (or diffusers' image_embedder/),
    image_encoder/ as transformers 4.x wrote it (keys under vision_model., the unused pooling head included),
    feature_extractor/. Returns the transformers/diffusers reference modules."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    siglip = randomize(SiglipVisionModel(SiglipVisionConfig(**SIGLIP_TINY)), std=0.2, seed=seed).eval()
    embedder = randomize(ReduxImageEncoder(redux_dim=32, txt_in_features=48), std=0.2, seed=seed + 1).eval()
    (root / "image_encoder").mkdir(parents=True)
    save_file(
        {f"vision_model.{k}": v.contiguous() for k, v in siglip.state_dict().items()},
        root / "image_encoder" / "model.safetensors",
    )
    (root / "image_encoder" / "config.json").write_text(siglip.config.to_json_string())
    if embedder_format == "bfl":
        save_file({k: v.contiguous() for k, v in embedder.state_dict().items()}, root / flux1.REDUX_FILE)
    else:
        embedder.save_pretrained(root / "image_embedder")
    (root / "feature_extractor").mkdir()
    (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return {"image_encoder": siglip, "image_embedder": embedder}


@pytest.fixture(scope="module")
def redux_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux1-redux-dev")
    return root, write_redux_repo(root)


@pytest.fixture(scope="module")
def pipe(flux1_repo, redux_repo):
    pipe = flux1.load(flux1_repo[0], dtype=torch.float32)
    pipe.load_redux(redux_repo[0])
    return pipe


def pictures() -> list[Image.Image]:
    """Varied sizes (down- and upscaled, extreme aspect ratios, odd sides) and modes (grey, palette, transparency)."""
    rng = np.random.default_rng(0)

    def noise(h, w, c=3):
        return (rng.random((h, w, c)) * 255).astype(np.uint8)

    rgba = noise(45, 70, 4)
    rgba[..., 3] = np.linspace(0, 255, 70).astype(np.uint8)  # transparency: composited onto white
    return [
        Image.fromarray(noise(56, 56)),
        Image.fromarray(noise(300, 200)),
        Image.fromarray(noise(17, 301)),
        Image.fromarray(noise(9, 13)),
        Image.fromarray(noise(384, 512)),
        Image.fromarray(noise(64, 48, 1)[..., 0], mode="L"),
        Image.fromarray(noise(40, 60)).convert("P"),
        Image.fromarray(rgba, mode="RGBA"),
    ]


def test_preprocessing_equals_siglip_image_processor():
    # transformers' PIL-backed SiglipImageProcessor: what BFL's and diffusers' Redux code ran when Redux was released
    # (transformers 4.x); transformers 5 picks it when torchvision is missing, as here.
    from transformers import SiglipImageProcessor

    for config, ours in [
        (PREPROCESSOR, flux1.SiglipPreprocess((56, 56))),
        ({**PREPROCESSOR, "size": {"height": 384, "width": 384}}, flux1.SiglipPreprocess()),  # the real repo's
    ]:
        reference = SiglipImageProcessor(**{k: v for k, v in config.items() if k not in ("image_processor_type",)})
        images = pictures()
        theirs = reference(images=images, do_convert_rgb=True, return_tensors="pt")["pixel_values"]  # as BFL calls it
        got = ours(images)
        assert got.shape == theirs.shape == (len(images), 3, *ours.size)
        assert (got - theirs).abs().max() <= 1e-5


def test_preprocessing_reads_the_repo_file(redux_repo):
    p = flux1.SiglipPreprocess.from_file(redux_repo[0] / "feature_extractor" / "preprocessor_config.json")
    assert p == flux1.SiglipPreprocess((56, 56))
    bad = redux_repo[0] / "crop.json"
    bad.write_text(json.dumps({**PREPROCESSOR, "do_center_crop": True}))
    with pytest.raises(ValueError, match="plain resize"):
        flux1.SiglipPreprocess.from_file(bad)


def test_siglip_features_equal_transformers(redux_repo):
    root, refs = redux_repo
    ours = flux1.load_siglip(root / "image_encoder")
    assert ours.config.image_size == 56 and len(ours.vision_model.encoder.layers) == 2
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = refs["image_encoder"](pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, 16, 32) and theirs.abs().mean() > 0.1
    assert rel(got, theirs) < 1e-6
    # transformers 5 writes the same model without the vision_model. prefix; both load.
    refs["image_encoder"].save_pretrained(root / "siglip-v5")
    assert rel(flux1.load_siglip(root / "siglip-v5")(pixels), theirs) < 1e-6
    with pytest.raises(ValueError, match="56px"):
        ours(torch.zeros(1, 3, 70, 70))


def reference_prior(flux1_refs, redux_refs):
    """diffusers' FluxPriorReduxPipeline on the same weights, with the text encoders (so it encodes the prompt)."""
    from diffusers import FluxPriorReduxPipeline
    from transformers import SiglipImageProcessor

    text = diffusers_flux_pipeline(flux1_refs)  # the same encoders and their tokenizers
    return FluxPriorReduxPipeline(
        image_encoder=redux_refs["image_encoder"],
        feature_extractor=SiglipImageProcessor(
            **{k: v for k, v in PREPROCESSOR.items() if k != "image_processor_type"}
        ),
        image_embedder=redux_refs["image_embedder"],
        text_encoder=text.text_encoder,
        tokenizer=text.tokenizer,
        text_encoder_2=text.text_encoder_2,
        tokenizer_2=text.tokenizer_2,
    )


def test_prompt_embeddings_equal_diffusers_prior(pipe, flux1_repo, redux_repo):
    prior = reference_prior(flux1_repo[1], redux_repo[1])
    a, b = pictures()[1], pictures()[4]
    prompt = "a cosy room, in the style of the image"

    def theirs(image, scale=1.0):
        with torch.no_grad():
            return prior(image=image, prompt=prompt, prompt_embeds_scale=scale, return_dict=False)

    txt_a, vec_a = theirs(a)
    ours = pipe.encode_prompt(prompt, images=[a])
    assert ours["txt"].shape == (1, 512 + 16, 48) and txt_a.shape == ours["txt"].shape
    assert rel(ours["txt"], txt_a) < 1e-5 and rel(ours["vec"], vec_a) < 1e-5

    # The scales. diffusers' prompt_embeds_scale multiplies text and image tokens alike; here they are separate.
    ours = pipe.encode_prompt(prompt, images=[a], image_scale=0.2, text_scale=1.5)
    assert rel(ours["txt"][:, 512:], theirs(a, 0.2)[0][:, 512:]) < 1e-5
    assert rel(ours["txt"][:, :512], theirs(a, 1.5)[0][:, :512]) < 1e-5
    assert rel(ours["vec"], vec_a) < 1e-5  # the pooled vector is the prompt's, unscaled

    # Two images: their tokens one after the other, each equal to what the prior makes of it alone. (Given a list,
    # diffusers' prior instead returns the sum of the per-image embeddings, prompt included, weighted by the scales;
    # BFL's code takes one image; the concatenation is what the reference project and ComfyUI do.)
    ours = pipe.encode_prompt([prompt, prompt], images=[a, b], image_scale=0.5)
    assert ours["txt"].shape == (2, 512 + 32, 48) and torch.equal(ours["txt"][0], ours["txt"][1])
    assert rel(ours["txt"][:, :512], txt_a[:, :512].expand(2, -1, -1)) < 1e-5
    assert rel(ours["txt"][:1, 512:528], theirs(a, 0.5)[0][:, 512:]) < 1e-5
    assert rel(ours["txt"][:1, 528:], theirs(b, 0.5)[0][:, 512:]) < 1e-5


def test_load_redux_layouts_and_errors(redux_repo, tmp_path):
    root, refs = redux_repo
    diffusers_layout = tmp_path / "diffusers"
    write_redux_repo(diffusers_layout, embedder_format="diffusers")  # image_embedder/ instead of the BFL file
    image = pictures()[0]
    a, b = flux1.load_redux(root, dtype=torch.float32), flux1.load_redux(diffusers_layout, dtype=torch.float32)
    assert rel(a(image), b(image)) < 1e-6 and a(image).shape == (1, 16, 48)
    assert a.source == str(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        flux1.load_redux(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="expected FLUX.1 Redux weights"):
        flux1.load_redux(tmp_path)
    with pytest.raises(ValueError, match="cannot read image prompt"):
        a([__file__])


def test_generate_with_image_prompts(flux1_repo, redux_repo):
    pipe = flux1.load(flux1_repo[0], dtype=torch.float32)
    a, b = pictures()[1], pictures()[2]
    common = dict(height=32, width=32, steps=2, seed=0, output="latent", progress=False)
    with pytest.raises(ValueError, match="load_redux"):
        pipe.encode_prompt("x", images=[a])
    plain = pipe.generate("x", **common)
    one = pipe.generate("x", images=a, redux=redux_repo[0], **common)  # loads Redux on first use
    assert pipe.redux is not None and pipe.redux.source == str(redux_repo[0])
    weak = pipe.generate("x", images=[a], image_scale=0.2, **common)
    two = pipe.generate("x", images=[a, b], **common)
    for x, y in [(one, plain), (weak, one), (two, one)]:
        assert rel(x, y) > 1e-3
    assert rel(weak, plain) < rel(one, plain)  # image_scale 0.2 stays closer to the text-only image


# ---------------------------------------------------------------------------------------------------------------------
# sample.py --image


def test_cli_image_prompts(flux1_repo, redux_repo, zimage_repo, tmp_path):
    refs = []
    for i, picture in enumerate(pictures()[:2]):
        refs += ["--image", str(tmp_path / f"ref{i}.png")]
        picture.save(tmp_path / f"ref{i}.png")
    common = [*tiny_run(flux1_repo[0], seed=2), "--redux", str(redux_repo[0])]
    assert (
        sample.main([*common, *refs, "--image-scale", "0.2", "--text-scale", "1.5", "--out", str(tmp_path / "a")]) == 0
    )
    assert sample.main([*common, "--out", str(tmp_path / "b")]) == 0
    with_images, plain = (Image.open(next((tmp_path / d).glob("*.png"))) for d in "ab")
    settings = json.loads(with_images.text["parameters"])
    assert settings["images"] == f"{tmp_path / 'ref0.png'}, {tmp_path / 'ref1.png'}"
    assert (settings["image_scale"], settings["text_scale"], settings["redux"]) == (0.2, 1.5, str(redux_repo[0]))
    assert "images" not in json.loads(plain.text["parameters"])
    assert not np.array_equal(np.asarray(with_images), np.asarray(plain))


def test_cli_image_bad_input_gets_one_line(flux1_repo, zimage_repo, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "ref.png"
    pictures()[0].save(ref)
    common = [*tiny_run(flux1_repo[0], seed=0), "--out", str(tmp_path / "out")]
    zimage_run = ["zimage", "x", "--weights", str(zimage_repo[0]), "--steps", "1", "--device", "cpu"]
    for args, needle in [
        ([*common, "--image", __file__], "cannot read --image"),
        ([*common, "--image", ref, "--image-scale", "a fifth"], "--image-scale 'a fifth': expected a finite number"),
        ([*common, "--image", ref, "--text-scale", "inf"], "--text-scale 'inf': expected a finite number"),
        ([*common, "--image", ref, "--redux", tmp_path], "expected FLUX.1 Redux weights"),
        ([*zimage_run, "--image", ref], "zimage does not take --image"),
        ([*zimage_run, "--image-scale", "0.2"], "zimage does not take --image-scale"),
    ]:
        assert sample.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))
    # No --redux: the gated Redux repo is fetched from Hugging Face; offline that fails in one line that says how to
    # point at a local copy. (In a separate process, which reads HF_HUB_OFFLINE when it imports huggingface_hub.)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(cli(*common, "--image", ref), "could not download black-forest-labs/FLUX.1-Redux-dev", "--redux DIR")
