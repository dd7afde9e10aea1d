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


# common.precision.PRECISIONS and PRECISION_ENV, restated so --help imports no torch
# (tests/test_precision.py pins them equal)
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_ENV = "NFTBENCH_PRECISION"


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision of training and defences: auto = bf16 on GPUs and on CPUs with native "
                        "bf16 (AMX, AVX512-BF16), else fp32; fp32; bf16. Recorded in victim.json and run records; "
                        f"fp32 or bf16 give victims and runs ids of their own (default: ${PRECISION_ENV} or auto)")
