"""Generate images with any model by name.

    python sample.py flux1 "a photo of a cat"
    python sample.py flex1-alpha "a watercolor fox" --size 768x1024 --steps 25 --num 4 --out outputs/
    python sample.py flux1-dev "the same scene at dusk" --init-image photo.jpg --strength 0.6
    python sample.py zimage "a red fox in the snow" --lora style.safetensors:0.8
    python sample.py flux1-dev "a cat" --offload blocks --int8      # a 12B model on a small GPU
    python sample.py flux1 "a tiger" --invert cat.jpg --eta 0.9 --stop 7   # RF-inversion edit of a photo
    python sample.py flux1 "a cosy room" --image ref.png --image-scale 0.2  # FLUX.1 Redux image prompt
    python sample.py zimage "a red fox" --out fox.png               # one file; with several images fox-00000.png, ...
    python sample.py flux2 "the cat from the first image in the room of the second" --image cat.png --image room.jpg
    python sample.py wan22 "a corgi surfing a wave" --frames 81 --size 1280x704 --fps 24   # video: MP4
    python sample.py wan22 "the fox turns its head" --image fox.png                        # image to video
    python sample.py wan22-t2v-a14b "a corgi surfing a wave" --offload model   # two 14B experts, one on the GPU

Every PNG carries the prompt and all settings in its text metadata, so a picture says how it was made; videos carry
them in the MP4 comment (or the WebP's EXIF when neither PyAV nor imageio-ffmpeg is installed, see video.py).
"""

import argparse
import importlib
import inspect
import json
import math
import os
import random
import sys
import time
import typing
from pathlib import Path

# family name -> model file; each has VARIANTS, DEFAULT_VARIANT, load() and a pipeline with generate()
FAMILIES = {"flux1": "flux1", "zimage": "zimage", "flux2": "flux2_klein", "wan22": "wan22"}


class UsageError(Exception):
    """Bad input from the user (or a failure the user can fix): printed as one line, no traceback."""

    exit_code = 2


def atomic_write(path: Path, write, intact: str = "nothing else was changed"):
    """write(tmp) then rename over `path`: a crash or a full disk never leaves a half-written file under the final
    name, and the temporary file is removed on failure. `intact` says what survives, for the one-line error. The
    temporary name is the process's own, so processes writing the same file (train.py's ranks caching identical
    images, two runs sharing a cache) never write into each other's."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"could not write {path}: {e.strerror or e}; {intact}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def catalogue() -> dict:
    """Every name sample.py accepts -> (model module, variant): a family name means its flagship variant."""
    names = {}
    for family, file in FAMILIES.items():
        module = importlib.import_module(file)
        names[family] = (module, module.DEFAULT_VARIANT)
        names.update({variant: (module, variant) for variant in module.VARIANTS})
    return names


def resolve_model(name: str):
    names = catalogue()
    if name not in names:
        raise UsageError(f"unknown model {name!r}; valid names: {', '.join(names)}")
    return names[name]


def pixels_per_token(module, variant: str) -> int:
    """Image sides must be multiples of this: the variant's own value where it has one (Wan2.2's A14B: 16), else
    the family's PIXELS_PER_TOKEN."""
    return getattr(module.VARIANTS[variant], "pixels_per_token", None) or module.PIXELS_PER_TOKEN


def denoisers(pipe) -> list:
    """The transformer(s) that run at every step: `transformer`, and `transformer_2` where a pipeline has a second
    (Wan2.2 A14B's low-noise expert, as diffusers names it)."""
    return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]


def parse_size(text: str, multiple: int) -> tuple[int, int]:
    """'WxH' (or a single number for a square) -> (height, width)."""
    try:
        w, h = (int(v) for v in text.lower().split("x")) if "x" in text.lower() else (int(text),) * 2
    except ValueError:
        raise UsageError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x768") from None
    if w <= 0 or h <= 0 or w % multiple or h % multiple:
        raise UsageError(f"--size {text}: width and height must be positive multiples of {multiple}")
    return h, w


