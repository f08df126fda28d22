"""video.py: MP4 through PyAV and through imageio-ffmpeg, the animated-WebP fallback, metadata, and bad input."""

import numpy as np
import pytest
from PIL import Image

import video


def moving_gradient(frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth content that moves from frame to frame, which lossy codecs keep within a few levels."""
    y, x = np.mgrid[0:height, 0:width]
    clip = [
        np.stack([(x * 3 + 20 * t) % 256, (y * 4 + 10 * t) % 256, np.full_like(x, 40 + 20 * t)], axis=-1)
        for t in range(frames)
    ]
    return np.clip(np.stack(clip), 0, 255).astype(np.uint8)


SETTINGS = {"prompt": 'a fox 狐狸, "quoted"', "seed": 3, "fps": 24}


@pytest.mark.parametrize("backend", ["pyav", "imageio"])
def test_mp4_round_trip(tmp_path, backend):
    pytest.importorskip("av" if backend == "pyav" else "imageio_ffmpeg", reason=f"{backend} is optional")
    pytest.importorskip("av", reason="the files are read back with PyAV")
    clip = moving_gradient()
    path = video.write_video(tmp_path / "clip.mp4", clip, fps=24, metadata=SETTINGS, backend=backend)
    assert path == tmp_path / "clip.mp4" and [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp left
    frames, fps, meta = video.read_video(path)
    assert frames.shape == clip.shape and fps == 24 and meta == SETTINGS
    assert np.abs(frames.astype(int) - clip).mean() < 4
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"


def test_fractional_fps_and_pil_frames(tmp_path):
    pytest.importorskip("av", reason="PyAV is optional")
    frames = [Image.fromarray(f) for f in moving_gradient(5)]
    path = video.write_video(tmp_path / "clip.mp4", frames, fps=30000 / 1001)
    read, fps, meta = video.read_video(path)
    assert len(read) == 5 and abs(fps - 29.97) < 0.01 and meta == {}


def test_webp_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "available_backend", lambda: "pillow")
    clip = moving_gradient()
    path = video.write_video(tmp_path / "clip.mp4", clip, fps=24, metadata=SETTINGS)
    assert path == tmp_path / "clip.webp" and path.is_file()
    frames, fps, meta = video.read_video(path)
    assert frames.shape == clip.shape and meta == SETTINGS
    assert fps == pytest.approx(1000 / 42)  # WebP frame durations are whole milliseconds
    assert np.abs(frames.astype(int) - clip).mean() < 4
    with Image.open(path) as im:
        assert im.format == "WEBP" and im.n_frames == 9 and im.info.get("loop") == 0


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        video.write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=24)
    with pytest.raises(ValueError, match="no frames"):
        video.write_video(tmp_path / "a.mp4", np.zeros((0, 8, 8, 3), np.uint8), fps=24)
    with pytest.raises(ValueError, match="fps"):
        video.write_video(tmp_path / "a.mp4", moving_gradient(2), fps=0)
    with pytest.raises(ValueError, match="unknown video backend"):
        video.write_video(tmp_path / "a.mp4", moving_gradient(2), fps=24, backend="gif")
    if video.available_backend() != "pillow":
        with pytest.raises(ValueError, match="even"):
            video.write_video(tmp_path / "a.mp4", moving_gradient(2, 47, 64), fps=24)
    with pytest.raises(FileNotFoundError):
        video.read_video(tmp_path / "missing.mp4")
    (tmp_path / "broken.webp").write_bytes(b"RIFF0000WEBPVP8 garbage")
    with pytest.raises(ValueError, match="cannot read video"):
        video.read_video(tmp_path / "broken.webp")
    if video.available_backend() == "pyav":
        (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really")
        with pytest.raises(ValueError, match="cannot read video"):
            video.read_video(tmp_path / "broken.mp4")
