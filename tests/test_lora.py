"""LoRA: the layer itself, and files that other tools write and read (kohya, diffusers/PEFT, ComfyUI, LyCORIS),
checked against diffusers' load_lora_weights and PEFT's own layers (DoRA, LoKr, LoHa) on the same tiny models."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from fakes import (
    diffusers_flux_pipeline,
    diffusers_flux_velocity,
    diffusers_zimage_pipeline,
    rel,
)
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import flux1
import int8
import lora
import zimage


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
# Adapter kinds beyond LoRA, against PEFT's implementations (and LyCORIS / ComfyUI's rules where PEFT has none)


def peft_layer(config, base, seed=0):
    """A PEFT adapter of `config` on a copy of `base` with random (non-zero) adapter weights; returns the PEFT model
    and its saved tensors (keys like "base_model.model.0.lora_A.weight")."""
    from peft import get_peft_model, get_peft_model_state_dict

    model = get_peft_model(nn.Sequential(copy.deepcopy(base)), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:  # PEFT starts it at the weight's row norms: move it away from them
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif any(k in name for k in ("lora_", "lokr_", "hada_")):
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
    return model, get_peft_model_state_dict(model)


def load_into_copy(base, state, tmp_path, scale=1.0, metadata=None, **kw):
    save_file(state, tmp_path / "adapter.safetensors", metadata=metadata)
    model = nn.Sequential(copy.deepcopy(base))
    lora.load(tmp_path / "adapter.safetensors", {"transformer": model}, scale, **kw)
    return model


def test_dora_matches_peft_and_comfyui_rules(tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    base, x = nn.Linear(6, 5), torch.randn(3, 6)
    ref, sd = peft_layer(LoraConfig(r=2, lora_alpha=3, target_modules=["0"], use_dora=True), base)
    a, b = sd["base_model.model.0.lora_A.weight"], sd["base_model.model.0.lora_B.weight"]
    magnitude = sd["base_model.model.0.lora_magnitude_vector"]
    with torch.no_grad():
        expected = ref(x)
        # diffusers' spelling: PEFT keys under "transformer.", alpha in the lora_adapter_metadata header
        state = {f"transformer.0.{k.split('.0.', 1)[1]}": v for k, v in sd.items()}
        header = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 3})}
        assert rel(load_into_copy(base, state, tmp_path, metadata=header)(x), expected) < 1e-6
        # LyCORIS / kohya's spelling: dora_scale (out, 1) and an alpha tensor
        kohya = {
            "lora_unet_0.lora_down.weight": a,
            "lora_unet_0.lora_up.weight": b,
            "lora_unet_0.alpha": torch.tensor(3.0),
        }
        assert (
            rel(load_into_copy(base, {**kohya, "lora_unet_0.dora_scale": magnitude[:, None]}, tmp_path)(x), expected)
            < 1e-6
        )
        # Per input column (LyCORIS wd_on_out=False, dora_scale (1, in)), at scale 0.5: W + 0.5 (W_dora - W) as ComfyUI
        by_columns = torch.rand(1, 6) + 0.5
        changed = base.weight + 1.5 * b @ a
        w_dora = changed * by_columns / changed.norm(dim=0, keepdim=True)
        model = load_into_copy(base, {**kohya, "lora_unet_0.dora_scale": by_columns}, tmp_path, scale=0.5)
        assert rel(model(x), F.linear(x, base.weight + 0.5 * (w_dora - base.weight), base.bias)) < 1e-6
        # INT8 base: nothing is merged into the int8 weight; a DeltaLinear adds exactly the DoRA change of the
        # weight the INT8 layer computes with.
        quantized = nn.Sequential(int8.Int8Linear.from_linear(copy.deepcopy(base)))
        save_file({**kohya, "lora_unet_0.dora_scale": magnitude[:, None]}, tmp_path / "dora.safetensors")
        lora.load(tmp_path / "dora.safetensors", {"transformer": quantized})
        layer = quantized[0]
        assert isinstance(layer, lora.DeltaLinear) and layer.base.weight.dtype == torch.int8
        w = layer.base.dequantize()
        changed = w + 1.5 * b @ a
        w_dora = changed * magnitude[:, None] / changed.norm(dim=1, keepdim=True)
        assert rel(layer(x) - layer.base(x), F.linear(x, w_dora - w)) < 1e-6


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_match_peft(tmp_path, kind):
    from peft import LoHaConfig, LoKrConfig

    torch.manual_seed(1)
    base, x = nn.Linear(16, 24), torch.randn(3, 16)
    config = (LoKrConfig if kind == "lokr" else LoHaConfig)(r=2, alpha=3, target_modules=["0"])
    ref, sd = peft_layer(config, base, seed=2)
    # SimpleTuner / LyCORIS spelling: lycoris_<name>.<tensor>, alpha per layer
    state = {f"lycoris_0.{k.rsplit('.', 1)[1]}": v for k, v in sd.items()} | {"lycoris_0.alpha": torch.tensor(3.0)}
    if kind == "lokr":
        assert {"lycoris_0.lokr_w1", "lycoris_0.lokr_w2_a", "lycoris_0.lokr_w2_b"} <= set(state)  # w2 factored
    with torch.no_grad():
        assert rel(load_into_copy(base, state, tmp_path)(x), ref(x)) < 1e-6
        quantized = nn.Sequential(int8.Int8Linear.from_linear(copy.deepcopy(base)))
        save_file(state, tmp_path / "q.safetensors")
        lora.load(tmp_path / "q.safetensors", {"transformer": quantized}, scale=0.7)
        layer = quantized[0]
        assert isinstance(layer, lora.DeltaLinear)
        assert rel(layer(x) - layer.base(x), 0.7 * (ref(x) - base(x))) < 1e-5
        if kind == "lokr":  # both factors whole: LyCORIS and ComfyUI apply kron(w1, w2) unscaled (PEFT: alpha / r)
            w1, w2 = torch.randn(4, 4), torch.randn(6, 4)
            whole = {"lycoris_0.lokr_w1": w1, "lycoris_0.lokr_w2": w2, "lycoris_0.alpha": torch.tensor(3.0)}
            model = load_into_copy(base, whole, tmp_path)
            assert rel(model(x), F.linear(x, base.weight + torch.kron(w1, w2), base.bias)) < 1e-6


def test_non_finite_weights_and_scales_are_refused(tmp_path):
    base = nn.Linear(4, 3)
    good = {"lora_unet_0.lora_down.weight": torch.randn(2, 4), "lora_unet_0.lora_up.weight": torch.randn(3, 2)}
    with pytest.raises(ValueError, match="finite"):
        load_into_copy(base, good, tmp_path, scale=float("nan"))
    bad = {**good, "lora_unet_0.lora_up.weight": torch.tensor([[1.0, float("inf")]] * 3)}
    with pytest.raises(ValueError, match=r"lora_unet_0.lora_up.weight has NaN or infinite"):
        load_into_copy(base, bad, tmp_path)


def test_what_is_not_applied_is_named_and_strict_refuses_it(tmp_path, capsys):
    base = nn.Linear(4, 3)
    good = {"lora_unet_0.lora_down.weight": torch.randn(2, 4), "lora_unet_0.lora_up.weight": torch.randn(3, 2)}
    extra = {
        "lora_unet_9.lora_down.weight": torch.randn(2, 4),  # a layer this model does not have
        "lora_unet_9.lora_up.weight": torch.randn(3, 2),
        "lora_unet_0.lora_mid.weight": torch.randn(2, 2),  # a kind this loader does not apply (LoCon's Tucker)
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 4),  # no text encoder here
    }
    model = load_into_copy(base, {**good, **extra}, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: adapter.safetensors: 4 of 6 tensors not applied"), err
    assert "lora_unet_0.lora_mid.weight" in err[0] and isinstance(model[0], lora.LoRALinear)
    with pytest.raises(ValueError, match="4 of 6 tensors not applied"):
        load_into_copy(base, {**good, **extra}, tmp_path, strict=True)
    with pytest.raises(ValueError, match="2 of 2 tensors not applied"):  # nothing applies: always an error
        load_into_copy(base, {k: v for k, v in extra.items() if "_9" in k}, tmp_path)


def test_save_writes_bf16_with_standard_metadata_and_readable_permissions(tmp_path):
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    lora.add_lora(model, ["0", "1"], rank=2, alpha=4.0)
    old = os.umask(0o022)
    try:
        lora.save(model, tmp_path / "k.safetensors", "kohya", {"ss_base_model_version": "flux1", "title": "t"})
        lora.save(model, tmp_path / "c.safetensors", "comfy", dtype=torch.float16)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "k.safetensors"]  # no .tmp left
    for name in ("k", "c"):
        assert oct((tmp_path / f"{name}.safetensors").stat().st_mode & 0o777) == "0o644"
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        meta, dtypes = f.metadata(), {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes["lora_unet_0.lora_down.weight"] == torch.bfloat16 and dtypes["lora_unet_1.alpha"] == torch.float32
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4.0" and meta["title"] == "t"
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.sai_model_spec"] == "1.0.1"
    with safe_open(tmp_path / "c.safetensors", "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("diffusion_model.0.lora_B.weight").dtype == torch.float16
    assert meta["ss_network_alpha"] == "2.0"  # alpha / rank folded into B: the file's alpha is its rank


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
    # The default bf16 file: diffusers and we read the same rounded weights.
    lora.save(pipe.transformer, tmp_path / "bf16.safetensors", flux1.LORA_FORMAT)
    ref_pipe = diffusers_flux_pipeline({**refs, "transformer": _fresh_flux_ref(refs)})
    ref_pipe.load_lora_weights(tmp_path / "bf16.safetensors")
    bf16 = flux1.load(root, dtype=torch.float32)
    bf16.load_lora(tmp_path / "bf16.safetensors")
    ours, theirs = flux_velocity_both(bf16, ref_pipe.transformer)
    assert rel(ours, theirs) < 1e-5 and rel(theirs, base) > 1e-2


def test_diffusers_saved_alpha_in_the_header(flux1_repo, tmp_path):
    """diffusers' save_lora_weights keeps PEFT's lora_alpha (and alpha_pattern) in the `lora_adapter_metadata` header,
    not in the tensors; load_lora_weights scales by it, and so must we."""
    from diffusers import FluxPipeline
    from peft import LoraConfig

    root, refs = flux1_repo
    config = LoraConfig(
        r=2, lora_alpha=6, target_modules=FLUX_DIFFUSERS_TARGETS, alpha_pattern={"ff.net.2": 1}, init_lora_weights=False
    )
    _, sd = peft_model(config, refs["transformer"], seed=9)
    FluxPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=sd, transformer_lora_adapter_metadata=config.to_dict()
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    ref_pipe = diffusers_flux_pipeline({**refs, "transformer": _fresh_flux_ref(refs)})
    ref_pipe.load_lora_weights(path)
    pipe = flux1.load(root, dtype=torch.float32)
    pipe.load_lora(path, strict=True)
    ours, theirs = flux_velocity_both(pipe, ref_pipe.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, flux_velocity_both(pipe, refs["transformer"])[1]) > 1e-2


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


def peft_model(config, module, seed=0):
    """PEFT's adapter injected into a copy of a diffusers/transformers model, with random adapter weights; returns
    it and its saved tensors (keys like diffusers', "transformer_blocks.0.attn.to_q.lora_A.weight")."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    model = inject_adapter_in_model(config, copy.deepcopy(module))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif any(k in name for k in ("lora_", "lokr_", "hada_")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval(), get_peft_model_state_dict(model)


# Layers of diffusers' FLUX.1 that BFL fuses (q/k of one block, the single blocks' MLP input), reorders (the final
# modulation) or keeps as they are.
FLUX_DIFFUSERS_TARGETS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.1.attn.add_v_proj",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.1.proj_mlp",
    "norm_out.linear",
]


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_flux_dora_lokr_loha_on_diffusers_names_match_peft(flux1_repo, tmp_path, kind):
    """diffusers/PEFT DoRA files and SimpleTuner's LyCORIS files (lycoris_ + diffusers names) land on BFL's fused and
    reordered layers exactly: the same velocity as PEFT's own adapters in diffusers' transformer."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    root, refs = flux1_repo
    if kind == "dora":
        config = LoraConfig(r=2, lora_alpha=4, target_modules=FLUX_DIFFUSERS_TARGETS, use_dora=True)
    else:
        config = (LoKrConfig if kind == "lokr" else LoHaConfig)(r=2, alpha=4, target_modules=FLUX_DIFFUSERS_TARGETS)
    ref, sd = peft_model(config, refs["transformer"], seed=3)
    if kind == "dora":  # diffusers' file: transformer.<name>, alpha in the header
        state = {f"transformer.{k}": v for k, v in sd.items()}
        header = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 4})}
    else:
        state, header = {}, None
        for key, value in sd.items():
            name, tensor = key.rsplit(".", 1)
            state |= {f"lycoris_{name.replace('.', '_')}.{tensor}": value}
            state[f"lycoris_{name.replace('.', '_')}.alpha"] = torch.tensor(4.0)
        if kind == "lokr":  # each w2 factored, so LyCORIS' scale (alpha / r) is PEFT's
            assert sum(k.endswith("lokr_w2_a") for k in state) == len(FLUX_DIFFUSERS_TARGETS)
    save_file(state, tmp_path / "file.safetensors", metadata=header)
    pipe = flux1.load(root, dtype=torch.float32)
    changed = pipe.load_lora(tmp_path / "file.safetensors", strict=True)
    assert len(changed) == 5  # q and k share double_blocks.0.img_attn.qkv
    ours, theirs = flux_velocity_both(pipe, ref)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, flux_velocity_both(pipe, refs["transformer"])[1]) > 1e-2
    # On an INT8 base the full changes stay beside the int8 weights (DeltaLinear): close to the float result, as
    # INT8 is without a LoRA (a dropped change would be off by 10-50%).
    quantized = flux1.load(root, dtype=torch.float32)
    int8.quantize(quantized.transformer, min_features=16)
    plain_error = rel(
        flux_velocity_both(quantized, refs["transformer"])[0], flux_velocity_both(pipe, refs["transformer"])[1]
    )
    quantized.load_lora(tmp_path / "file.safetensors", strict=True)
    assert isinstance(quantized.transformer.double_blocks[0].img_attn.qkv, lora.DeltaLinear)
    assert rel(flux_velocity_both(quantized, ref)[0], theirs) < 1.5 * plain_error


def test_flux_full_weight_and_bias_diffs(flux1_repo, tmp_path):
    """`.diff` / `.diff_b` (ComfyUI's full changes) on diffusers names: a fused q, the final modulation's bias (its
    halves swap into BFL's order), a norm's scale; the same as changing the reference model's weights. Stacking and
    scale: two loads at 0.5 are one at 1."""
    root, refs = flux1_repo
    g = torch.Generator().manual_seed(4)
    ref = copy.deepcopy(refs["transformer"])
    changes = {
        "transformer_blocks.0.attn.to_q.diff": ref.transformer_blocks[0].attn.to_q.weight,
        "transformer_blocks.0.attn.to_q.diff_b": ref.transformer_blocks[0].attn.to_q.bias,
        "norm_out.linear.diff_b": ref.norm_out.linear.bias,
        "norm_out.linear.diff": ref.norm_out.linear.weight,
        "transformer_blocks.1.attn.norm_added_k.diff": ref.transformer_blocks[1].attn.norm_added_k.weight,
        "single_transformer_blocks.0.proj_out.diff_b": ref.single_transformer_blocks[0].proj_out.bias,
    }
    state = {}
    with torch.no_grad():
        for key, param in changes.items():
            state[f"transformer.{key}"] = 0.2 * torch.randn(param.shape, generator=g)
            param += state[f"transformer.{key}"]
    save_file(state, tmp_path / "diff.safetensors")
    pipe = flux1.load(root, dtype=torch.float32)
    pipe.load_lora(tmp_path / "diff.safetensors", scale=0.5, strict=True)
    pipe.load_lora(tmp_path / "diff.safetensors", scale=0.5, strict=True)
    ours, theirs = flux_velocity_both(pipe, ref)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, flux_velocity_both(pipe, refs["transformer"])[1]) > 1e-2
    assert not lora.lora_layers(pipe.transformer)  # merged into the float weights, no wrapper


def test_flux_text_encoder_loras(flux1_repo, tmp_path):
    """kohya's lora_te1_ (CLIP-L) and lora_te3_ / lora_te2_ (T5) keys, and diffusers' text_encoder.: the same CLIP and
    T5 as PEFT's LoRAs in transformers' models. (diffusers 0.42.1 with transformers 5 does not apply kohya's te1 keys
    to CLIP: its converted names no longer match transformers' modules, so it is no oracle here.)"""
    from peft import LoraConfig

    root, refs = flux1_repo
    # transformers >= 5 names CLIP's layers without the "text_model." that kohya's keys (and our module) have.
    clip_targets = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc2"]
    t5_targets = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_0"]
    clip_ref, clip_sd = peft_model(LoraConfig(r=4, lora_alpha=8, target_modules=clip_targets), refs["clip"], seed=5)
    t5_ref, t5_sd = peft_model(LoraConfig(r=4, lora_alpha=4, target_modules=t5_targets), refs["t5"], seed=6)
    kohya, t5_only = {}, {}
    for prefix, sd, alpha in (("lora_te1_text_model_", clip_sd, 8.0), ("lora_te3_", t5_sd, 4.0)):
        for key, value in sd.items():
            name, kind = key.split(".lora_")  # kind: "A.weight" or "B.weight"
            stem = name.replace(".", "_")
            kohya |= {f"{prefix}{stem}.lora_{dict(A='down', B='up')[kind[0]]}.weight": value}
            kohya |= {f"{prefix}{stem}.alpha": torch.tensor(alpha)}
            if prefix == "lora_te3_":  # OneTrainer writes T5 as lora_te2_
                t5_only[f"lora_te2_{stem}.lora_{dict(A='down', B='up')[kind[0]]}.weight"] = value
    save_file(kohya, tmp_path / "kohya.safetensors")
    save_file(t5_only, tmp_path / "t5.safetensors")
    # diffusers' keys: text_encoder.<transformers name>, alpha 8 / rank 4 folded into B
    save_file(
        {f"text_encoder.{k}": v * (2 if ".lora_B." in k else 1) for k, v in clip_sd.items()},
        tmp_path / "peft.safetensors",
    )
    ids = flux1.CLIPTokenizer(root / "tokenizer" / "vocab.json", root / "tokenizer" / "merges.txt")(["a red fox"])
    t5_ids = flux1.T5Tokenizer(root / "tokenizer_2" / "tokenizer.json")(["a red fox"])
    with torch.no_grad():
        clip_plain, clip_expected = refs["clip"](ids).pooler_output, clip_ref(ids).pooler_output
        t5_plain, t5_expected = refs["t5"](t5_ids).last_hidden_state, t5_ref(t5_ids).last_hidden_state
        assert rel(clip_expected, clip_plain) > 1e-2 and rel(t5_expected, t5_plain) > 1e-2
        for file, parts in (("kohya", "clip t5"), ("peft", "clip"), ("t5", "t5")):
            pipe = flux1.load(root, dtype=torch.float32)
            changed = pipe.load_lora(tmp_path / f"{file}.safetensors", strict=True)
            assert len(changed) == 2 * len(parts.split()) and not lora.lora_layers(pipe.transformer)
            assert rel(pipe.clip(ids), clip_expected if "clip" in parts else clip_plain) < 1e-5
            assert rel(pipe.t5(t5_ids), t5_expected if "t5" in parts else t5_plain) < 1e-5


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


def test_zimage_full_diffs_final_layer_and_text_encoder(zimage_repo, tmp_path, capsys):
    """A ComfyUI fused-qkv `.diff` splits into to_q/to_k/to_v, a `.diff_b` gives a bias-free layer a bias, the final
    layer's modulation takes a LoRA as is (Z-Image's is scale only: no reordering), the Qwen3 text encoder takes
    LoRAs (diffusers' text_encoder. and kohya's lora_te_ keys), and FLUX.1's T5 keys are named as not applied."""
    from peft import LoraConfig

    root, refs = zimage_repo
    g = torch.Generator().manual_seed(7)
    ref = copy.deepcopy(refs["transformer"])
    qkv_diff, out_bias = 0.1 * torch.randn(3 * 64, 64, generator=g), 0.3 * torch.randn(64, generator=g)
    a, b = 0.3 * torch.randn(2, 64, generator=g), 0.3 * torch.randn(64, 2, generator=g)
    te_targets = ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    te_ref, te_sd = peft_model(LoraConfig(r=4, lora_alpha=4, target_modules=te_targets), refs["text_encoder"], seed=8)
    with torch.no_grad():
        attention = ref.layers[0].attention
        for i, proj in enumerate((attention.to_q, attention.to_k, attention.to_v)):
            proj.weight += qkv_diff[i * 64 : (i + 1) * 64]
        ref.layers[1].attention.to_out[0].bias = nn.Parameter(out_bias)
        ref.all_final_layer["2-1"].adaLN_modulation[1].weight += b @ a
    state = {
        "diffusion_model.layers.0.attention.qkv.diff": qkv_diff,
        "diffusion_model.layers.1.attention.out.diff_b": out_bias,
        "diffusion_model.all_final_layer.2-1.adaLN_modulation.1.lora_A.weight": a,
        "diffusion_model.all_final_layer.2-1.adaLN_modulation.1.lora_B.weight": b,
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 48),  # FLUX.1's T5
    }
    for key, value in te_sd.items():
        if key.startswith("layers.0."):
            state[f"text_encoder.{key}"] = value
        else:
            name, kind = key.split(".lora_")
            state[f"lora_te_{name.replace('.', '_')}.lora_{dict(A='down', B='up')[kind[0]]}.weight"] = value
    save_file(state, tmp_path / "mixed.safetensors")
    pipe = zimage.load(root, dtype=torch.float32)
    with pytest.raises(ValueError, match="1 of 9 tensors not applied"):
        pipe.load_lora(tmp_path / "mixed.safetensors", strict=True)
    changed = pipe.load_lora(tmp_path / "mixed.safetensors")
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in capsys.readouterr().err
    assert len(changed) == 3 + 1 + 1 + 2
    ours, theirs = zimage_velocity_both(pipe, ref)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, zimage_velocity_both(pipe, refs["transformer"])[1]) > 1e-2
    ids, mask = torch.randint(0, 700, (2, 9), generator=g), torch.ones(2, 9, dtype=torch.long)
    layer = len(pipe.text_encoder.layers)
    with torch.no_grad():
        (hidden,) = pipe.text_encoder(ids, mask, [layer])
        expected = te_ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        plain = refs["text_encoder"](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert rel(hidden, expected) < 1e-5 and rel(expected, plain[layer]) > 1e-2