def parse_guidance(text: str | None):
    if text is None:
        return None
    if text.lower() in ("off", "none", "bypass"):
        return False
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"--guidance {text!r}: expected a finite number or 'off'")
    return value


def parse_lora(text: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE -> (path, scale); a colon that is part of an existing file's name is kept."""
    path, colon, scale = text.rpartition(":")
    if not colon or not path or Path(text).is_file():
        path, scale = text, "1"
    try:
        value = float(scale)
    except ValueError:
        if not Path(path).is_file():
            raise UsageError(f"--lora {text}: no such file") from None
        raise UsageError(f"--lora {text}: the scale {scale!r} after the last ':' is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"--lora {text}: the scale must be a finite number")
    if not Path(path).is_file():
        raise UsageError(f"--lora {path}: no such file")
    return Path(path), value


def parse_number(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"{flag} {text!r}: expected a finite number")
    return value


def check_image(path: str, flag: str = "--init-image"):
    from PIL import Image

    if not Path(path).is_file():
        raise UsageError(f"cannot read {flag} {path}: no such file")
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {flag} {path}: {e}") from None


def refuse_options(pipeline_class, flags: dict[str, str], model: str):
    """One line for an option (generate() argument -> its flag) that this family's generate() does not take."""
    accepted = inspect.signature(pipeline_class.generate).parameters
    for key, flag in flags.items():
        if key not in accepted:
            raise UsageError(f"{model} does not take {flag}")


def pick_device(name: str | None) -> str:
    import torch

    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r}: not a device name (cuda, cuda:1, cpu, mps, ...)") from None
        if device.type == "meta":
            raise UsageError("--device meta holds no data and cannot run a model; use cuda, cpu, mps, ...")
        available = {"cuda": torch.cuda.is_available, "mps": lambda: torch.backends.mps.is_available()}
        if device.type in available and not available[device.type]():
            raise UsageError(f"--device {name}: no {device.type} device here; try --device cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name: str | None, device: str):
    """(name, torch dtype) of --dtype; by default float32 on the CPU and bfloat16 elsewhere."""
    import torch

    name = name or ("fp32" if device == "cpu" else "bf16")
    return name, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def next_index(out: Path) -> int:
    taken = [int(p.stem.split("-")[0]) for p in out.glob("*.*") if p.stem.split("-")[0].isdigit()]
    return max(taken, default=-1) + 1


OUTPUT_SUFFIXES = {".png", ".mp4"}  # --out ending in one of these names a file; anything else is a folder


def output_paths(out: str, seeds: list[int], suffix: str = ".png") -> list[Path]:
    """Where the images (or videos: suffix .mp4) go. A folder (created if missing): NNNNN-<seed>.png after the highest
    number already there. A file name: that file for one image; for several, numbered beside it (fox.png ->
    fox-00000.png, ...)."""
    out = Path(out)
    if out.suffix.lower() in OUTPUT_SUFFIXES:
        if out.suffix.lower() != suffix:
            raise UsageError(f"--out {out}: this model writes {suffix} files")
        if out.is_dir():
            raise UsageError(f"--out {out} is a folder; give a new file name or the folder without the suffix")
        out.parent.mkdir(parents=True, exist_ok=True)
        if len(seeds) == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i:05d}{out.suffix}") for i in range(len(seeds))]
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder or a file name ending in {suffix}")
    out.mkdir(parents=True, exist_ok=True)
    first = next_index(out)
    return [out / f"{first + i:05d}-{seed}{suffix}" for i, seed in enumerate(seeds)]


def save_png(image, path: Path, settings: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in settings.items():
        info.add_text(key, "" if value is None else str(value))
    info.add_text("parameters", json.dumps(settings))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), "the images before it are saved")


