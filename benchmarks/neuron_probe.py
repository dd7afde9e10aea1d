"""Where a backdoor sits among the masked neurons, and whether a mask defence turns those neurons down.

A diagnostic for a saved image victim, not a defence: it reads the attacker's triggered test images, so nothing in
the suite selects or tunes with it. For every neuron a mask defence masks (the task's ``mask_target``, e.g. each BN
channel), its **trigger response** is the mean change of its output, averaged over positions, when the trigger is
added to a test image of a non-target class, in units of that output's spread over the clean images. Then:

- **oracle masks**: scale the k most trigger-responsive neurons by s and evaluate, for each k and s (s = 0 prunes,
  as ANP does); if a few neurons carry the backdoor, a neuron mask can remove it, and s says how far down it must go;
- **clean gradients**: what a mask defence trained on clean data sees at its start, the mean (signed and absolute)
  gradient of the clean loss with respect to each mask at 1, with MixUp (NFT's loss) and without, BN in train mode
  as NFT trains, on batches of the run's clean split; next to it NFT's regulariser, ``eta / N_c`` per mask, which
  pulls every mask below 1 back up; and the same gradient where each defence ended (a mask of 1 on its purified
  model: the gradient per relative change of the neuron's scale);
- per defence (default options, the run's clean split): its mask on each neuron, read as the masked tensor after
  the defence over before (NFT's soft mask folded in, ANP's pruning as 0), the mean mask on the top-k responders
  against the rest, how many of them end below 0.5, the rank correlation of response with 1 - mask, and its masks
  alone applied to the victim (every other change the defence made left out, BN statistics included).
  ``--complete REPORT...`` adds that last measurement to reports written before the probe made it.

    python -m benchmarks.neuron_probe runs/victims/<id> --defenses nft,anp --data-root ../shared/data \\
        --out results/cifar10-fast/neuron-probe/<attack>.json

``--defenses`` takes registered names, each optionally with options: ``nft[mixup=False]``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attacks import Attack
from benchmarks.cli import budget_of, parse_params
from benchmarks.plan import split_outside_brackets
from benchmarks.run import Paths, defend, load_victim
from common.checkpoint import atomic_write_text
from defenses.masking import NeuronMasks, neuron_modules
from defenses.nft import NFTConfig
from tasks.base import CleanBudget, Task
from tasks.image_classification import to_float, to_uint8

ORACLE_K = (8, 16, 32, 64, 128)
ORACLE_SCALES = (0.0, 0.25, 0.5)


def parse_defense(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name[key=value,...]`` (values read as YAML, as ``nftbench run --set``) -> (name, options)."""
    name, _, rest = spec.partition("[")
    if rest and not rest.endswith("]"):
        raise ValueError(f"bad defence spec {spec!r}: write name[key=value,...]")
    return name, parse_params([i for i in split_outside_brackets(rest[:-1]) if i], flag=f"defence spec {spec!r}:")


def masked_tensors(model: nn.Module, target: str) -> list[tuple[str, Tensor]]:
    """(layer name, the tensor a neuron mask scales, one row per neuron) for every masked layer, in module order."""
    exclude = set(getattr(model, "mask_exclude", ()))
    out = []
    for name, module, channels, tensors in neuron_modules(model, target, exclude):
        w = getattr(module, tensors[0]).detach().float()
        out.append((name, w.reshape(channels, -1).mean(1) if w.dim() > 1 else w.reshape(channels)))
    return out


