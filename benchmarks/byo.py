"""Bring your own model: purify a user's image classifier with the user's own clean images.

``nftbench purify --model torchvision:resnet18 --weights suspect.safetensors --clean-data clean/`` and
``benchmarks.api.purify`` both end here. The defence sees the model and the clean images only (through the
:class:`tasks.base.DefenderView` that ``purify`` builds); the user's test and triggered images are used after it, to
measure.
Nothing is written until the defence has finished; every bad input is one error before any work.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.records import append_csv_row, der, labelled_row, write_record
from common.environment import device_name, versions
from common.hashing import config_hash
from tasks.base import resolve_device
from tasks.image_classification import ImageClassificationTask, to_uint8
from tasks.image_data import ImageSet
from tasks.image_folder import FolderScan, fingerprint, image_folder_set, scan_image_folder

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
MIN_CLEAN = 2  # BatchNorm in training mode needs two values per channel in a batch


def convert_hint(path: str | Path) -> str:
    out = Path(path).with_suffix(".safetensors")
    return (f"python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path}', weights_only=True), '{out}')\"")


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A safetensors state dict; pickle files (.pth, .pt, .bin) are refused with the one-line conversion."""
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{p} is a pickle file, which nftbench never loads (it can run code); convert it once "
                         f"with: {convert_hint(p)}")
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"{p}: give the weights as a .safetensors file (a state dict)")
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} not found")
    from safetensors.torch import load_file

    return load_file(str(p))


