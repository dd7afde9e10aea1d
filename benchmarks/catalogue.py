"""What ``nftbench list`` prints, kept as ``benchmarks/catalogue.json`` so listing needs no torch import.

``python -m benchmarks.catalogue`` rebuilds the file from the registries; ``tests/test_byo.py`` fails when it is out
of date. ``nftbench list --live`` reads the registries instead (a defence or attack you registered yourself).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

CATALOGUE = Path(__file__).with_name("catalogue.json")

# The tasks each defence's tests run it on (tests/test_translation.py, tests/test_detection.py); image and point
# cloud tests run every defence. CLP needs conv + BN, which a Transformer lacks.
TESTED_ON = {
    "translation": {"none", "nft", "ft", "fine-pruning", "anp", "i-bau"},
    "detection": {"none", "nft", "ft", "fine-pruning", "anp", "i-bau", "clp"},
}


def build() -> dict[str, Any]:
    """Every section of ``nftbench list`` from the live registries (imports torch and every task)."""
    from attacks import ATTACKS
    from defenses import DEFENSES
    from tasks import TASKS
    from tasks.detection import MODELS as DETECTION_MODELS
    from tasks.detection_data import DETECTION_DATASETS
    from tasks.image_data import IMAGE_DATASETS
    from tasks.image_models import IMAGE_MODELS
    from tasks.point_data import POINTCLOUD_DATASETS
    from tasks.point_models import POINTCLOUD_MODELS
    from tasks.translation import MODELS as TRANSLATION_MODELS
    from tasks.translation_data import TRANSLATION_DATASETS
    from tasks.video import VIDEO_MODELS
    from tasks.video_data import VIDEO_DATASETS

    defenses = []
    for name, spec in DEFENSES.items():
        cfg = spec.make_config()
        options = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        tasks = [t for t in TASKS.names() if name in TESTED_ON.get(t, {name})]
        defenses.append({"name": name, "paper": spec.paper, "tasks": tasks,
                         "options": {k: v if isinstance(v, int | float | str | bool | None) else str(v)
                                     for k, v in options.items()}})
    return {
        "tasks": TASKS.names(), "datasets (image)": IMAGE_DATASETS.names(), "models (image)": IMAGE_MODELS.names(),
        "datasets (pointcloud)": POINTCLOUD_DATASETS.names(), "models (pointcloud)": POINTCLOUD_MODELS.names(),
        "datasets (translation)": TRANSLATION_DATASETS.names(), "models (translation)": list(TRANSLATION_MODELS),
        "datasets (detection)": [*DETECTION_DATASETS.names(), "<path to a YOLO dataset .yaml>"],
        "models (detection)": list(DETECTION_MODELS),
        "datasets (video)": VIDEO_DATASETS.names(), "models (video)": VIDEO_MODELS.names(),
        "attacks": [{"name": n, "modality": c.modality, "paper": c.paper} for n, c in ATTACKS.items()],
        "defenses": defenses,
    }


def load() -> dict[str, Any]:
    return json.loads(CATALOGUE.read_text())


def lines(section: str, entries: list[Any]) -> list[str]:
    if section == "attacks":
        return [f"{a['name']:12s} [{a['modality']}] {a['paper']}" for a in entries]
    if section == "defenses":
        out = []
        for d in entries:
            out.append(f"{d['name']:12s} {d['paper']}")
            out.append(f"{'':12s}   tasks: {', '.join(d['tasks'])}")
            if d["options"]:
                out.append(f"{'':12s}   options (--set): " + ", ".join(f"{k}={v}" for k, v in d["options"].items()))
        return out
    return [str(e) for e in entries]


def main() -> None:
    CATALOGUE.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {CATALOGUE}")


if __name__ == "__main__":
    main()
