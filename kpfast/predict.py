"""``python -m kpfast.predict CHECKPOINT FOLDER --out DIR``: keypoints on a folder of images.

``CHECKPOINT`` is a run directory, its ``model.pt`` or its ``checkpoint.pt``.
Every image in ``FOLDER`` (png, jpg, jpeg, bmp, webp; not recursive) is resized to
the model's size, and its keypoints are mapped back to its own pixels. Written to
``DIR``: ``<name>.png`` per image (skeleton, keypoint colours by confidence:
green certain, red uncertain) and ``predictions.json``
(``{image file: {"size": [H, W], "keypoints": {name: {"x", "y", "confidence", "depth"}}}}``,
pixel coordinates with ``(0, 0)`` the centre of the top-left pixel).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def predict_folder(checkpoint, folder, out, *, batch_size: int = 32, device: str = "cpu") -> dict:
    """Predict every image of ``folder`` and write the annotated PNGs and ``predictions.json`` into ``out``.

    Returns the JSON content.
    """
    from PIL import Image

    from .data.coords import pixels_to_normalized
    from .data.draw import draw_keypoints
    from .inference import load
    from .viz import certainty_colors

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    predictor = load(checkpoint, device=device)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = [Image.open(p).convert("RGB") for p in chunk]
        pred = predictor.predict(images)
        for i, (path, image) in enumerate(zip(chunk, images)):
            result[path.name] = pred.to_json(predictor.meta.keypoint_names)[i]
            kp = pixels_to_normalized(pred.keypoints[i].double(), pred.sizes[i])
            radius = max(2.0, min(image.size) / 100)
            drawn = draw_keypoints(image, kp, edges=predictor.meta.edges, colors=certainty_colors(pred.confidence[i]),
                                   radius=radius, line_width=max(1, int(radius / 2)))
            drawn.save(out / f"{path.stem}.png")
    (out / "predictions.json").write_text(json.dumps(result, indent=1))
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
    print(f"kpfast predict: {len(result)} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
