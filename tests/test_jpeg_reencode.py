import numpy as np
import pytest
from PIL import Image

from benchmarks.jpeg_reencode import main, reencode


def _folder(root, n=3):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_reencode_keeps_the_layout_and_loses_detail(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "q30" / "cifar10-jpeg"
    _folder(src)
    assert reencode(src, dst, 30) == 12
    out = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.jpg"))
    assert out == sorted(p.relative_to(src).with_suffix(".jpg").as_posix() for p in src.rglob("*.png"))
    a = np.asarray(Image.open(src / "train/a/0.png"), dtype=float)
    b = np.asarray(Image.open(dst / "train/a/0.jpg"), dtype=float)
    assert b.shape == a.shape and np.abs(a - b).mean() > 5  # noise does not survive quality 30


def test_cli_refuses_an_existing_destination_and_a_bad_quality(tmp_path, capsys):
    src = tmp_path / "src"
    _folder(src, n=1)
    (tmp_path / "dst").mkdir()
    for dst, quality in (("dst", "50"), ("new", "0")):
        args = [str(src), str(tmp_path / dst), "--quality", quality]
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    assert "exists" in capsys.readouterr().err and not (tmp_path / "new").exists()
