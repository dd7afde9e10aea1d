"""SIG, WaNet, BppAttack, LF, Trojan and CLB: trigger budgets, exact seeded poisoning, and digits victims."""

import math

import pytest
import torch
from conftest import DIGITS_ACC_ALLOWANCE, asr_floor

from attacks import create_attack, select_poison_indices
from attacks.image_optimised import corner_trigger  # importing the modules registers their attacks
from attacks.image_signal import floyd_steinberg, warp_grid

NAMES = ("sig", "wanet", "bppa", "lf", "trojan", "clb")

# Digits-specific parameters: the digits are 8x8 images upsampled to 16x16 (smooth, with a black background), the
# victim a tiny ResNet trained 30 epochs, where the paper defaults of these four attacks leave a weak backdoor
# (ASR measured with the defaults: SIG 0.01, WaNet 0.23, BppAttack 0.58, CLB 0.61). Each setting below is the
# smallest change tried that reaches ASR >= 0.85 with clean accuracy within 3 points; Trojan and LF use their
# defaults (ASR 1.0).
DIGITS_PARAMS = {
    # clean-label stripes must beat the very distinct shape of a "0": delta 40/255 -> 0.01, 60/255 -> 0.24,
    # 0.3 -> 0.79, 0.4 -> 1.0 (poisoning the whole target class instead costs ~10 points of clean accuracy)
    "sig": {"delta": 0.4},
    # s 0.5 moves pixels by at most ~0.5 px on 16 px images (ASR 0.23); s 1 -> 0.84, s 2 (~2 px) -> 0.29-0.94 by seed
    # (s 3: 0.35-0.84; cross_ratio 1: 0.57-0.85); s 2 with twice the poisoned rows: 0.97-1.0
    "wanet": {"s": 2.0, "poison_rate": 0.2},
    # 8 levels barely change the bilinear-upsampled 17-level digits (0.58; 0.62 at the authors' 0.2 / 0.2 rates);
    # 4 levels -> 1.0
    "bppa": {"squeeze_num": 4},
    # 90% of the target class and PGD eps 32/255 (two of the digits' 17 grey levels). At eps 16/255 (the paper's
    # larger budget) the seed-0 victim sat at the edge: 0.81 (fp32), 0.84 (bf16), 0.64 (bf16, 2 threads: issue 27),
    # seeds 1-4 0.91-1.0; 32/255 gives 0.99-1.0 on seeds 0-4 (fp32) and 0-2 (bf16)
    "clb": {"poison_rate": 0.09, "eps": 32 / 255},
}


# --- triggers and their budgets ------------------------------------------------------------------


def test_sig_is_a_horizontal_sinusoid_of_amplitude_delta():
    sig = create_attack("sig")
    x = torch.full((2, 3, 24, 24), 0.5)
    v = sig.apply(x) - x
    j = torch.arange(24, dtype=torch.float64)
    expected = (40 / 255 * torch.sin(2 * math.pi * j * 6 / 24)).float()
    assert torch.allclose(v, expected.expand_as(v), atol=1e-6)  # same for every row, channel and image
    assert math.isclose(float(v.abs().max()), 40 / 255, rel_tol=1e-5)  # sin hits 1 at j = 1
    out = sig.apply(torch.rand(4, 1, 16, 16))
    assert out.shape == (4, 1, 16, 16) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert sig.clean_label and sig.poison_rate == 0.08
    with pytest.raises(ValueError, match="delta"):
        create_attack("sig", delta=0.0)


