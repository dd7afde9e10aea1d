"""Victim-training options shared by ``nftbench train-victim`` and ``nftbench perf`` (no heavy imports, so
``nftbench --help`` stays fast)."""

from __future__ import annotations

import argparse


def add_gpu_arguments(p: argparse.ArgumentParser) -> None:
    """``--max-steps`` and ``--compile``, shared by ``perf`` and ``train-victim``."""
    p.add_argument("--max-steps", type=int, default=None,
                   help="train a victim that is not cached for at most this many steps of its recipe (a timing "
                        "run's victim, cached under its own id)")
    p.add_argument("--compile", action="store_const", const="1", dest="compile",
                   help="torch.compile the model in victim training, NFT and ANP (sets NFTBENCH_COMPILE=1)")
