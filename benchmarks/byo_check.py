"""Does bring-your-own purification give the victim-directory path's numbers? (issue 22's measured check)

``python -m benchmarks.byo_check --victim runs/victims/<id> [--defense nft] [--seed 0] --out runs/byo-check``

Takes a suite-trained image victim and purifies it twice with the same defence, options, budget (1% clean data) and
seed:

1. the suite's path: ``nftbench purify --victim DIR`` (:func:`benchmarks.run.purify_victim`);
2. the BYO path a defender with a checkpoint of their own takes: the network's weights exported as a plain state
   dict (``net.safetensors``: the architecture's own keys, no nftbench wrapper), reloaded into a fresh network, its
   normalisation given explicitly, the same clean images written as an ImageFolder of PNGs, the test set and its
   triggered copy (the attack's test-time trigger on every non-target image) handed over as tensors
   (:func:`benchmarks.api.purify`).

It prints both records' C-ACC / ASR / RA before and after and writes them with the differences to
``<out>/byo-check.json``. Before-metrics must agree exactly (same weights, same pixels); after-metrics within seed
noise, since the two paths draw their batches from the same images in another order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.byo_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victim", required=True, help="a suite victim directory of the image task")
    p.add_argument("--defense", default="nft")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-frac", type=float, default=0.01)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="runs/byo-check")
    args = p.parse_args(argv)

    from PIL import Image
    from safetensors.torch import load_file, save_file

    from benchmarks.api import purify
    from benchmarks.run import Paths, load_victim, purify_victim
    from tasks import CleanBudget
    from tasks.image_classification import to_float, to_uint8
    from tasks.image_models import IMAGE_MODELS

    out = Path(args.out)
    paths = Paths(data_root=args.data_root, runs_dir=args.runs_dir, device="cpu")
    budget = CleanBudget(args.val_frac)
    task, attack, model, meta = load_victim(args.victim, paths)
    if task.name != "image" or attack is None:
        raise SystemExit("byo_check takes a backdoored victim of the image task")

    suite, _ = purify_victim(args.victim, args.defense, {}, budget, args.seed, paths)

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(out / "net.safetensors"))
    net = IMAGE_MODELS.get(task.model_name)(num_classes=task.num_classes, in_channels=task.data.shape[0],
                                            **task.model_kwargs)
    net.load_state_dict(load_file(str(out / "net.safetensors")))
    clean = task.clean_split(budget, args.seed)
    names = [f"{c:02d}" for c in range(task.num_classes)]
    for i, (x, y) in enumerate(zip(clean.x.cpu(), clean.y.cpu(), strict=True)):
        folder = out / "clean" / names[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).squeeze(-1).numpy()).save(folder / f"{i:05d}.png")
    test_x, test_y = to_float(task.test.x.cpu()), task.test.y.cpu()
    triggered_x, wanted, truth = attack.triggered_test(test_x, test_y, task.num_classes)
    normalize = (model.mean.flatten().tolist(), model.std.flatten().tolist())
    byo = purify(net, out / "clean", defense=args.defense, normalize=normalize, classes=names,
                 test=(test_x, test_y), triggered=(to_float(to_uint8(triggered_x)), truth), target=int(wanted[0]),
                 seed=args.seed, device="cpu", name=f"nftbench:{task.model_name}", runs_dir=args.runs_dir,
                 results_csv=None).record

    report = {"victim": str(args.victim), "victim_id": meta.get("victim_id"), "defense": args.defense,
              "seed": args.seed, "val_frac": args.val_frac, "torch_threads": torch.get_num_threads()}
    for when in ("before", "after"):
        report[when] = {"suite": suite[when], "byo": byo[when],
                        "difference": {k: None if suite[when][k] is None or byo[when][k] is None
                                       else byo[when][k] - suite[when][k] for k in ("clean_acc", "asr", "ra")}}
        print(f"{when}: suite " + "  ".join(f"{k} {suite[when][k]:.4f}" for k in ("clean_acc", "asr", "ra"))
              + " | byo " + "  ".join(f"{k} {byo[when][k]:.4f}" for k in ("clean_acc", "asr", "ra")))
    report["clean_samples"] = {"suite": suite["clean_samples"], "byo": byo["clean_samples"]}
    (out / "byo-check.json").write_text(json.dumps(report, indent=1))
    print(f"-> {out / 'byo-check.json'}")


if __name__ == "__main__":
    main()
