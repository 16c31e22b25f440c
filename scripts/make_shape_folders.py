"""Make a small image data set of one's own to try data=imagefolder, fine-tuning and prediction
on (pictures of shapes on noisy backgrounds, PNG and JPEG, RGB, grayscale and RGBA):

    python scripts/make_shape_folders.py demo

    demo/pretrain/<shape>/   4 shapes x 60 pictures (a model to fine-tune from)
    demo/own/<shape>/        an imbalanced set of 4 classes, two of them new shapes:
                             ring 48, bar 30, square 18, triangle 10
    demo/new/                12 unlabelled pictures to predict
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_train.data.shapes import make_shape_folders, shape_image

PRETRAIN = {"circle": 60, "square": 60, "triangle": 60, "cross": 60}
OWN = {"ring": 48, "bar": 30, "square": 18, "triangle": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out",
        type=Path,
        help="the folder to make: a new or empty one, or one this script made (it is replaced)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists() or args.out.is_symlink():
        if not args.out.is_dir() or args.out.is_symlink():
            parser.exit(2, f"make_shape_folders.py: {args.out} exists and is not a folder\n")
        ours = {"pretrain", "own", "new"}
        others = sorted(p.name for p in args.out.iterdir() if p.name not in ours)
        if others:
            parser.exit(
                2,
                f"make_shape_folders.py: {args.out} holds other files than a data set this script"
                f" made ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); give a new"
                " or empty folder\n",
            )
        for name in ours:
            if (args.out / name).is_dir() and not (args.out / name).is_symlink():
                shutil.rmtree(args.out / name)
            elif (args.out / name).exists() or (args.out / name).is_symlink():
                (args.out / name).unlink()
    make_shape_folders(args.out / "pretrain", PRETRAIN, seed=args.seed + 1)
    make_shape_folders(args.out / "own", OWN, seed=args.seed + 2)
    new = args.out / "new"
    new.mkdir(parents=True)
    rng = np.random.default_rng(args.seed + 3)
    for i, kind in enumerate(rng.choice(list(OWN), 12)):
        Image.fromarray(shape_image(str(kind), rng)).save(new / f"picture_{i:02d}.png")
    for name, counts in (("pretrain", PRETRAIN), ("own", OWN)):
        print(f"{args.out / name}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    print(f"{new}: 12 pictures to predict")


if __name__ == "__main__":
    main()