@torch.no_grad()
def trigger_response(task: Task, model: nn.Module, attack: Attack, images: int) -> tuple[list[str], Tensor]:
    """Per masked neuron (flattened in module order): mean(triggered - clean output) / std(clean output)."""
    exclude = set(getattr(model, "mask_exclude", ()))
    layers = [(name, module) for name, module, _, _ in neuron_modules(model, task.mask_target, exclude)]
    seen: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out.float().flatten(2).mean(2)))
             for n, m in layers]
    clean_out: dict[str, list[Tensor]] = {n: [] for n, _ in layers}
    delta: dict[str, list[Tensor]] = {n: [] for n, _ in layers}
    model.eval()
    try:
        count = 0
        for b in task.iter_batches(task.test):
            x = b.inputs[attack.counts_for_asr(b.targets)]
            triggered, _, _ = attack.triggered_test(b.inputs, b.targets, task.num_classes)
            if len(triggered) != len(x):
                raise ValueError(f"{attack.name} does not trigger test images one to one; the probe needs pairs")
            x, triggered = x[: images - count], triggered[: images - count]
            if not len(x):
                continue
            task.predict(model, x)
            clean = dict(seen)
            task.predict(model, to_float(to_uint8(triggered)))
            for n, _ in layers:
                clean_out[n].append(clean[n])
                delta[n].append(seen[n] - clean[n])
            count += len(x)
            if count >= images:
                break
    finally:
        for h in hooks:
            h.remove()
    scores = [torch.cat(delta[n]).mean(0) / torch.cat(clean_out[n]).std(0).clamp_min(1e-6) for n, _ in layers]
    return [n for n, _ in layers], torch.cat(scores).cpu()


def ranks(v: Tensor) -> Tensor:
    """Ranks from 0, ties given their average rank (masks tie at 1, and ANP's are 0 or 1)."""
    _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).float()
    return ((ends - counts + ends - 1) / 2)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def top_k(order: Tensor, k: int) -> Tensor:
    """Per neuron (flat, in module order): True for the ``k`` first neurons of ``order``."""
    sel = torch.zeros(len(order), dtype=torch.bool)
    sel[order[:k]] = True
    return sel


def top_k_factor(order: Tensor, k: int, scale: float) -> Tensor:
    """Per neuron: ``scale`` for the ``k`` first neurons of ``order`` (flat indices), 1 for the rest."""
    return torch.where(top_k(order, k), scale, 1.0)


