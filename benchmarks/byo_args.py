"""The bring-your-own-model options of ``nftbench purify`` (no heavy imports: ``--help`` stays fast)."""

from __future__ import annotations

from typing import Any


def add_arguments(p: Any) -> None:
    """The bring-your-own-model options of ``nftbench purify``."""
    g = p.add_argument_group("bring your own model (instead of --victim)")
    g.add_argument("--model", default=None, metavar="SPEC",
                   help="torchvision:NAME, timm:NAME (timm installed), nftbench:NAME or path/to/file.py:factory")
    g.add_argument("--model-param", action="append", metavar="KEY=VALUE", help="argument of the model factory")
    g.add_argument("--weights", default=None, help="the suspect weights, a .safetensors state dict")
    g.add_argument("--clean-data", default=None, metavar="DIR", help="clean images, an ImageFolder tree <class>/*.png")
    g.add_argument("--num-classes", type=int, default=None, help="default: the number of --classes or class folders")
    g.add_argument("--classes", default=None, help="class order a,b,... (default: folder names, numeric-aware)")
    g.add_argument("--input-size", default=None, metavar="H,W", help="resize every image to H,W")
    g.add_argument("--normalize", default=None, metavar="MEAN/STD|none",
                   help="the model's own input normalisation, e.g. 0.485,0.456,0.406/0.229,0.224,0.225; never "
                        "estimated from the clean data")
    g.add_argument("--test-data", default=None, metavar="DIR", help="ImageFolder to measure clean accuracy on")
    g.add_argument("--triggered-data", default=None, metavar="DIR",
                   help="your triggered images (ImageFolder by true class, or flat) to measure ASR on; with --target")
    g.add_argument("--target", type=int, default=None, help="the backdoor's target class index")
    g.add_argument("--out", default=None, help="where model.safetensors and record.json go (default runs/byo/<run>)")