def build_parser() -> argparse.ArgumentParser:
    import solvers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"model or variant name: {', '.join(catalogue())}")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--weights", help="local folder laid out like the model's Hugging Face repo (default: download)")
    p.add_argument("--size", help="WIDTHxHEIGHT in pixels (default: the model's)")
    p.add_argument("--steps", type=int, help="number of solver steps (default: the model's)")
    p.add_argument("--solver", help=f"{', '.join(solvers.SOLVERS)} (default: the model's)")
    p.add_argument("--guidance", help="FLUX.1's distilled guidance scale, or 'off' to bypass the guidance embedder")
    p.add_argument(
        "--cfg",
        type=float,
        help="true classifier-free guidance scale, in the model's official convention (FLUX.1: 1 = off; Z-Image: "
        "v_c + cfg (v_c - v_u), 0 = off; Wan2.2 A14B: one scale for both experts instead of the official pair)",
    )
    p.add_argument("--cfg-truncation", type=float, help="Z-Image: no CFG once its time 1 - sigma exceeds this")
    p.add_argument("--cfg-normalization", type=float, help="Z-Image: cap the guided norm at this x the conditional")
    p.add_argument("--negative", default="", help="negative prompt (used when --cfg > 1)")
    p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: random)")
    p.add_argument("--num", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--out",
        default="outputs",
        help="a folder (created if missing; files NNNNN-<seed>.png) or a file name ending in .png (several images are "
        "numbered beside it: NAME-00000.png, NAME-00001.png, ...)",
    )
    p.add_argument("--device", help="cuda, cpu, mps, ... (default: the best available)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on an accelerator, fp32 on cpu")
    p.add_argument("--init-image", help="image-to-image: start from this picture")
    p.add_argument("--strength", type=float, default=0.6, help="image-to-image: how much to change (0..1)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="apply a LoRA (kohya, diffusers/PEFT, ComfyUI or LyCORIS keys) at SCALE (default 1); repeatable",
    )
    p.add_argument("--lora-strict", action="store_true", help="refuse a LoRA file with tensors that cannot be applied")
    p.add_argument("--invert", metavar="IMAGE", help="edit this photo by RF-inversion towards the prompt (edit.py)")
    p.add_argument("--gamma", help="RF-inversion: pull of the inversion towards fresh noise, 0..1 (default 0.5)")
    p.add_argument("--eta", help="RF-inversion: pull of the edit back towards the photo, 0..1 (default 0.9)")
    p.add_argument("--start", help="RF-inversion: first step of the pull, in steps of 28 (default 0)")
    p.add_argument("--stop", help="RF-inversion: step where the pull ends, in steps of 28 (default 7)")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="reference image for the model (FLUX.2-klein: an image to edit, up to 4; FLUX.1: a Redux image prompt; "
        "Wan2.2: the first frame); repeatable",
    )
    p.add_argument("--frames", type=int, help="video models: number of frames, 4k+1 (default: the model's)")
    p.add_argument("--fps", type=float, help="video models: frames per second of the file (default: the model's)")
    p.add_argument("--image-scale", help="FLUX.1 Redux: multiply the image tokens (e.g. 0.2 weakens the image)")
    p.add_argument("--text-scale", help="FLUX.1 Redux: multiply the T5 tokens (> 1 strengthens the text)")
    p.add_argument("--redux", metavar="DIR", help="FLUX.1 Redux weights folder (default: download the Redux repo)")
    p.add_argument("--int8", action="store_true", help="INT8 matmuls (torch._int_mm) for the transformer's linears")
    p.add_argument(
        "--offload",
        choices=["model", "blocks"],
        help="for GPUs smaller than the model: 'model' moves each part to the device only while it runs; 'blocks' "
        "also streams the transformer's blocks from host memory one at a time",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_pipeline(module, variant: str, args, device, dtype):
    """The model both CLIs run: from --weights or the variant's repo; with offloading (or train.py's --shard)
    everything loads to host memory first and offload.py (distributed.py) moves it to the device piece by piece."""
    return module.load(
        args.weights or variant,
        variant=variant,
        device="cpu" if args.offload or getattr(args, "shard", False) else device,
        dtype=dtype,
        progress=not args.quiet,
    )


def error_report(error: BaseException) -> tuple[str, int] | None:
    """What the CLIs say of an error the user can cause or fix (bad input: ours, or a clear ValueError /
    FileNotFoundError from a model file; a full disk or a permission, OSError; Ctrl-C): (one line, exit code). None
    for anything else: a bug."""
    if isinstance(error, UsageError | ValueError | FileNotFoundError):
        return str(error), getattr(error, "exit_code", 2)
    if isinstance(error, OSError):
        return f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}", 1
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    return None