@torch.no_grad()
def scaled_copy(model: nn.Module, target: str, factor: Tensor) -> nn.Module:
    """A copy of ``model`` with each masked neuron's scale times its ``factor`` (flat, in module order); nothing
    else changes (BN statistics included)."""
    scaled = copy.deepcopy(model)
    offset = 0
    for _, module, channels, tensors in neuron_modules(scaled, target, set(getattr(scaled, "mask_exclude", ()))):
        for t in tensors:
            w = getattr(module, t)
            rows = factor[offset:offset + channels].repeat_interleave(w.shape[0] // channels)
            w.mul_(rows.to(w).view(-1, *([1] * (w.dim() - 1))))
        offset += channels
    return scaled


def scaled_result(task: Task, model: nn.Module, attack: Attack, factor: Tensor) -> dict[str, float]:
    """The task's metrics for ``model`` with each masked neuron's scale times its ``factor`` (:func:`scaled_copy`)."""
    return task.evaluate(scaled_copy(model, task.mask_target, factor), attack)


def clean_gradients(task: Task, model: nn.Module, clean: Any, batches: int, batch_size: int, seed: int
                    ) -> dict[str, dict[str, Tensor]]:
    """Per masked neuron, the mean signed and mean absolute gradient of the clean loss with respect to its mask at 1,
    over ``batches`` augmented batches of ``clean`` drawn as NFT draws them, with MixUp (alpha 1, NFT's default) and
    without. On a copy: ``model`` is left as it was."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    masks = NeuronMasks(model, task.mask_target)
    model.train()
    out = {}
    try:
        for loss_name in ("mixup", "plain"):
            g = torch.Generator().manual_seed(seed)
            signed = [torch.zeros_like(m) for m in masks.masks]
            size = [torch.zeros_like(m) for m in masks.masks]
            for _ in range(batches):
                batch = task.sample_batch(clean, batch_size, g, augment=True)
                loss = task.mixup_loss(model, batch, 1.0, g) if loss_name == "mixup" else task.loss(model, batch)
                for acc_s, acc_a, grad in zip(signed, size, torch.autograd.grad(loss, list(masks.masks)), strict=True):
                    acc_s += grad / batches
                    acc_a += grad.abs() / batches
            out[loss_name] = {"signed": torch.cat(signed).float().cpu(), "abs": torch.cat(size).float().cpu()}
    finally:
        masks.remove(fold=False)
    return out


def gradient_summary(grads: dict[str, dict[str, Tensor]], order: Tensor, k: int) -> dict[str, dict[str, float]]:
    """Mean signed and absolute mask gradient on the top-``k`` responders of ``order`` and on the rest."""
    sel = top_k(order, k)
    return {name: {f"{stat}_{part}": float(g[stat][mask].mean()) for stat in ("signed", "abs")
                   for part, mask in (("top", sel), ("rest", ~sel))} for name, g in grads.items()}


def probe(victim_dir: str | Path, defenses: list[str], paths: Paths, budget: CleanBudget, seed: int,
          images: int = 2000, gradient_batches: int = 20) -> dict[str, Any]:
    """The probe's report for one victim (see the module docstring)."""
    task, attack, model, meta = load_victim(victim_dir, paths)
    if attack is None or task.name != "image":
        raise ValueError(f"{victim_dir} is not a backdoored image classifier: the probe needs one")
    names, score = trigger_response(task, model, attack, images)
    layers = masked_tensors(model, task.mask_target)
    before = torch.cat([w for _, w in layers])
    sizes = [len(w) for _, w in layers]
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    order = score.argsort(descending=True)
    report: dict[str, Any] = {
        "victim": meta["victim_id"], "attack": attack.name, "seed": meta["config"]["seed"],
        "mask_target": task.mask_target, "neurons": len(score), "layers": dict(zip(names, sizes, strict=True)),
        "response_images": images, "before": meta["metrics"],
        "top_responders_per_layer": {names[int(l)]: int((layer_of[order[:64]] == l).sum()) for l in
                                     layer_of[order[:64]].unique()},
        "response": [round(float(s), 4) for s in score],  # per neuron, flattened in module order
        "oracle": {str(s): {str(k): scaled_result(task, model, attack, top_k_factor(order, k, s)) for k in ORACLE_K}
                   for s in ORACLE_SCALES},
        "defenses": {},
    }
    clean = task.clean_split(budget, seed)
    grads = clean_gradients(task, model, clean, gradient_batches, NFTConfig.batch_size, seed)
    report["clean_gradient"] = {
        "batches": gradient_batches, "batch_size": NFTConfig.batch_size,
        "nft_regulariser_per_mask": NFTConfig.eta / task.samples_per_class(clean),
        "top_k": {str(k): gradient_summary(grads, order, k) for k in ORACLE_K},
        "per_neuron": {name: {stat: [float(f"{v:.3g}") for v in t] for stat, t in g.items()}
                       for name, g in grads.items()},
    }
    for spec in defenses:
        name, options = parse_defense(spec)
        record, purified = defend(task, attack, copy.deepcopy(model), meta, name, options, budget, seed)
        if purified is None:
            raise RuntimeError(f"{spec} failed on {victim_dir}: {record.get('error')}")
        after = torch.cat([w for _, w in masked_tensors(purified, task.mask_target)])
        mask = torch.where(before.abs() > 1e-12, after / before, torch.ones_like(after))
        after_grads = clean_gradients(task, purified, clean, gradient_batches, NFTConfig.batch_size, seed)
        top = {}
        for k in ORACLE_K:
            sel = top_k(order, k)
            top[str(k)] = {"mean_mask_top": round(float(mask[sel].mean()), 4),
                           "mean_mask_rest": round(float(mask[~sel].mean()), 4),
                           "top_below_0.5": int((mask[sel] < 0.5).sum())}
        report["defenses"][spec] = {
            "after": record["after"], "wall_time_s": record["defense_info"]["wall_time_s"],
            "below_0.5": int((mask < 0.5).sum()), "neurons_pruned": record["defense_info"].get("neurons_pruned"),
            "spearman_response_vs_1_minus_mask": round(spearman(score, 1 - mask), 4),
            "top_k": top, "masks": [round(float(m), 4) for m in mask],
            "masks_on_victim": scaled_result(task, model, attack, mask),
            "clean_gradient_after": {str(k): gradient_summary(after_grads, order, k) for k in ORACLE_K},
        }
    return report


def complete(report: dict[str, Any], paths: Paths) -> dict[str, Any]:
    """Add ``masks_on_victim`` to each defence of a report written before the probe measured it, from the report's
    stored masks and its victim (``<runs>/victims/<id>``)."""
    task, attack, model, _ = load_victim(Path(paths.runs_dir) / "victims" / report["victim"], paths)
    for d in report["defenses"].values():
        if "masks_on_victim" not in d:
            d["masks_on_victim"] = scaled_result(task, model, attack, torch.tensor(d["masks"]))
    return report


def markdown(reports: list[dict[str, Any]], k: int = 16) -> str:
    """Two tables over probe reports: the oracle masks per scale and k, and each defence's masks on the top-``k``
    responders."""
    def pct(m: dict[str, float]) -> str:
        return f"{100 * m['clean_acc']:.1f} / {100 * m['asr']:.1f}"

    ks = list(next(iter(reports[0]["oracle"].values())))
    lines = ["| attack | victim | top-k responders scaled by | " + " | ".join(f"k = {n}" for n in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for r in reports:
        for scale, by_k in r["oracle"].items():
            lines.append(f"| {r['attack']} | {pct(r['before'])} | {scale} | "
                         + " | ".join(pct(by_k[n]) for n in ks) + " |")
    lines += ["", f"| attack | defence | after | masks < 0.5 | top-{k} responders: mean mask (rest) | top-{k} < 0.5 "
              "| Spearman (response, 1 - mask) | its masks alone on the victim |", "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for spec, d in r["defenses"].items():
            t, rho = d["top_k"][str(k)], d.get("spearman_response_vs_1_minus_mask")
            lines.append(f"| {r['attack']} | {spec} | {pct(d['after'])} | {d['below_0.5']} | "
                         f"{t['mean_mask_top']:.3f} ({t['mean_mask_rest']:.3f}) | {t['top_below_0.5']} | "
                         + ("-" if rho is None else f"{rho:.2f}") + " | "
                         + (pct(d["masks_on_victim"]) if "masks_on_victim" in d else "-") + " |")
    with_grads = [r for r in reports if "clean_gradient" in r]
    if with_grads:
        lines += ["", f"| attack | clean loss, at | top-{k}: mean gradient (mean abs.) | rest: mean gradient "
                  "(mean abs.) | NFT regulariser |", "|---|---|---|---|---|"]
        for r in with_grads:
            cg = r["clean_gradient"]
            rows = [(f"{name}, victim", t) for name, t in cg["top_k"][str(k)].items()]
            rows += [(f"{name}, after {spec}", t) for spec, d in r["defenses"].items() if "clean_gradient_after" in d
                     for name, t in d["clean_gradient_after"][str(k)].items()]
            for where, t in rows:
                lines.append(f"| {r['attack']} | {where} | {t['signed_top']:.2e} ({t['abs_top']:.2e}) | "
                             f"{t['signed_rest']:.2e} ({t['abs_rest']:.2e}) | {cg['nft_regulariser_per_mask']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.neuron_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("victim", nargs="?", help="a victim directory (victim.json + model.safetensors)")
    ap.add_argument("--table", nargs="+", type=Path, metavar="REPORT",
                    help="instead of probing: print the markdown tables of these report JSONs")
    ap.add_argument("--complete", nargs="+", type=Path, metavar="REPORT",
                    help="instead of probing: add each defence's masks alone on the victim to these reports")
    ap.add_argument("--defenses", default="nft", help="comma-separated; options in brackets: nft[mixup=False]")
    ap.add_argument("--val-frac", type=float, default=None, help="clean fraction the defences get (default 0.01)")
    ap.add_argument("--per-class", type=int, default=None, help="or clean images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=2000, help="test images the trigger response is measured on")
    ap.add_argument("--gradient-batches", type=int, default=20, help="clean batches the mask gradients average")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="write the report here as JSON (else print it)")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown([json.loads(p.read_text()) for p in args.table]))
        return
    paths = Paths(runs_dir=args.runs_dir, data_root=args.data_root, device=args.device)
    if args.complete:
        for p in args.complete:
            atomic_write_text(p, json.dumps(complete(json.loads(p.read_text()), paths), indent=1) + "\n")
        return
    if args.victim is None:
        ap.error("give a victim directory (or --table / --complete REPORT...)")
    specs = [s.strip() for s in split_outside_brackets(args.defenses) if s.strip()]
    for s in specs:
        parse_defense(s)  # a bad spec fails before any work
    report = probe(args.victim, specs, paths, budget_of(args), args.seed, args.images, args.gradient_batches)
    text = json.dumps(report, indent=1)
    if args.out is None:
        print(text)
    else:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
