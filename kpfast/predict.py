"""``python -m kpfast.predict CHECKPOINT FOLDER --out DIR``: keypoints on a folder of images.

``CHECKPOINT`` is a run directory, its ``model.pt`` or its ``checkpoint.pt``.
Every image in ``FOLDER`` (png, jpg, jpeg, bmp, webp; not recursive) is resized to
the model's size, and its keypoints are mapped back to its own pixels. Written to
``DIR`` (which must not be ``FOLDER``): one annotated PNG per image (skeleton, keypoint
colours by confidence: green certain, red uncertain), named ``<stem>.png``, or
``<stem>_<ext>.png`` when several images share a stem (``a.png`` and ``a.jpg``), with
``_2``, ``_3``, ... added if that name is taken too; and ``predictions.json``:
``{image file: {"size": [H, W], "output": PNG name, "keypoints": {name: {"x", "y",
"confidence", "depth"}}}}``, pixel coordinates with ``(0, 0)`` the centre of the
top-left pixel. A file that cannot be read as an image (damaged, truncated, empty,
not an image, a folder, too many pixels, under 2 pixels on a side) gets
``{"error": reason}`` instead and the others are still predicted; the exit status is
then 1 (0 when every image was read, 2 on bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def output_names(files) -> dict:
    """``{path: annotated PNG name}``, one distinct name per input (see the module docstring)."""
    stems = Counter(p.stem for p in files)
    taken: set = set()
    out = {}
    for p in sorted(files):
        base = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix[1:].lower()}"
        name, n = f"{base}.png", 1
        while name.lower() in taken:  # lower: distinct on case-insensitive file systems too
            n += 1
            name = f"{base}_{n}.png"
        taken.add(name.lower())
        out[p] = name
    return out


def _read(path):
    """``(RGB PIL image, None)`` or ``(None, reason)``."""
    from .data.image_file import ImageFileError, read_image

    try:
        image = read_image(path)
    except ImageFileError as e:
        return None, e.reason
    if min(image.size) < 2:
        return None, f"{image.size[1]}x{image.size[0]} pixels: keypoints need at least 2 pixels on each side"
    return image, None


def predict_folder(checkpoint, folder, out, *, batch_size: int = 32, device: str = "cpu") -> dict:
    """Predict every image of ``folder`` and write the annotated PNGs and ``predictions.json`` into ``out``.

    Returns the JSON content: one entry per image file, with its keypoints or the
    ``"error"`` that kept it from being read.
    """
    from .data.coords import pixels_to_normalized
    from .data.draw import draw_keypoints
    from .inference import load
    from .viz import certainty_colors

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if out.resolve() == folder.resolve():
        raise ValueError(f"--out {str(out)!r} is the image folder: the annotated PNGs would overwrite the images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    names = output_names(files)
    predictor = load(checkpoint, device=device)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for start in range(0, len(files), batch_size):
        chunk = []
        for path in files[start:start + batch_size]:
            image, error = _read(path)
            if error is None:
                chunk.append((path, image))
            else:
                result[path.name] = {"error": error}
        if not chunk:
            continue
        pred = predictor.predict([image for _, image in chunk])
        entries = pred.to_json(predictor.meta.keypoint_names)
        for i, (path, image) in enumerate(chunk):
            entry = entries[i]
            result[path.name] = {"size": entry["size"], "output": names[path], "keypoints": entry["keypoints"]}
            kp = pixels_to_normalized(pred.keypoints[i].double(), pred.sizes[i])
            radius = max(2.0, min(image.size) / 100)
            drawn = draw_keypoints(image, kp, edges=predictor.meta.edges, colors=certainty_colors(pred.confidence[i]),
                                   radius=radius, line_width=max(1, int(radius / 2)))
            drawn.save(out / names[path])
    result = {p.name: result[p.name] for p in files}
    tmp = out / f".predictions.json.{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "predictions.json")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kpfast.predict", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run directory, model.pt or checkpoint.pt")
    p.add_argument("folder", help="folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        result = predict_folder(args.checkpoint, args.folder, args.out, batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"kpfast predict: {e}", file=sys.stderr)
        return 2
    failed = {name: r["error"] for name, r in result.items() if "error" in r}
    for name, error in failed.items():
        print(f"kpfast predict: skipped {Path(args.folder) / name}: {error}", file=sys.stderr)
    print(f"kpfast predict: {len(result) - len(failed)} of {len(result)} images -> {args.out}"
          + (f" ({len(failed)} unreadable, listed in predictions.json)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