def run_cli(command, args) -> int:
    """Run a CLI command. What the user can cause or fix ends in one line on stderr and a non-zero exit code, never a
    traceback (error_report); any other exception is a bug and keeps its traceback."""
    try:
        return command(args)
    except BaseException as e:
        report = error_report(e)
        if report is None:
            raise
        print(f"error: {report[0]}", file=sys.stderr)
        return report[1]


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv))


def run(args) -> int:
    module, variant = resolve_model(args.model)
    import solvers

    if args.solver is not None and args.solver not in solvers.SOLVERS:
        raise UsageError(f"unknown solver {args.solver!r}; choose one of {', '.join(solvers.SOLVERS)}")
    height, width = parse_size(args.size, pixels_per_token(module, variant)) if args.size else (None, None)
    guidance = parse_guidance(args.guidance)
    for name in ("cfg", "cfg_truncation", "cfg_normalization", "strength", "fps"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be a finite number")
    pictures = [(args.init_image, "--init-image"), (args.invert, "--invert"), *((i, "--image") for i in args.image)]
    for path, flag in pictures:
        if path:
            check_image(path, flag)
    edit_args = {k: parse_number(getattr(args, k), f"--{k}") for k in ("gamma", "eta", "start", "stop")}
    if not args.invert and any(v is not None for v in edit_args.values()):
        raise UsageError("--gamma, --eta, --start and --stop set up --invert")
    if args.invert:
        import edit

        edit_args = {k: getattr(edit, k.upper()) if v is None else v for k, v in edit_args.items()}  # the defaults
        edit.check_settings(**edit_args)
    if args.invert and args.solver not in (None, "euler"):
        raise UsageError("--invert integrates RF-inversion's controlled ODEs with Euler steps; drop --solver")
    if args.invert and (args.init_image or args.cfg is not None or args.negative):
        raise UsageError("--invert edits its own photo without true CFG: drop --init-image, --cfg and --negative")
    stride = getattr(module, "TEMPORAL_STRIDE", None)  # video models: frames = stride * k + 1
    if (args.frames is not None or args.fps is not None) and stride is None:
        raise UsageError(f"--frames and --fps are for video models; {args.model} makes images")
    if args.invert and stride is not None:
        raise UsageError(f"--invert edits photos; {args.model} makes videos")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % stride):
        raise UsageError(f"--frames {args.frames}: must be {stride}k+1 (e.g. {stride * 20 + 1})")
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps {args.fps}: must be positive")
    if not 0 <= args.strength <= 1:
        raise UsageError(f"--strength {args.strength}: must be between 0 and 1")
    if args.num < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--num and --steps must be at least 1")
    count = len(args.prompt) * args.num
    if args.seed is not None and not 0 <= args.seed <= 2**63 - count:
        raise UsageError(f"--seed {args.seed}: must be between 0 and 2**63 - {count} (one seed per image)")
    if args.weights and not Path(args.weights).is_dir():
        raise UsageError(f"--weights {args.weights}: no such folder")
    loras = [parse_lora(text) for text in args.lora]

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    jobs = [(prompt, seed + i) for i, prompt in enumerate(p for p in args.prompt for _ in range(args.num))]
    suffix = ".png" if stride is None else ".mp4"
    paths = output_paths(args.out, [image_seed for _, image_seed in jobs], suffix)  # a bad --out: before loading

    # Options only some families have (Z-Image's official CFG truncation/normalisation, reference images) are passed
    # only when given, and only to a generate() that takes them.
    options = {
        "cfg_truncation": ("--cfg-truncation", args.cfg_truncation),
        "cfg_normalization": ("--cfg-normalization", args.cfg_normalization),
        "images": ("--image", args.image or None),
        "image_scale": ("--image-scale", parse_number(args.image_scale, "--image-scale")),
        "text_scale": ("--text-scale", parse_number(args.text_scale, "--text-scale")),
        "redux": ("--redux", args.redux),
        "frames": ("--frames", args.frames),
    }
    extra = {k: v for k, (_, v) in options.items() if v is not None}
    flags = {k: options[k][0] for k in extra}
    if args.invert and extra:
        raise UsageError(f"--invert does not take {', '.join(flags.values())}")


    device = pick_device(args.device)
    # The pipeline class from load()'s annotation (DESIGN.md), so that an option it does not take is refused before
    # loading.
    refuse_options(typing.get_type_hints(module.load)["return"], flags, args.model)
    dtype_name, dtype = pick_dtype(args.dtype, device)
    t0 = time.time()
    pipe = load_pipeline(module, variant, args, device, dtype)
    if args.int8:
        import int8

        for denoiser in denoisers(pipe):
            int8.quantize(denoiser)
    for path, scale in loras:  # after quantising: a LoRA stays float on top of the INT8 base
        pipe.load_lora(path, scale, strict=args.lora_strict)
    if args.offload:
        import offload

        if args.offload == "blocks":
            for denoiser in denoisers(pipe):
                offload.enable_block_streaming(denoiser, device)
        offload.enable_model_offload(pipe, device)  # the parts not streamed
    load_s = time.time() - t0

    d = pipe.defaults
    written = []
    for (prompt, image_seed), path in zip(jobs, paths):
        settings = {
            "model": args.model,
            "variant": variant,
            "weights": args.weights or d.repo,
            "prompt": prompt,
            "negative_prompt": args.negative,
            "seed": image_seed,
            "size": f"{width or d.size[1]}x{height or d.size[0]}",
            "steps": args.steps or d.steps,
            "solver": args.solver or d.solver,
            "cfg": args.cfg if args.cfg is not None else d.cfg,
            "init_image": args.init_image,
            "strength": args.strength if args.init_image else None,
            "dtype": dtype_name,
            "loras": ", ".join(f"{p.name}:{s}" for p, s in loras),
            "int8": args.int8,
            "offload": args.offload,
        }
        if hasattr(d, "guidance"):  # distilled guidance (FLUX.1); other families reject --guidance in generate()
            settings["guidance"] = "off" if guidance is False else (d.guidance if guidance is None else guidance)
        settings.update({k: ", ".join(v) if k == "images" else v for k, v in extra.items()})
        if stride is not None:
            settings |= {"frames": args.frames or d.frames, "fps": args.fps or d.fps}
        if args.invert:
            settings.update(invert=args.invert, steps=args.steps or edit.STEPS, solver="euler", cfg=None, **edit_args)
            (image,) = edit.edit(
                pipe,
                args.invert,
                prompt,
                steps=settings["steps"],
                **edit_args,
                guidance=guidance,
                seed=image_seed,
                height=height,
                width=width,
                progress=not args.quiet,
            )
        else:
            (image,) = pipe.generate(
                prompt,
                height=height,
                width=width,
                steps=args.steps,
                solver=args.solver,
                guidance=guidance,
                cfg=args.cfg,
                negative_prompt=args.negative,
                seed=image_seed,
                init_image=args.init_image,
                strength=args.strength,
                progress=not args.quiet,
                **extra,
            )
        if stride is not None:  # a video: a list of frames (an animated WebP beside `path` without an MP4 encoder)
            import video

            settings["size"] = f"{image[0].width}x{image[0].height}"
            path = video.write_video(path, image, settings["fps"], settings)
        else:
            settings["size"] = f"{image.width}x{image.height}"
            save_png(image, path, settings)
        written.append(str(path))
    total = time.time() - t0
    kind = "video" if stride else "image"
    print(f"wrote {len(written)} {kind}(s) in {total:.1f}s (load {load_s:.1f}s): {' '.join(written)}")
    return 0


def entry(main):
    """`python sample.py ...` / `python train.py ...`: exit with main()'s code; Ctrl-C, even while the modules are
    still being imported, ends in the same one line as anywhere else."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    entry(main)
