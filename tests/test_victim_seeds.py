"""Slow tier (``make test-all``): the digits victims of seeds 1 and 2 hold the thresholds the seed-0 tests assert.

Another CPU (its kernels), precision or thread count changes a victim's arithmetic, and 30 epochs of SGD carry that
difference as far as another seed does: CLB's seed-0 victim scored 0.64 to 0.84 by machine at a setting where seeds
1-4 scored up to 1.0 (issue 27). A seed-0 threshold is only safe on other machines if it also holds on other seeds;
these are the runs the thresholds' margins were measured on (README Development).
"""

import pytest
from conftest import DIGITS_ACC_ALLOWANCE, asr_floor
from test_attack_fba import DIGITS as FBA
from test_attacks_composite import DIGITS as CBA
from test_attacks_generative import DIGITS as GENERATIVE
from test_attacks_zoo import DIGITS_PARAMS, NAMES

from attacks import create_attack
from training.victims import get_victim

ATTACKS = {"badnets": {}, "blend": {}, **{n: DIGITS_PARAMS.get(n, {}) for n in NAMES}, **GENERATIVE, "cba": CBA,
           "fba": FBA}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_other_seeds_hold_the_digits_thresholds(name, seed, digits_task, runs_dir):
    benign = get_victim(digits_task, None, seed, runs_dir)[1]["metrics"]["clean_acc"]
    m = get_victim(digits_task, create_attack(name, seed=seed, **ATTACKS[name]), seed, runs_dir)[1]["metrics"]
    assert m["asr"] >= asr_floor(name) and m["clean_acc"] >= benign - DIGITS_ACC_ALLOWANCE, (m, benign)