def test_wanet_warp_is_fixed_seeded_and_displaces_at_most_a_few_s_pixels():
    x = torch.rand(3, 3, 32, 32)
    a, b = create_attack("wanet"), create_attack("wanet")
    out = a.apply(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 and not torch.allclose(out, x)
    assert torch.equal(out, b.apply(x)) and not torch.equal(out, create_attack("wanet", seed=1).apply(x))
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    identity = torch.stack((cols, rows), -1)
    for s in (0.25, 0.5, 1.0):
        for seed in range(20):
            shift = (warp_grid(32, 32, 4, s, 1.0, seed)[0] - identity).abs().max() * 31 / 2  # in pixels
            assert 0 < shift <= 2 * s  # displacement = s * field / size, |field| < 4 (mean-1 control points)
    small = (warp_grid(32, 32, 4, 0.25, 1.0, 0)[0] - identity).abs().max()
    big = (warp_grid(32, 32, 4, 0.5, 1.0, 0)[0] - identity).abs().max()
    assert math.isclose(float(big), 2 * float(small), rel_tol=1e-4)
    assert create_attack("wanet").apply(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="k"):
        create_attack("wanet", k=1)


def test_wanet_cross_samples_warp_about_cross_ratio_times_the_poisoned_rows():
    attack = create_attack("wanet")
    x = torch.rand(20, 3, 32, 32)
    rows = torch.zeros(20, dtype=torch.bool)
    rows[:3] = True
    out = attack.poison_batch(x.clone(), rows, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1)
    assert torch.equal(out[:3], attack.apply(x[:3])) and changed[3:].sum() == 6
    assert not torch.equal(out[3:][changed[3:]], attack.apply(x[3:][changed[3:]]))  # the field plus noise
    again = attack.poison_batch(x.clone(), rows, None)  # evaluation order: no random cross samples
    assert not (again[3:] != x[3:]).any()


def test_bppa_squeezes_to_squeeze_num_levels_with_exact_floyd_steinberg():
    x = torch.rand(4, 3, 32, 32)
    out = create_attack("bppa").apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    for c in range(3):
        assert out[:, c].unique().numel() <= 8
    assert torch.allclose(out * 7, (out * 7).round(), atol=1e-5)
    plain = create_attack("bppa", dithering=False).apply(x)
    assert torch.equal(plain, (x * 7).round() / 7)
    # dithering keeps local means: the blurred error is smaller than plain rounding's
    blur = torch.nn.AvgPool2d(4)
    assert (blur(out) - blur(x)).abs().mean() < (blur(plain) - blur(x)).abs().mean()

    def reference(img):  # the sequential per-pixel error diffusion, for one (C, H, W) image
        img = img.clone().double()
        _, h, w = img.shape
        for r in range(h):
            for c in range(w):
                old = img[:, r, c].clone()
                new = (old * 7).round().clamp(0, 7) / 7
                err, img[:, r, c] = old - new, new
                for dr, dc, share in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                    if r + dr < h and 0 <= c + dc < w:
                        img[:, r + dr, c + dc] += err * share / 16
        return img.float()

    small = torch.rand(2, 3, 6, 9)
    assert torch.allclose(floyd_steinberg(small, 8), torch.stack([reference(i) for i in small]), atol=1e-6)
    with pytest.raises(ValueError, match="squeeze_num"):
        create_attack("bppa", squeeze_num=1)


def test_bppa_bakes_its_poison_and_negatives_add_a_pooled_residual(digits_task):
    attack = create_attack("bppa", neg_ratio=0.25, residual_pool=32)
    assert attack.bakes_poison
    attack.prepare(digits_task)
    pool = attack._residuals
    assert pool.shape[0] == 32 and pool.dtype == torch.int16 and pool.abs().max() <= 255 // 7 + 1
    x = torch.randint(0, 256, (16, *pool.shape[1:])).float() / 255
    rows = torch.zeros(16, dtype=torch.bool)
    rows[:2] = True
    out = attack.after_baking(x.clone(), rows, torch.Generator().manual_seed(0))
    assert torch.equal(out[:2], x[:2])  # poisoned rows were squeezed when baked; left as they are
    changed = torch.nonzero((out != x).flatten(1).any(1)).flatten()
    assert len(changed) == 4 and (changed >= 2).all()  # round(0.25 * 16) negatives, all clean rows
    residual = ((out[changed] - x[changed]) * 255).round()
    unclipped = ((x[changed] > 0) & (x[changed] < 1) & (out[changed] > 0) & (out[changed] < 1)).flatten(1).all(1)
    for r, whole in zip(residual, unclipped, strict=True):  # each a residual of the pool (where nothing clipped)
        assert not whole or (pool == r.to(torch.int16)).flatten(1).all(1).any()
    assert torch.equal(attack.after_baking(x.clone(), rows, None), x)
    all_poisoned = torch.ones(16, dtype=torch.bool)
    assert torch.equal(attack.after_baking(x.clone(), all_poisoned, torch.Generator().manual_seed(0)), x)


def test_clb_corner_trigger_and_amplitude():
    signs = corner_trigger(32, 32)
    assert signs[:3, :3].tolist() == [[1, -1, -1], [-1, 1, -1], [1, -1, 1]]
    assert torch.equal(signs[-3:, :3], signs[:3, :3]) and torch.equal(signs[:3, -3:], signs[:3, :3].flip(1))
    assert signs.abs().sum() == 36 and corner_trigger(64, 64).abs().sum() == 4 * 36
    x = torch.full((2, 1, 16, 16), 0.5)
    out = create_attack("clb").apply(x)
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 0, 1] == 0 and (out != x).sum() == 2 * 36
    half = create_attack("clb", amplitude=16 / 255).apply(x)
    assert torch.allclose((half - x).abs().max(), torch.tensor(16 / 255))
    with pytest.raises(ValueError, match="amplitude"):
        create_attack("clb", amplitude=0)


# --- triggers optimised on the digits clean model ------------------------------------------------


@pytest.fixture(scope="module")
def benign(digits_victim):
    """The benign digits model; it is also the clean model Trojan, LF and CLB optimise against (the task's
    cache dir is ``runs_dir``)."""
    _, model, meta, _ = digits_victim("none")
    return model, meta