def build_net(spec: str, num_classes: int, params: dict[str, Any] | None = None) -> nn.Module:
    """``torchvision:NAME``, ``timm:NAME`` (timm installed), ``nftbench:NAME`` (a registered image model) or
    ``path/to/file.py:factory`` (called with ``num_classes=`` when it takes it), built with random weights."""
    params = dict(params or {})
    kind, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--model {spec!r}: expected torchvision:NAME, timm:NAME, nftbench:NAME or file.py:factory")
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"--model {spec}: torchvision has no model {name!r} (torchvision.models.list_models())")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **params)
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(f"--model {spec} needs timm: pip install timm") from None
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **params)
    if kind == "nftbench":
        from tasks.image_models import IMAGE_MODELS

        return IMAGE_MODELS.get(name)(num_classes=num_classes, **params)
    if kind.endswith(".py"):
        path = Path(kind).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec}: {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"nftbench_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        factory = getattr(module, name, None)
        if not callable(factory):
            raise ValueError(f"--model {spec}: {path} defines no callable {name!r}")
        if "num_classes" in inspect.signature(factory).parameters:
            params.setdefault("num_classes", num_classes)
        return factory(**params)
    raise ValueError(f"--model {spec!r}: unknown kind {kind!r}; use torchvision:, timm:, nftbench: or file.py:factory")


def load_into(net: nn.Module, state: dict[str, Tensor], num_classes: int, classes_from: str) -> None:
    """Load ``state`` strictly; missing/unexpected keys and shape mismatches are one error listing the first few."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"the weights do not match the named model: missing {len(missing)} key(s) {missing[:4]}, "
                         f"unexpected {len(unexpected)} {unexpected[:4]}; check --model (and --model-param)")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        head = " (the classifier: a class-count mismatch)" if num_classes in want else ""
        raise ValueError(f"shape mismatch at {k!r}{head}: weights {got}, model {want}; the model was built for "
                         f"{num_classes} classes ({classes_from}); pass --num-classes or --classes to match the "
                         f"weights{'' if len(wrong) == 1 else f' ({len(wrong)} mismatches)'}")
    net.load_state_dict(state)


def stored_normalization(net: nn.Module) -> tuple[list[float], list[float]] | None:
    """The normalisation a model carries with it (timm's ``pretrained_cfg``), if any."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        return list(cfg["mean"]), list(cfg["std"])
    return None


def input_channels(net: nn.Module) -> int:
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
    return first.in_channels if isinstance(first, nn.Conv2d) else 3


class UserImageModel(nn.Module):
    """A user's network behind the user's normalisation (pixels in [0, 1] in). Declares what NFT and
    fine-pruning need: ``mask_exclude`` (the net's own, else its first BatchNorm, the stem BN NFT's authors leave
    unmasked in ResNet-18) and ``feature_layer`` (the net's own, else its last top-level child holding a conv)."""

    def __init__(self, net: nn.Module, normalize: tuple[Sequence[float], Sequence[float]] | None):
        super().__init__()
        self.net = net
        self.normalized = normalize is not None
        mean, std = normalize if normalize is not None else ((0.0,), (1.0,))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std) if self.normalized else self.net(x)

    @property
    def mask_exclude(self) -> tuple[str, ...]:
        own = getattr(self.net, "mask_exclude", None)
        if own is not None:
            return tuple(f"net.{n}" for n in own)
        first = next((n for n, m in self.net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        return (f"net.{first}",) if first else ()

    @property
    def feature_layer(self) -> str:
        own = getattr(self.net, "feature_layer", None)
        if own is not None:
            return f"net.{own}"
        convs = [n for n, m in self.net.named_children() if any(isinstance(s, nn.Conv2d) for s in m.modules())]
        if not convs:
            raise ValueError("the model has no convolution; fine-pruning needs a conv feature layer")
        return f"net.{convs[-1]}"


class UserImageTask(ImageClassificationTask):
    """The image task over a user's model and clean images only: no training set, no test set, no attack.
    Batches, augmentation (pad-crop + flip) and losses are the image task's, so defences run unchanged."""

    def __init__(self, model: UserImageModel, clean: ImageSet, classes: Sequence[str], device: str | torch.device,
                 describe: dict[str, Any], amp: bool = True):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.user_model, self.classes, self.describe = model, list(classes), describe
        self.num_classes, self.amp = len(self.classes), amp
        self.clean = clean.to(self.device)
        self.dataset_name, self.model_name, self.scale = describe["dataset"], describe["model"], "byo"
        self.large, self.channels_last = False, self.device.type == "cuda"
        self.crop_padding, self.pad_mode = None, "constant"

    def config(self) -> dict[str, Any]:
        return {"task": self.name, **self.describe, "scale": "byo", "classes": self.classes,
                "data_fingerprint": fingerprint(self.clean.to(torch.device("cpu")))}

    def recipe(self) -> dict[str, Any]:
        raise NotImplementedError("a user's model is purified here, not trained")

    def build_model(self) -> nn.Module:
        return copy.deepcopy(self.user_model)

    def clean_split(self, budget: Any = None, seed: int = 0) -> ImageSet:
        return self.clean


def as_image_set(data: Any, classes: Sequence[str] | None, channels: int, size: tuple[int, int] | None,
                 what: str, flat_ok: bool = False) -> tuple[ImageSet, list[str], str, int]:
    """A folder (ImageFolder tree), a ``(x, y)`` pair of tensors (pixels in [0, 1] or uint8) or a Dataset of
    ``(image, label)``; returns the images as uint8, the class order, a label for records and files skipped."""
    if isinstance(data, str | Path):
        scan: FolderScan = scan_image_folder(data, classes, flat_ok=flat_ok)
        return image_folder_set(scan, channels, size), scan.classes, Path(data).name, scan.skipped
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    elif isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    else:
        raise TypeError(f"{what}: give a folder, a (images, labels) pair of tensors or a Dataset of (image, label)")
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{what}: images must be (N, {channels}, H, W) for this model, got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{what}: float images must be pixels in [0, 1], unnormalised (the model's own "
                             "normalisation goes in normalize=)")
        x = to_uint8(x.float())
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = to_uint8(torch.nn.functional.interpolate(x.float() / 255, size=size, mode="bilinear"))
    names = list(classes) if classes is not None else [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    return ImageSet(x.cpu(), y.long().cpu()), names, "tensors", 0


@torch.no_grad()
def measure(task: UserImageTask, model: nn.Module, test: ImageSet | None, triggered: ImageSet | None,
            target: int | None) -> dict[str, float | None]:
    """C-ACC on ``test``; ASR (predicted ``target``) and RA (true class kept) on ``triggered`` images whose true
    class is known and not the target (BackdoorBench), or on all of them when their classes are unknown."""
    out: dict[str, float | None] = {"clean_acc": None, "asr": None, "ra": None}
    if test is not None:
        out["clean_acc"] = task.accuracy(model, task.place(test))
    if triggered is not None:
        keep = triggered.y != target
        if not bool(keep.any()):
            raise ValueError(f"every triggered image is in the target class {target}'s folder; ASR counts images of "
                             "other classes (put them in their true class's folder, or in one flat folder)")
        t = task.place(triggered.subset(torch.nonzero(keep).flatten()))
        model.eval()
        preds = torch.cat([task.predict(model, b.inputs) for b in task.iter_batches(t)])
        out["asr"] = int((preds == target).sum()) / max(1, len(preds))
        if bool((t.y >= 0).all()):
            out["ra"] = int((preds == t.y.to(preds.device)).sum()) / max(1, len(preds))
    return out


def purify_image_model(net: nn.Module, clean: Any, *, model_label: str, defense: str = "nft",
                       options: dict[str, Any] | None = None,
                       normalize: tuple[Sequence[float], Sequence[float]] | str | None = None,
                       classes: Sequence[str] | None = None, input_size: tuple[int, int] | None = None,
                       test: Any = None, triggered: Any = None, target: int | None = None, seed: int = 0,
                       device: str = "auto", extra: dict[str, Any] | None = None,
                       warn=lambda m: print(m, file=sys.stderr)) -> tuple[nn.Module, dict[str, Any]]:
    """Purify ``net`` (weights loaded) with ``defense`` on ``clean``; return the purified net and the run record.

    ``normalize``: (mean, std) the model was trained with, or ``"none"``; never estimated from the clean data."""
    from defenses import DEFENSES, purify

    options = dict(options or {})
    DEFENSES.get(defense).make_config(options)  # bad names/options fail before any work
    if (triggered is None) != (target is None):
        raise ValueError("ASR needs both the triggered images (--triggered-data) and the target class (--target)")
    channels = input_channels(net)
    clean_set, names, data_label, skipped = as_image_set(clean, classes, channels, input_size, "clean data")
    notes = [f"{skipped} non-image file(s) in the clean data skipped"] if skipped else []
    if len(clean_set) < MIN_CLEAN:
        raise ValueError(f"the clean data holds {len(clean_set)} image(s); the defence needs at least {MIN_CLEAN} "
                         "(BatchNorm statistics in training need two per batch)")
    size = tuple(clean_set.x.shape[-2:])
    norm = resolve_normalization(net, normalize, channels, warn, notes)
    model = UserImageModel(net, norm).eval()
    test_set = triggered_set = None
    if test is not None:
        test_set, _, _, n = as_image_set(test, names, channels, size, "test data")
        notes += [f"{n} non-image file(s) in the test data skipped"] if n else []
    if triggered is not None:
        if not 0 <= target < len(names):
            raise ValueError(f"--target {target} is not a class index (0..{len(names) - 1})")
        triggered_set, _, _, n = as_image_set(triggered, names, channels, size, "triggered data", flat_ok=True)
        notes += [f"{n} non-image file(s) in the triggered data skipped"] if n else []
    describe = {"dataset": data_label, "model": model_label, "model_kwargs": {},
                "normalize": None if norm is None else [list(map(float, v)) for v in norm], "input_size": list(size),
                **(extra or {})}
    task = UserImageTask(model.to(resolve_device(device)), clean_set, names, device, describe)
    model = task.user_model
    attack = None if target is None else {"name": "user-triggered", "target": int(target)}
    config = {"task": task.config(), "attack": attack, "defense": defense, "defense_params": options,
              "budget": f"{len(clean_set)} images", "seed": seed}
    record: dict[str, Any] = {"run_id": config_hash(config), "status": "ok", "config": config,
                              "victim_id": describe.get("weights_sha256", "")[:12] or None,
                              "victim_train_time_s": None, "versions": versions(), "device": device_name(task.device),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "clean_samples": len(clean_set)}
    record["before"] = measure(task, model, test_set, triggered_set, target)
    before_state = {k: (v.shape, v.dtype) for k, v in net.state_dict().items()}
    purified, info = purify(defense, copy.deepcopy(model), task, task.clean, options, seed=seed)
    record["defense_info"] = info
    record["after"] = after = measure(task, purified, test_set, triggered_set, target)
    before = record["before"]
    if None not in (before["clean_acc"], before["asr"]):
        record["der"] = der(before["clean_acc"], after["clean_acc"], before["asr"], after["asr"])
    record["not_measured"] = [m for m, missing in (("clean accuracy (no test data)", test_set is None),
                                                   ("ASR and RA (no triggered data and target)", triggered_set is None))
                              if missing]
    record["notes"] = notes
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out_net = purified.net
    after_state = {k: (v.shape, v.dtype) for k, v in out_net.state_dict().items()}
    if after_state != before_state:
        raise RuntimeError(f"defence {defense!r} changed the model's keys or shapes; nothing written")
    return out_net, record


def resolve_normalization(net: nn.Module, normalize: Any, channels: int, warn, notes: list[str]
                          ) -> tuple[list[float], list[float]] | None:
    if isinstance(normalize, str):
        if normalize.lower() == "none":
            return None
        normalize = parse_normalize(normalize)
    if normalize is None:
        stored = stored_normalization(net)
        if stored is not None:
            notes.append(f"normalisation from the model's pretrained_cfg: mean {stored[0]}, std {stored[1]}")
            return stored
        msg = ("warning: no --normalize given and the model stores none, so images reach it as pixels in [0, 1]. "
               "If it was trained on normalised inputs, pass --normalize MEAN/STD (e.g. ImageNet's "
               "0.485,0.456,0.406/0.229,0.224,0.225) or its accuracy will collapse; --normalize none silences this")
        warn(msg)
        notes.append(msg)
        return None
    mean, std = (list(map(float, v)) for v in normalize)
    if len(mean) != len(std) or len(mean) not in (1, channels) or min(std) <= 0:
        raise ValueError(f"--normalize needs 1 or {channels} means and as many positive stds, got {mean}/{std}")
    return mean, std


def parse_normalize(text: str) -> tuple[list[float], list[float]]:
    try:
        mean, std = text.split("/")
        return [float(v) for v in mean.split(",")], [float(v) for v in std.split(",")]
    except ValueError:
        raise ValueError(f"--normalize {text!r}: expected MEAN/STD, e.g. 0.485,0.456,0.406/0.229,0.224,0.225, "
                         "or none") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--input-size {text!r}: expected H,W, e.g. 224,224") from None
    if h < 1 or w < 1:
        raise ValueError(f"--input-size {text!r}: sizes must be >= 1")
    return h, w


def save_outputs(net: nn.Module, record: dict[str, Any], out: str | Path, runs_dir: str | Path,
                 results_csv: str | Path | None) -> Path:
    """``out/model.safetensors`` (the input's keys and shapes) and ``out/record.json``; the record also goes to
    ``runs_dir/records`` and a row to ``results_csv``, where ``leaderboard`` finds them."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record["purified"] = str(out / "model.safetensors")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()},
              str(out / "model.safetensors"))
    write_record(out / "record.json", record)
    write_record(Path(runs_dir) / "records" / f"{record['run_id']}.json", record)
    if results_csv is not None:
        append_csv_row(results_csv, labelled_row(record))
    return out


def purify_from_args(args: Any, options: dict[str, Any], model_params: dict[str, Any]
                     ) -> tuple[dict[str, Any], Path]:
    """``nftbench purify --model ... --weights ... --clean-data ...``: check everything, purify, then write."""
    missing = [f"--{n}" for n in ("model", "weights", "clean-data") if getattr(args, n.replace("-", "_")) is None]
    if missing:
        raise ValueError(f"bring-your-own purify needs --model, --weights and --clean-data (missing {missing})")
    if args.victim is not None or args.val_frac is not None or args.per_class is not None:
        raise ValueError("--model purifies with all of --clean-data; drop --victim, --val-frac and --per-class")
    state = load_weights(args.weights)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if classes is None:
        classes = scan_image_folder(args.clean_data).classes
        source = f"{len(classes)} class folders in {args.clean_data}"
    else:
        source = f"{len(classes)} names in --classes"
    if args.num_classes is not None and args.num_classes != len(classes):
        raise ValueError(f"--num-classes {args.num_classes} but {source}; list every class, in the model's order, "
                         "with --classes a,b,...")
    net = build_net(args.model, len(classes), model_params)
    load_into(net, state, len(classes), source)
    sha = hashlib.sha256(Path(args.weights).expanduser().read_bytes()).hexdigest()
    net, record = purify_image_model(
        net, args.clean_data, model_label=args.model, defense=args.defense, options=options,
        normalize=args.normalize, classes=classes, input_size=parse_size(args.input_size), test=args.test_data,
        triggered=args.triggered_data, target=args.target, seed=args.seed, device=args.device,
        extra={"weights_sha256": sha, "model_kwargs": model_params})
    record["weights"] = str(args.weights)
    out = Path(args.out) if args.out else Path(args.runs_dir) / "byo" / record["run_id"]
    save_outputs(net, record, out, args.runs_dir, args.results)
    for line in record["not_measured"]:
        print(f"not measured: {line}")
    return record, out
