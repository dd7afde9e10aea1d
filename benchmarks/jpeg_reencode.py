"""Re-encode an ImageFolder copy of a dataset at a lower JPEG quality: ``python -m benchmarks.jpeg_reencode SRC DST
--quality Q``.

A diagnostic for the fast scale (issue 20): the CIFAR-10 copy here is itself a JPEG re-encoding (quality 75, 4:2:0
chroma), and no lossless copy exists offline to measure what that costs. Training the registered recipe on copies
compressed further (``python -m benchmarks.recipe_experiment --data-root DST``) measures how accuracy falls with
quality, the slope a lossless copy would be extrapolated along. Writes DST/{train,test}/<class>/<name>.jpg with
the same names (the loaders read any extension ImageFolder does), with Pillow's standard tables and 4:2:0
subsampling, as the source; refuses to write into an existing DST.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from tasks.image_folder import IMAGE_SUFFIXES


def reencode(src: Path, dst: Path, quality: int) -> int:
    """Every image under ``src`` (the suffixes the image-folder loader reads) re-encoded at ``quality`` into the
    same relative path under ``dst``, as ``.jpg``; returns the number of images written."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images under {src}: pass the dataset folder holding train/ and test/")
    for p in files:
        out = (dst / p.relative_to(src)).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im.convert("RGB").save(out, "JPEG", quality=quality, subsampling="4:2:0")
    return len(files)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.jpeg_reencode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="dataset folder, e.g. ../shared/data/cifar10-jpeg")
    p.add_argument("dst", type=Path, help="new folder, e.g. runs/jpeg-q50/cifar10-jpeg (must not exist)")
    p.add_argument("--quality", type=int, required=True, help="JPEG quality, 1-95")
    args = p.parse_args(argv)
    if not 1 <= args.quality <= 95:
        p.error(f"--quality must be in 1..95 (Pillow's range without special tables), got {args.quality}")
    if not args.src.is_dir():
        p.error(f"{args.src} is not a folder: pass the dataset folder holding train/ and test/")
    if args.dst.exists():
        p.error(f"{args.dst} exists: pass a new folder (nothing is overwritten)")
    try:
        n = reencode(args.src, args.dst, args.quality)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{n} images re-encoded at quality {args.quality} into {args.dst}")


if __name__ == "__main__":
    main()
