"""How far pose and quality (workers/face_quality.py) can be trusted on real photos, without
labelled data: each photo of tests/photos is detected by the platform's engine, then mirrored,
halved, turned and blurred, and the readings compared; plus the CPU cost per face. The figures in
docs/quality.md come from here.

Run from the repository root:  .venv/bin/python -m bench.face_quality [--repeat 300]
"""

import argparse
import math
import os
import statistics
import time

from bench.stack import PHOTOS, photo_names, table

TURNS = (-30, -20, -10, 10, 20, 30)
BLURS = (0, 1.5, 3, 6)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300, help="describe() calls per face for the cost figure")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "face_detect_api.settings")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import django

    django.setup()
    import PIL.Image
    import PIL.ImageFilter
    import PIL.ImageOps

    from workers import detection, face_quality

    def faces_of(image):
        return face_quality.describe_all(image, detection.find_faces(image))

    def nearest(face, others, mapping):
        box = face["box"]
        x, y = mapping(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        return min(others, key=lambda o: math.dist((o["box"]["x"] + o["box"]["width"] / 2,
                                                    o["box"]["y"] + o["box"]["height"] / 2), (x, y)), default=None)

    def wrap(angle):
        return (angle + 180) % 360 - 180

    rows, turn_rows, blur_rows, costs = [], [], [], []
    gaps = {"mirror yaw": [], "mirror roll": [], "half yaw": [], "half pitch": [], "half roll": [], "half sharpness": []}
    for name in photo_names():
        image = detection.load_upright_rgb((PHOTOS / name).read_bytes())
        faces = faces_of(image)
        if not faces:
            continue
        mirror = faces_of(PIL.ImageOps.mirror(image))
        half_size = (round(image.width / 2), round(image.height / 2))
        half = faces_of(image.resize(half_size, PIL.Image.Resampling.LANCZOS)) if image.width >= 1000 else []
        for face in faces:
            pose, quality = face["pose"], face["quality"]
            flipped = nearest(face, mirror, lambda x, y: (image.width - x, y))
            again = nearest(face, half, lambda x, y: (x / 2, y / 2))
            cells = [name, face["box"]["width"], *pose.values(), *quality.values()]
            if flipped:
                cells += [f"{pose['yaw'] + flipped['pose']['yaw']:+.1f}", f"{pose['roll'] + flipped['pose']['roll']:+.1f}"]
                gaps["mirror yaw"].append(abs(pose["yaw"] + flipped["pose"]["yaw"]))
                gaps["mirror roll"].append(abs(pose["roll"] + flipped["pose"]["roll"]))
            else:
                cells += ["-", "-"]
            if again:
                diffs = [again["pose"][k] - pose[k] for k in ("yaw", "pitch", "roll")]
                diffs.append(again["quality"]["sharpness"] - quality["sharpness"])
                cells += [f"{d:+.1f}" for d in diffs[:3]] + [f"{diffs[3]:+.3f}"]
                for key, value in zip(("half yaw", "half pitch", "half roll", "half sharpness"), diffs, strict=True):
                    gaps[key].append(abs(value))
            else:
                cells += ["-"] * 4
            rows.append(cells)

            start = time.thread_time()
            for _ in range(args.repeat):
                face_quality.describe(image, face)
            costs.append((time.thread_time() - start) / args.repeat * 1000)

            blurred = [face_quality.describe(image.filter(PIL.ImageFilter.GaussianBlur(r)) if r else image, face)
                       ["quality"]["sharpness"] for r in BLURS]
            blur_rows.append([name, face["box"]["width"], *blurred])

        if len(faces) == 1 and image.width < 1000:  # the portraits: turn them
            shifts = []
            for degrees in TURNS:
                turned = faces_of(image.rotate(degrees, resample=PIL.Image.Resampling.BICUBIC, expand=True))
                biggest = max(turned, key=lambda f: f["box"]["width"], default=None)
                shifts.append(f"{wrap(biggest['pose']['roll'] - faces[0]['pose']['roll']) - degrees:+.1f}"
                              if biggest else "lost")
            turn_rows.append([name, *shifts])

    print("Each face: pose, quality; yaw + mirrored yaw and roll + mirrored roll (0 = exact sign flip);"
          " 960-px copy minus 1920-px photo (detected again)\n")
    print(table(["photo", "box", "yaw", "pitch", "roll", "sharp", "bright", "contr", "ipd",
                 "mir yaw", "mir roll", "half yaw", "half pitch", "half roll", "half sharp"], rows))
    print("\n" + ", ".join(f"{key}: median {statistics.median(v):.3g}, max {max(v):.3g}" for key, v in gaps.items() if v))
    print("\nRoll of the portrait turned by t degrees, minus its roll, minus t (0 = exact)\n")
    print(table(["photo", *(f"t={t:+d}" for t in TURNS)], turn_rows))
    print(f"\nSharpness of each face after a Gaussian blur of radius {', '.join(map(str, BLURS))} px\n")
    print(table(["photo", "box", *(f"r={r}" for r in BLURS)], blur_rows))
    print(f"\ndescribe(): {statistics.median(costs):.2f} ms CPU per face (median of {len(costs)} faces,"
          f" max {max(costs):.2f}), {args.repeat} calls each")


if __name__ == "__main__":
    main()