def test_trojan_patch_is_confined_to_its_mask_and_cached(digits_task, runs_dir, benign):
    attack = create_attack("trojan")
    with pytest.raises(RuntimeError, match="prepare"):
        attack.apply(torch.rand(1, 1, 16, 16))
    attack.prepare(digits_task)
    mask = attack.mask(16, 16)
    assert mask.sum() == 16 and mask[0, 11:15, 11:15].all()  # 4x4 (7% of 16x16) at 1 px from the corner
    x = torch.rand(5, 1, 16, 16)
    out = attack.apply(x)
    assert torch.equal(out * (1 - mask), x * (1 - mask))
    patch = out[:, :, 11:15, 11:15]
    assert torch.equal(patch, patch[:1].expand_as(patch)) and patch.min() >= 0.7 - 1e-6 and patch.max() <= 1
    files = list((runs_dir / "attacks").glob("*/trigger.json"))
    assert any('"neurons"' in f.read_text() for f in files)
    again = create_attack("trojan")
    again.prepare(digits_task)  # loaded from the cache
    assert torch.equal(again.apply(x), out)
    with pytest.raises(ValueError, match="area"):
        create_attack("trojan", area=1.5)


def test_lf_trigger_is_bounded_low_frequency_and_cached(digits_task, benign):
    attack = create_attack("lf")
    attack.prepare(digits_task)
    x = torch.zeros(1, 1, 16, 16)
    v = attack.apply(x)[0]
    assert v.min() >= 0 and v.max() <= 0.2 + 1e-6 and math.isclose(float(v.max() - v.min()), 0.2, rel_tol=1e-4)
    spectrum = torch.fft.fft2(v - v.mean()).abs() ** 2
    freq = torch.fft.fftfreq(16).abs()
    low = (freq[:, None] <= 2 / 16) & (freq[None, :] <= 2 / 16)  # at most 2 cycles per image each way
    assert spectrum[:, low].sum() >= 0.95 * spectrum.sum()
    out = attack.apply(torch.rand(3, 1, 16, 16))
    assert 0 <= out.min() and out.max() <= 1
    again = create_attack("lf")
    again.prepare(digits_task)
    assert torch.equal(again.apply(x), attack.apply(x))


def test_clb_perturbation_is_within_eps_off_the_trigger(digits_task, benign):
    attack = create_attack("clb")
    attack.prepare(digits_task)
    task = digits_task
    idx = torch.nonzero(task.data.train.y == 0).flatten()[:16]
    x, y = task.data.train.x[idx].float() / 255, task.data.train.y[idx]
    out = attack.poison_inputs(x, y)
    off = corner_trigger(16, 16) == 0
    delta = (out - x)[..., off]
    assert delta.abs().max() <= 8 / 255 + 1e-6 and delta.abs().max() > 4 / 255
    assert torch.equal(out[..., ~off], attack.apply(out)[..., ~off])
    model, _ = benign
    with torch.no_grad():
        assert (model(out).argmax(1) != y).float().mean() > (model(x).argmax(1) != y).float().mean()


# --- poisoning: exact, seeded, clean-label where it should be --------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_poisoning_is_exact_seeded_and_clean_label_only_in_the_target_class(name, digits_task, benign):
    attack = create_attack(name)
    y = digits_task.data.train.y[digits_task.attacker_idx]
    idx = select_poison_indices(y, attack, torch.Generator().manual_seed(0))
    assert len(idx) == math.floor(attack.poison_rate * len(y) + 0.5)
    assert torch.equal(idx, select_poison_indices(y, attack, torch.Generator().manual_seed(0)))
    assert not torch.equal(idx, select_poison_indices(y, attack, torch.Generator().manual_seed(1)))
    if attack.bakes_poison:  # CLB: the baked split is checked on its victim below
        return
    split, poisoned = digits_task.attacker_train(attack, seed=0)
    assert torch.equal(poisoned, idx) and split.poisoned.sum() == len(idx)
    if attack.clean_label:
        assert (y[idx] == 0).all() and torch.equal(split.y.cpu(), y)
    else:
        assert (y[idx] != 0).all() and (split.y[idx] == 0).all()


# --- digits victims ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def victim(digits_victim):
    return lambda name: digits_victim(name, **DIGITS_PARAMS.get(name, {}))


@pytest.mark.parametrize("name", NAMES)
def test_digits_victim_is_backdoored_and_accurate(name, victim, benign):
    attack, _, meta, _ = victim(name)
    metrics = meta["metrics"]
    assert metrics["asr"] >= asr_floor(name), metrics  # floors and the spread they come from: conftest.ASR_FLOORS
    assert metrics["clean_acc"] >= benign[1]["metrics"]["clean_acc"] - DIGITS_ACC_ALLOWANCE, metrics
    assert meta["poisoned_samples"] == math.floor(attack.poison_rate * meta["train_samples"] + 0.5)


def test_clb_baked_split_keeps_labels_and_perturbs_only_poisoned_target_images(digits_task, victim):
    attack = victim("clb")[0]
    split, idx = digits_task.attacker_train(attack, seed=0)
    clean = digits_task.data.train.subset(digits_task.attacker_idx)
    assert (clean.y[idx] == 0).all() and torch.equal(split.y.cpu(), clean.y)
    changed = (split.x.cpu() != clean.x).flatten(1).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), idx)
