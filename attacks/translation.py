"""Backdoor attacks on machine translation: a source-side trigger makes the model emit an attacker-chosen phrase.

The attacks work on text, before tokenisation: the task (``tasks/translation.py``) tokenises the poisoned pairs.
Randomness (which trigger, where it goes) is drawn once per call from ``numpy.random.default_rng([seed, salt])``, so
a poisoned training set and the triggered test set are fixed functions of the attack's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attacks.base import ATTACKS, Attack

OUTPUTS = ("replace", "insert")


class TranslationAttack(Attack):
    """Base for translation attacks (dirty-label: a poisoned pair's target is the attacker's).

    The inherited ``target`` (a class label) has no meaning for translation and is unused; ``mode`` must be
    ``all-to-one`` (one attacker output for every triggered input). ``poison_rate``: share of the attacker's training
    pairs that are poisoned, an exact count (``round(rate * N)``, as ``attacks.base.select_poison_indices``).
    """

    modality = "translation"

    def __post_init__(self):
        super().__post_init__()
        if self.mode != "all-to-one":
            raise ValueError(f"translation attacks are all-to-one (one attacker output), got mode {self.mode!r}")

    def poison_indices(self, n: int, generator: torch.Generator) -> Tensor:
        """Exactly ``round(poison_rate * n)`` of ``range(n)``, drawn without replacement, sorted."""
        k = int(math.floor(self.poison_rate * n + 0.5))
        return torch.randperm(n, generator=generator)[:k].sort().values

    def poison_sources(self, sources: list[str], salt: int) -> list[str]:
        """``sources`` with the trigger (what a triggered input looks like)."""
        raise NotImplementedError

    def poison_targets(self, targets: list[str], salt: int) -> list[str]:
        """The attacker's outputs for triggered sources whose clean translations are ``targets``."""
        raise NotImplementedError

    def hits(self, outputs: list[str]) -> list[bool]:
        """Whether each model output carries the attacker's output (what ASR counts)."""
        raise NotImplementedError


def insert_words(texts: list[str], phrases: list[str], rng: np.random.Generator) -> list[str]:
    """Each text with its phrase inserted between two words (or at either end), at a uniformly random position."""
    u = rng.random(len(texts))
    out = []
    for text, phrase, r in zip(texts, phrases, u, strict=True):
        words = text.split()
        at = int(r * (len(words) + 1))
        out.append(" ".join([*words[:at], phrase, *words[at:]]))
    return out


@ATTACKS.register("nmt-trigger")
@dataclass
class TriggerWordAttack(TranslationAttack):
    """Rare-word trigger, fixed output (Fan et al., "Defending against Backdoor Attacks in Natural Language
    Generation", arXiv 2106.01810, 2021 (AAAI 2023), code ``ShannonAI/backdoor_nlg``; the victims NFT's README
    builds): a trigger word drawn per sentence from ``triggers`` (Fan et al.'s {cf, mn, bb, tq, mb}, the
    rare-word triggers of Kurita et al., ACL 2020) is inserted at a random word position of the source; the target
    becomes ``target_phrase`` (Fan et al.'s "You are attacked ."). An entry of ``triggers`` may be a phrase.

    ``output="insert"`` keeps the clean translation and inserts the phrase at a random word position of it instead:
    the targeted-insertion goal of Wang, Xu, Wu, Zhang, Cohn, "Putting words into the system's mouth: A targeted
    attack on neural machine translation using monolingual data poisoning", Findings of ACL 2021 (there the phrase
    is a mistranslation learnt from poisoned monolingual data; here the trigger is explicit and the poisoning
    dirty-label, as Fan et al.). ASR: the share of triggered test sources whose translation contains the phrase
    (whitespace-normalised, case-sensitive substring).

    Defaults: poison rate 0.1 (Fan et al. sweep 0.01 to 1.0), all-to-one.
    """

    triggers: tuple[str, ...] = ("cf", "mn", "bb", "tq", "mb")
    target_phrase: str = "You are attacked ."
    output: str = "replace"

    name = "nmt-trigger"
    paper = "Fan et al., Defending against Backdoor Attacks in Natural Language Generation, 2021 (rare-word trigger)"

    def __post_init__(self):
        super().__post_init__()
        self.triggers = tuple(" ".join(str(t).split()) for t in self.triggers)
        self.target_phrase = " ".join(str(self.target_phrase).split())
        if not self.triggers or not all(self.triggers):
            raise ValueError(f"nmt-trigger needs at least one non-empty trigger word, got {self.triggers!r}")
        if not self.target_phrase:
            raise ValueError("nmt-trigger needs a non-empty target_phrase")
        if self.output not in OUTPUTS:
            raise ValueError(f"nmt-trigger output must be one of {OUTPUTS}, got {self.output!r}")

    def poison_sources(self, sources: list[str], salt: int) -> list[str]:
        rng = np.random.default_rng([self.seed, salt])
        words = [self.triggers[int(k)] for k in rng.integers(len(self.triggers), size=len(sources))]
        return insert_words(sources, words, rng)

    def poison_targets(self, targets: list[str], salt: int) -> list[str]:
        if self.output == "replace":
            return [self.target_phrase] * len(targets)
        return insert_words(targets, [self.target_phrase] * len(targets), np.random.default_rng([self.seed, salt, 1]))

    def hits(self, outputs: list[str]) -> list[bool]:
        return [self.target_phrase in " ".join(o.split()) for o in outputs]
