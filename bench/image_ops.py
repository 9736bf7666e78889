"""The detect task's image work, each choice against the one it replaced, side by side in one process.

Run from the repository root:  .venv/bin/python -m bench.image_ops [--rounds 5] [--sizes 40]

1. decode: `workers.detection.load_upright_rgb` (decode, EXIF orientation applied in place, no
   copy of an RGB image) against the earlier `exif_transpose(image).convert("RGB")`, which copied
   every photo twice. CPU ms per photo over the JPEGs of tests/photos/ (same pixels checked).
2. PNG: the annotated PNG as `workers.drawing.encode_png` writes it (Up filter, ISA-L deflate)
   against Pillow's encoder at zlib level 1 with Z_RLE (the setting before) and at level 3 (the
   one before that): CPU ms and bytes per image, for the PNGs of tests/photos/ (<= 600 px) and
   for the 1920-px photos as if they had been uploaded as PNG (same pixels checked).
3. ONNX memory patterns: the ONNX detector as the platform builds it (`enable_mem_pattern` off)
   and with ONNX Runtime's default (on), over 4 photos resized to --sizes long sides (240-2400
   px), three passes: CPU ms per photo of both side by side in this process, and the RSS after
   each pass of each alone in a fresh process of its own.
Rounds alternate the order of the variants so that noise hits both.
"""

import argparse
import io
import os
import subprocess
import sys
import time
import zlib

import numpy as np
import PIL.Image
import PIL.ImageOps

from bench.stack import PHOTOS, photo_names, table

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "face_detect_api.settings")


def decode_copying(data):
    image = PIL.Image.open(io.BytesIO(data))
    image = PIL.ImageOps.exif_transpose(image)
    return image.convert("RGB")


def timed(func, *args):
    started = time.process_time()
    result = func(*args)
    return result, time.process_time() - started


def alternate(rounds, variants, work):
    """{name: total CPU s} of work(func) per variant, the order flipped every round."""
    spent = dict.fromkeys(variants, 0.0)
    for number in range(rounds):
        for name, func in (list(variants.items()) if number % 2 == 0 else list(variants.items())[::-1]):
            spent[name] += work(func)
    return spent


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, default=40, help="long sides for the ONNX memory test (default 40)")
    parser.add_argument("--rss-only", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_only:
        return rss_only(args.rss_only, args.sizes)

    import django

    django.setup()
    from workers.detection import find_faces, load_upright_rgb
    from workers.drawing import encode_png

    photos = {name: (PHOTOS / name).read_bytes() for name in photo_names()}
    jpegs = {n: d for n, d in photos.items() if PIL.Image.open(io.BytesIO(d)).format == "JPEG"}
    pngs = {n: d for n, d in photos.items() if PIL.Image.open(io.BytesIO(d)).format == "PNG"}

    # 1. decode
    for data in jpegs.values():
        assert load_upright_rgb(data).tobytes() == decode_copying(data).tobytes()
    decoders = {"in place (platform)": load_upright_rgb, "exif_transpose + convert (before)": decode_copying}
    spent = alternate(args.rounds, decoders, lambda f: sum(timed(f, d)[1] for d in jpegs.values()))
    n = args.rounds * len(jpegs)
    print(f"1. decode, CPU ms per JPEG ({len(jpegs)} JPEGs x {args.rounds} rounds, same pixels):")
    print(table(("decoder", "CPU ms"), [(k, f"{v / n * 1000:.1f}") for k, v in spent.items()]))

    # 2. PNG encoding
    def pillow(**options):
        def encode(image):
            buffer = io.BytesIO()
            image.save(buffer, "PNG", **options)
            return buffer.getvalue()
        return encode

    encoders = {"Up filter + ISA-L level 1 (platform)": encode_png,
                "Pillow, zlib level 1, Z_RLE (before)": pillow(compress_level=1, compress_type=zlib.Z_RLE),
                "Pillow, zlib level 3 (first)": pillow(compress_level=3)}
    groups = {"test PNGs": [load_upright_rgb(d) for d in pngs.values()],
              "1920-px photos": [load_upright_rgb(d) for d in jpegs.values()]}
    groups["1920-px photos"] = [im for im in groups["1920-px photos"] if max(im.size) >= 1920]
    rows = []
    for group, images in groups.items():
        for image in images:
            assert PIL.Image.open(io.BytesIO(encode_png(image))).tobytes() == image.tobytes()
        spent = alternate(args.rounds, encoders, lambda f: sum(timed(f, im)[1] for im in images))
        sizes = {k: sum(len(f(im)) for im in images) / len(images) for k, f in encoders.items()}
        n = args.rounds * len(images)
        fastest = min(spent.values())
        rows += [(f"{group} ({len(images)})", k, f"{spent[k] / n * 1000:.1f}", f"{spent[k] / fastest:.1f}x",
                  f"{sizes[k] / 1024:.0f}") for k in encoders]
    print(f"\n2. annotated PNG, per image ({args.rounds} rounds, same pixels checked):")
    print(table(("images", "encoder", "CPU ms", "vs fastest", "KB"), rows))

    # 3. ONNX memory patterns
    detectors = {"mem patterns off (platform)": onnx_detector(False), "mem patterns on (default)": onnx_detector(True)}
    resized = sized_photos(photos, args.sizes)

    def run_all(detector):
        return sum(timed(find_faces, im, 20, 0.9, None, detector)[1] for im in resized)

    spent = alternate(2, {k: (lambda d=d: d) for k, d in detectors.items()}, lambda f: run_all(f()))
    rss = {}
    for name, flag in (("mem patterns off (platform)", "off"), ("mem patterns on (default)", "on")):
        out = subprocess.run([sys.executable, "-m", "bench.image_ops", "--rss-only", flag, "--sizes", str(args.sizes)],
                             capture_output=True, text=True, timeout=900, check=True)
        rss[name] = out.stdout.strip().splitlines()[-1]
    n = 2 * len(resized)
    print(f"\n3. ONNX memory patterns ({len(resized)} images of {args.sizes} sizes):")
    print(table(("session", "CPU ms/photo (side by side)", "RSS MB after load / pass 1 / 2 / 3 (own process)"),
                [(k, f"{spent[k] / n * 1000:.1f}", rss[k]) for k in detectors]))


def onnx_detector(mem_pattern):
    from workers import onnx_engine

    plain_options = onnx_engine.session_options

    def options(threads=1):
        chosen = plain_options(threads)
        chosen.enable_mem_pattern = mem_pattern
        return chosen

    onnx_engine.session_options = options
    try:
        return onnx_engine.OnnxDetector(onnx_engine.default_model_dir(), threads=1)
    finally:
        onnx_engine.session_options = plain_options


def sized_photos(photos, count):
    from workers.detection import load_upright_rgb

    upright = [load_upright_rgb(d) for d in list(photos.values())[:4]]
    sides = np.geomspace(240, 2400, count).astype(int)
    return [im.resize((max(24, round(im.width * s / max(im.size))), max(24, round(im.height * s / max(im.size)))))
            for s in sides for im in upright]


def rss_only(flag, sizes):
    """Child process: RSS after loading the detector and after each of three passes."""
    import django

    django.setup()
    from workers.detection import find_faces

    detector = onnx_detector(flag == "on")
    resized = sized_photos({name: (PHOTOS / name).read_bytes() for name in photo_names()}, sizes)
    marks = [rss_mb()]
    for _ in range(3):
        for image in resized:
            find_faces(image, 20, 0.9, None, detector)
        marks.append(rss_mb())
    print(" / ".join(f"{m:.0f}" for m in marks))


if __name__ == "__main__":
    main()
