"""LoRA: the layer itself, and files that other tools write and read (kohya, diffusers/PEFT, ComfyUI), checked
against diffusers' load_lora_weights on the same tiny pipelines."""

import pytest
import torch
from fakes import (
    TOKENIZERS,
    diffusers_flux_pipeline,
    diffusers_flux_velocity,
    diffusers_zimage_pipeline,
    rel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import flux1
import lora
import zimage

pytestmark = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason=f"real tokenizer files not found at {TOKENIZERS}")


def test_lora_linear_math():
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(torch.bfloat16)
    layer = lora.LoRALinear(base, rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    x = torch.randn(4, 12)
    expected = x @ (base.weight.float() + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias.float()
    assert rel(layer(x.bfloat16()).float(), expected) < 2e-2  # bf16 base
    layer.float()
    base_out = base(x)
    layer.scale = 0.5
    assert torch.allclose(layer(x), base_out + 0.5 * 2.0 * x @ (layer.lora_B @ layer.lora_A).T, atol=1e-5)
    model = nn.Sequential(layer)
    before = layer(x)
    lora.merge(model)
    assert torch.allclose(layer(x), before, atol=1e-5)
    lora.unmerge(model)
    assert torch.allclose(layer(x), before, atol=1e-5)


def fuse(parts, sizes):
    """LoRAs of separate projections as one LoRA of their concatenation: A stacked, B block-diagonal (exact)."""
    a = torch.cat([p[0] for p in parts])
    b = torch.block_diag(*[p[1] for p in parts])
    assert b.shape[0] == sum(sizes)
    return a, b


def test_route_fuses_splits_and_reorders_rows_exactly():
    """Aliases send rows of a file's layer to rows of the model's: q, k, v into a fused qkv, a fused qkv out to q, k,
    v, halves swapped; low-rank, full and bias changes and DoRA magnitudes all follow their rows."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"qkv": nn.Linear(8, 15), "q": nn.Linear(8, 4), "k": nn.Linear(8, 5), "mod": nn.Linear(8, 6)})
    whole = slice(None)
    aliases = {
        "to_q": [("qkv", whole, slice(0, 4))],
        "to_v": [("qkv", whole, slice(9, 15))],
        "fused": [("q", slice(0, 4), whole), ("k", slice(4, 9), whole)],
        "swapped": [("mod", slice(0, 3), slice(3, 6)), ("mod", slice(3, 6), slice(0, 3))],
    }
    q = lora.Patch(down=torch.randn(2, 8), up=torch.randn(4, 2), magnitude=torch.rand(4, 1), keys=["q"])
    v = lora.Patch(down=torch.randn(3, 8), up=torch.randn(6, 3), diff_b=torch.randn(6), keys=["v"])
    fused = lora.Patch(down=torch.randn(2, 8), up=torch.randn(9, 2), diff=torch.randn(9, 8), keys=["f"])
    swapped = lora.Patch(down=torch.randn(2, 8), up=torch.randn(6, 2), diff_b=torch.randn(6), keys=["s"])
    routed, unusable = lora.route({"to_q": q, "to_v": v, "fused": fused, "swapped": swapped}, aliases, model)
    assert unusable == [] and set(routed) == {"qkv", "q", "k", "mod"}
    qkv = routed["qkv"].up @ routed["qkv"].down
    assert torch.allclose(qkv[:4], q.up @ q.down) and torch.all(qkv[4:9] == 0)
    assert torch.allclose(qkv[9:], v.up @ v.down)
    assert torch.equal(routed["qkv"].diff_b[9:], v.diff_b) and torch.all(routed["qkv"].diff_b[:9] == 0)
    assert torch.equal(routed["qkv"].magnitude[:4], q.magnitude) and routed["qkv"].magnitude[4:].isnan().all()
    for name, rows in (("q", slice(0, 4)), ("k", slice(4, 9))):
        assert torch.allclose(routed[name].up @ routed[name].down, (fused.up @ fused.down)[rows])
        assert torch.equal(routed[name].diff, fused.diff[rows])
    mod = routed["mod"]
    assert mod.down.shape[0] == 2  # one A shared by both halves: the rank stays 2
    assert torch.allclose(mod.up @ mod.down, (swapped.up @ swapped.down)[[3, 4, 5, 0, 1, 2]])
    assert torch.equal(mod.diff_b, swapped.diff_b[[3, 4, 5, 0, 1, 2]])
    # A per-column DoRA magnitude spans every row of its layer: it cannot be split, so it is not applied.
    by_columns = lora.Patch(down=torch.randn(2, 8), up=torch.randn(9, 2), magnitude=torch.rand(1, 8), keys=["c"])
    assert lora.route({"fused": by_columns}, aliases, model) == ({}, ["c"])


def test_add_lora_targets_and_freezes():
    model = nn.ModuleDict({"blocks": nn.ModuleList([nn.ModuleDict({"q": nn.Linear(4, 4), "mod": nn.Linear(4, 8)})])})
    names = lora.add_lora(model, ["blocks.*.q"], rank=2)
    assert names == ["blocks.0.q"] and isinstance(model["blocks"][0]["q"], lora.LoRALinear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["blocks.0.q.lora_A", "blocks.0.q.lora_B"]
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora.add_lora(model, ["nothing.*"])


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.1


def flux_velocity_both(pipe, ref_transformer):
    torch.manual_seed(5)
    x, cond = torch.randn(2, 16, 4, 6), {"txt": torch.randn(2, 7, 48), "vec": torch.randn(2, 24)}
    sigma, guidance = torch.tensor([0.3, 0.8]), torch.tensor([3.5, 2.0])
    with torch.no_grad():
        ours = pipe.velocity(x, sigma, cond, guidance)
        theirs = diffusers_flux_velocity(ref_transformer, x, sigma, cond, guidance)
    return flux1.patchify(ours), theirs


def random_lora_weights(model, names, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        m = model.get_submodule(name)
        out[name] = (
            0.3 * torch.randn(rank, m.in_features, generator=g),
            0.3 * torch.randn(m.out_features, rank, generator=g),
        )
    return out


def train_a_little(model, targets, rank, alpha, seed):
    """add_lora, then move B away from zero as training would."""
    names = lora.add_lora(model, targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return names


def test_flux_trained_lora_loads_in_diffusers(flux1_repo, tmp_path):
    root, refs = flux1_repo
    pipe = flux1.load(root, dtype=torch.float32)
    # diffusers' kohya reader hard-codes FLUX.1's widths for the single blocks' fused linear1 (3072 x 3 + 12288), so
    # at this tiny width linear1 is left out here; the slow test below covers it at full width.
    targets = [t for t in flux1.LORA_TARGETS if not t.endswith("linear1")]
    names = train_a_little(pipe.transformer, targets, rank=4, alpha=2.0, seed=1)
    assert len(names) == 2 * 8 + 2 * 1
    path = tmp_path / "flux_lora.safetensors"
    metadata = {"base_model": "flux1-dev", "rank": 4, "alpha": 2.0}
    lora.save(pipe.transformer, path, flux1.LORA_FORMAT, metadata, dtype=torch.float32)
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys and meta["rank"] == "4"
    assert "lora_unet_single_blocks_1_linear2.alpha" in keys

    ref_pipe = diffusers_flux_pipeline({**refs, "transformer": _fresh_flux_ref(refs)})
    ref_pipe.load_lora_weights(path)
    ours, theirs = flux_velocity_both(pipe, ref_pipe.transformer)
    base = flux_velocity_both(flux1.load(root, dtype=torch.float32), refs["transformer"])[1]
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, base) > 1e-2  # diffusers really applied the LoRA (no silent no-op)
    # And reading our own file back gives the same model.
    again = flux1.load(root, dtype=torch.float32)
    again.load_lora(path)
    assert rel(flux_velocity_both(again, refs["transformer"])[0], ours) < 1e-6


@pytest.mark.slow
def test_flux_lora_with_every_default_target_loads_in_diffusers_at_full_width(tmp_path):
    from diffusers import FluxTransformer2DModel
    from fakes import flux_to_bfl

    config = dict(
        num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True
    )
    ref = FluxTransformer2DModel(**config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # small random weights (diffusers zero-initialises some outputs)
        for p in ref.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g) + (1 if p.ndim == 1 and "norm" in str(p.shape) else 0))
    with torch.device("meta"):
        model = flux1.Flux(flux1.flux_params_from_state_dict(flux_to_bfl(ref.state_dict())))
    model = flux1.load_into(model, flux_to_bfl(ref.state_dict()), "test").eval()
    torch.manual_seed(0)
    img, txt, vec = torch.randn(1, 16, 64), torch.randn(1, 5, 64), torch.randn(1, 32)
    ids, tids, s, g = flux1.image_ids(4, 4, "cpu"), torch.zeros(5, 3), torch.tensor([0.5]), torch.tensor([3.0])
    kw = dict(encoder_hidden_states=txt, pooled_projections=vec, timestep=s, img_ids=ids, txt_ids=tids, guidance=g)
    with torch.no_grad():
        base = ref(hidden_states=img, **kw, return_dict=False)[0]
        assert rel(model(img, ids, txt, tids, s, vec, g), base) < 1e-5
    train_a_little(model, flux1.LORA_TARGETS, rank=2, alpha=1.0, seed=3)
    lora.save(model, tmp_path / "full.safetensors", flux1.LORA_FORMAT, dtype=torch.float32)
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from peft import LoraConfig  # noqa: F401  (diffusers needs the PEFT backend)
    from safetensors.torch import load_file

    state = _convert_kohya_flux_lora_to_diffusers(load_file(tmp_path / "full.safetensors"))
    assert not [k for k in state if not k.startswith("transformer.")]
    ref.load_lora_adapter(state, adapter_name="ours")  # keys keep their "transformer." prefix
    with torch.no_grad():
        ours = model(img, ids, txt, tids, s, vec, g)
        theirs = ref(hidden_states=img, **kw, return_dict=False)[0]
    assert rel(ours, theirs) < 1e-5 and rel(theirs, base) > 1e-2


def _fresh_flux_ref(refs):
    import copy

    return copy.deepcopy(refs["transformer"])


@pytest.mark.parametrize("family", ["kohya", "peft", "comfy", "onetrainer"])
def test_flux_loras_from_the_wild(flux1_repo, tmp_path, family):
    """A LoRA written by another tool loads into our model and gives what diffusers gives with the same LoRA
    (diffusers ignores ComfyUI-style FLUX.1 files, so those are compared with the same weights as PEFT)."""
    root, refs = flux1_repo
    ref = _fresh_flux_ref(refs)
    # The same LoRA in diffusers' names (PEFT): separate q/k/v, MLP, output and modulation layers.
    diffusers_targets = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.1.attn.add_k_proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.1.norm1.linear",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.1.proj_out",
    ]
    pairs = random_lora_weights(ref, diffusers_targets)
    peft = {}
    for name, (a, b) in pairs.items():
        peft |= {f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b}
    save_file(peft, tmp_path / "peft.safetensors")
    ref_pipe = diffusers_flux_pipeline({**refs, "transformer": ref})
    ref_pipe.load_lora_weights(tmp_path / "peft.safetensors")

    if family == "peft":
        path = tmp_path / "peft.safetensors"
    elif family == "onetrainer":
        state = {}
        for name, (a, b) in pairs.items():
            key = "lora_transformer_" + name.replace(".", "_")
            state |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b * 2, f"{key}.alpha": torch.tensor(2.0)}
        save_file(state, path := tmp_path / "onetrainer.safetensors")
    else:  # BFL names, fused: kohya (lora_unet_ + alpha) or ComfyUI (diffusion_model. + lora_A/B)
        model = flux1.load(root, dtype=torch.float32).transformer
        patches = {name: lora.Patch(down=a, up=b) for name, (a, b) in pairs.items()}
        bfl, _ = lora.route(patches, flux1.lora_aliases(model.params), model)
        state = {}
        for name, (a, b) in ((n, (p.down, p.up)) for n, p in bfl.items()):
            if family == "kohya":
                key, r = "lora_unet_" + name.replace(".", "_"), a.shape[0]
                state |= {
                    f"{key}.lora_down.weight": a,
                    f"{key}.lora_up.weight": b * r / 3.0,
                    f"{key}.alpha": torch.tensor(3.0),
                }
            else:
                state |= {f"diffusion_model.{name}.lora_A.weight": a, f"diffusion_model.{name}.lora_B.weight": b}
        save_file(state, path := tmp_path / f"{family}.safetensors")
    pipe = flux1.load(root, dtype=torch.float32)
    touched = pipe.load_lora(path)
    assert len(touched) == 6  # q+v fused into img qkv, add_k into txt qkv, k+mlp into linear1, and three plain ones
    ours, theirs = flux_velocity_both(pipe, ref_pipe.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, flux_velocity_both(pipe, refs["transformer"])[1]) > 1e-2


def test_lora_scale_and_stacking(flux1_repo, tmp_path):
    root, refs = flux1_repo

    def velocity(pipe):
        return flux_velocity_both(pipe, refs["transformer"])[0]

    pipe = flux1.load(root, dtype=torch.float32)
    pairs = random_lora_weights(pipe.transformer, ["double_blocks.0.img_attn.qkv"])
    state = {f"diffusion_model.{n}.lora_{k}.weight": t for n, (a, b) in pairs.items() for k, t in (("A", a), ("B", b))}
    save_file(state, tmp_path / "a.safetensors")
    base = velocity(pipe)
    pipe.load_lora(tmp_path / "a.safetensors", scale=0.5)
    half = velocity(pipe)
    pipe.load_lora(tmp_path / "a.safetensors", scale=0.5)  # stacked: the same as one at scale 1
    full = flux1.load(root, dtype=torch.float32)
    full.load_lora(tmp_path / "a.safetensors", scale=1.0)
    assert rel(velocity(pipe), velocity(full)) < 1e-5
    assert rel(half, base) > 1e-3 and rel(half, velocity(full)) > 1e-3
    bad = {
        "diffusion_model.double_blocks.9.img_attn.qkv.lora_A.weight": torch.zeros(2, 64),
        "diffusion_model.double_blocks.9.img_attn.qkv.lora_B.weight": torch.zeros(192, 2),
    }
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not in this model"):
        pipe.load_lora(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        pipe.load_lora(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Z-Image


def zimage_velocity_both(pipe, ref_transformer):
    torch.manual_seed(6)
    x, caps, sigma = torch.randn(2, 16, 6, 10), [torch.randn(9, 32), torch.randn(37, 32)], torch.tensor([0.2, 0.7])
    with torch.no_grad():
        ours = pipe.velocity(x, sigma, {"caps": caps})
        theirs = ref_transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, caps, return_dict=False)[0]
    return ours, -torch.stack(theirs).squeeze(2)


def _fresh_zimage(zimage_repo):
    import copy

    return {**zimage_repo[1], "transformer": copy.deepcopy(zimage_repo[1]["transformer"])}


def test_zimage_trained_lora_loads_in_diffusers(zimage_repo, tmp_path):
    root, refs = zimage_repo
    pipe = zimage.load(root, dtype=torch.float32)
    names = train_a_little(pipe.transformer, zimage.LORA_TARGETS, rank=4, alpha=8.0, seed=2)
    assert len(names) == 7 * (2 + 1 + 1)  # 2 main layers + 1 noise refiner + 1 context refiner
    path = tmp_path / "zimage_lora.safetensors"
    lora.save(pipe.transformer, path, zimage.LORA_FORMAT, {"base_model": "zimage-base"}, dtype=torch.float32)
    with safe_open(path, "pt") as f:
        assert "diffusion_model.layers.0.attention.to_out.0.lora_A.weight" in f.keys()
    ref_pipe = diffusers_zimage_pipeline(_fresh_zimage(zimage_repo))
    ref_pipe.load_lora_weights(path)
    ours, theirs = zimage_velocity_both(pipe, ref_pipe.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, zimage_velocity_both(pipe, refs["transformer"])[1]) > 1e-2


@pytest.mark.parametrize("family", ["kohya", "peft", "comfy_fused"])
def test_zimage_loras_from_the_wild(zimage_repo, tmp_path, family):
    root, refs = zimage_repo
    targets = [
        "layers.0.attention.to_q",
        "layers.0.attention.to_k",
        "layers.0.attention.to_v",
        "layers.1.attention.to_out.0",
        "noise_refiner.0.feed_forward.w1",
        "context_refiner.0.feed_forward.w2",
        "layers.1.adaLN_modulation.0",
    ]
    pairs = random_lora_weights(refs["transformer"], targets)
    peft = {f"transformer.{n}.lora_{k}.weight": t for n, (a, b) in pairs.items() for k, t in (("A", a), ("B", b))}
    save_file(peft, tmp_path / "peft.safetensors")
    ref_pipe = diffusers_zimage_pipeline(_fresh_zimage(zimage_repo))
    ref_pipe.load_lora_weights(tmp_path / "peft.safetensors")
    if family == "peft":
        path = tmp_path / "peft.safetensors"
    elif family == "kohya":  # musubi-tuner: lora_unet_ + the official names with "_", alpha per module
        state = {}
        for name, (a, b) in pairs.items():
            key = "lora_unet_" + name.replace(".", "_")
            state |= {
                f"{key}.lora_down.weight": a,
                f"{key}.lora_up.weight": b * 4 / 2.0,
                f"{key}.alpha": torch.tensor(2.0),
            }
        save_file(state, path := tmp_path / "kohya.safetensors")
        kohya_ref = diffusers_zimage_pipeline(_fresh_zimage(zimage_repo))
        kohya_ref.load_lora_weights(path)  # diffusers converts musubi files too: the same result
        pipe0 = zimage.load(root, dtype=torch.float32)
        assert (
            rel(
                zimage_velocity_both(pipe0, kohya_ref.transformer)[1],
                zimage_velocity_both(pipe0, ref_pipe.transformer)[1],
            )
            < 1e-5
        )
    else:  # ComfyUI's native Z-Image names: one fused attention.qkv (shared A), attention.out
        q, k, v = (pairs[f"layers.0.attention.to_{c}"] for c in "qkv")
        a, b = fuse([q, k, v], [64] * 3)
        state = {
            "diffusion_model.layers.0.attention.qkv.lora_A.weight": a,
            "diffusion_model.layers.0.attention.qkv.lora_B.weight": b,
            "diffusion_model.layers.1.attention.out.lora_A.weight": pairs["layers.1.attention.to_out.0"][0],
            "diffusion_model.layers.1.attention.out.lora_B.weight": pairs["layers.1.attention.to_out.0"][1],
        }
        for name in targets[4:]:
            state |= {
                f"diffusion_model.{name}.lora_A.weight": pairs[name][0],
                f"diffusion_model.{name}.lora_B.weight": pairs[name][1],
            }
        save_file(state, path := tmp_path / "comfy.safetensors")
    pipe = zimage.load(root, dtype=torch.float32)
    pipe.load_lora(path)
    ours, theirs = zimage_velocity_both(pipe, ref_pipe.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, zimage_velocity_both(pipe, refs["transformer"])[1]) > 1e-2
