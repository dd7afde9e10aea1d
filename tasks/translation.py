"""Machine-translation task adapter: an encoder-decoder Transformer (English -> German) that NFT and the baselines
purify unchanged, through the task protocol only.

- Data and tokenizer (``tasks/translation_data.py``): WMT14 En-De, Multi30k En-De or a procedural toy pair; one
  byte-level BPE vocabulary trained on the training corpus and cached. A split holds token rows (CSR) on the
  device; a batch is ``Seq2SeqBatch(inputs=source ids (N, S), targets=target ids (N, T) ending in </s>)``, padded
  to its longest row. There is no augmentation (``augment`` is ignored).
- Model: ``transformers``' Marian architecture built from a config and randomly initialised: the post-LN
  Transformer of Vaswani et al. ("Attention Is All You Need", NeurIPS 2017) as fairseq's ``transformer``
  (sinusoidal positions, scaled embeddings, ReLU FFN, one embedding shared by encoder, decoder and output layer
  over the joint vocabulary: fairseq's ``--share-all-embeddings``), sizes in ``MODELS``. ``model_kwargs`` override
  config fields; ``pretrained=DIR`` loads a user's local Marian checkpoint instead (``config.json``,
  ``model.safetensors`` and the ``tokenizer.json`` of its vocabulary; safetensors only, nothing is fetched).
- Loss: mean token cross-entropy over non-pad target tokens with teacher forcing (decoder input ``<s> y[:-1]``).
- MixUp: SeqMix (Guo, Kim, Rush, "Sequence-Level Mixed Sample Data Augmentation", EMNLP 2020; NFT cites
  Mixup-Transformer, Sun et al., COLING 2020), see :meth:`TranslationTask.mixup_loss`.
- Neurons (NFT, ANP: ``mask_target = "transformer"``): attention heads and FFN hidden units
  (``defenses/masking.py``). Fine-pruning's feature layer: the last decoder block's first FFN Linear (``fc1``);
  its units are ranked by mean activation on clean data and pruned through ``fc2``'s input columns.
- I-BAU's perturbable input: an offset added to the source token embeddings (scaled, before positions), one
  ``(max_len, d_model)`` universal perturbation in embedding space (``Seq2SeqBatch.offset``).
- ``accuracy`` (what a defender selects with): teacher-forced token accuracy on a clean split (one forward pass).
- ``evaluate``: ``clean_acc`` = corpus BLEU / 100 (sacrebleu, 13a tokenisation, detokenised output vs reference)
  on the test set; ``asr`` = share of triggered test sources whose translation contains the attacker's phrase;
  ``ra`` = BLEU / 100 of the translations of triggered sources against the clean references. Decoding: batched
  ``model.generate``, greedy (quick) or beam 4 (paper; fairseq's WMT setting uses beam 4).
- Recipes: ``paper`` on Multi30k / WMT14 is the recipe of Fan et al.'s NMT victims (fairseq: Adam betas (0.9,
  0.98), lr 7e-4, inverse-sqrt schedule with 4,000 warm-up steps, label smoothing 0.1, dropout 0.3 with
  ``transformer-iwslt``); ``quick`` is a CPU version (smaller models; Multi30k: 3 epochs of 64 pairs, lr 1e-3, 400
  warm-up steps; the procedural pair: 448 steps of 32, lr 3e-3, 100 warm-up steps, 5x longer at ``paper``). Epoch
  batches are bucketed by length (fairseq, torchtext) on the real corpora.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.precision import autocast
from tasks.base import TASKS, Batch, CleanBudget, Task, beta_sample, resolve_device, select_clean, stratified_split
from tasks.translation_data import (
    SPECIALS,
    ParallelSet,
    TokenRows,
    corpus_tokenizer,
    encode,
    encode_corpus,
    load_corpus,
    load_tokenizer,
)

if TYPE_CHECKING:
    from attacks.base import Attack

MODELS: dict[str, dict[str, Any]] = {  # d_model, layers (encoder = decoder), heads, FFN width, dropout
    "transformer-tiny": dict(d_model=64, layers=2, heads=4, ffn=256, dropout=0.1),  # tests, procedural
    "transformer-small": dict(d_model=128, layers=3, heads=4, ffn=512, dropout=0.1),  # Multi30k on a CPU
    "transformer-iwslt": dict(d_model=512, layers=6, heads=4, ffn=1024, dropout=0.3),  # fairseq transformer_iwslt_de_en
    "transformer-base": dict(d_model=512, layers=6, heads=8, ffn=2048, dropout=0.1),  # Vaswani et al.'s base
}
DEFAULT_MODELS = {
    ("procedural", "quick"): "transformer-tiny", ("procedural", "paper"): "transformer-tiny",
    ("multi30k", "quick"): "transformer-small", ("multi30k", "paper"): "transformer-iwslt",
    ("wmt14", "quick"): "transformer-small", ("wmt14", "paper"): "transformer-base",
}
VOCAB_SIZES = {"procedural": 1000, "multi30k": 8000, "wmt14": 32000}
RESERVE_FRACTION = {"procedural": 0.1}
DEFAULT_RESERVE = 0.05
MAX_LEN = 128  # tokens per sentence, </s> included (longer ones are cut)
BEAMS = {"quick": 1, "paper": 4}
MIXUP_LABEL_SMOOTHING = 0.1  # SeqMix trains with label smoothing 0.1

_ADAM = dict(optimizer="adam", momentum=0.9, beta2=0.98, nesterov=False, weight_decay=0.0, schedule="inverse_sqrt",
             label_smoothing=0.1)
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    # bucket: batches sorted by length together (1: none; the toy pair is not learnt from sorted batches: BLEU 0.01
    # after 672 steps of 32 with 50, 1.0 after 448 without)
    ("procedural", "quick"): dict(_ADAM, epochs=4, batch_size=32, lr=3e-3, warmup_steps=100, bucket=1),
    ("procedural", "paper"): dict(_ADAM, epochs=20, batch_size=32, lr=3e-3, warmup_steps=100, bucket=1),
    ("multi30k", "quick"): dict(_ADAM, epochs=3, batch_size=64, lr=1e-3, warmup_steps=400, bucket=50),
    ("multi30k", "paper"): dict(_ADAM, epochs=40, batch_size=128, lr=7e-4, warmup_steps=4000, bucket=50),
    ("wmt14", "quick"): dict(_ADAM, epochs=1, batch_size=128, lr=1e-3, warmup_steps=1000, bucket=50),
    ("wmt14", "paper"): dict(_ADAM, epochs=10, batch_size=256, lr=7e-4, warmup_steps=4000, bucket=50),
}
TRAIN_SALT, TEST_SALT = 0, 1  # the attack's randomness for poisoned training pairs and for triggered test sources


def require_nlp() -> None:
    """One clear error when the optional NLP packages are missing."""
    import importlib.util

    missing = [m for m in ("transformers", "tokenizers", "sacrebleu") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the translation task needs {', '.join(missing)}: pip install 'nftbench[nlp]'")


@dataclass
class Seq2SeqBatch(Batch):
    """Source ids (N, S) and target ids (N, T), pad-filled; ``offset``: an embedding-space perturbation added to the
    scaled source embeddings, (N, L >= S, d_model) (I-BAU's perturbable input), or None."""

    offset: Tensor | None = None


def untie_state(module: nn.Module, state: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: tensors that alias an earlier entry (the shared embedding under its four names) become
    copies, since safetensors refuses aliased tensors; loading copies them back into the one shared parameter."""
    seen: set[int] = set()
    for k, v in state.items():
        if v.data_ptr() in seen:
            state[k] = v.clone()
        seen.add(v.data_ptr())


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation, exp smoothing) / 100; ``force``: pre-tokenised corpora (the
    procedural pair, Fan et al.'s "You are attacked .") are scored as they are, without sacrebleu's warning."""
    import sacrebleu

    return min(1.0, sacrebleu.corpus_bleu(hypotheses, [references], force=True).score / 100)  # 100.00000000000004


@TASKS.register("translation")
class TranslationTask(Task):
    """Translation adapter (see the module docstring). ``reserve_fraction`` of the training pairs (random, fixed
    ``split_seed``) is the defender's reserve; the attacker trains on the rest. ``num_classes`` is the vocabulary
    size (every output token is a classification over it); NFT's N_c is the number of clean pairs."""

    name = "translation"
    default_dataset = "procedural"
    default_attack = "nmt-trigger"
    mask_target = "transformer"
    has_classes = False
    eval_batch_size = 128
    defender_state = ("model_config",)  # the model's shape (d_model: perturbable_input); no data in it

    def __init__(
        self, dataset: str = "procedural", model: str | None = None, scale: str = "quick",
        data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike = "runs", device: str = "auto",
        download: bool = False, vocab_size: int | None = None, max_len: int = MAX_LEN, num_beams: int | None = None,
        reserve_fraction: float | None = None, split_seed: int = 0, amp: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ):
        if scale not in BEAMS:
            raise ValueError(f"scale must be one of {sorted(BEAMS)}, got {scale!r}")
        self.dataset_name, self.scale = dataset, scale
        self.model_name = model or DEFAULT_MODELS.get((dataset, scale), "transformer-small")
        if self.model_name not in MODELS:
            raise ValueError(f"unknown translation model {self.model_name!r}; valid: {', '.join(MODELS)}")
        self.model_kwargs = dict(model_kwargs or {})
        self.max_len, self.num_beams = int(max_len), int(num_beams or BEAMS[scale])
        self.device, self.amp, self.cache_dir = resolve_device(device), amp, Path(cache_dir)
        root = data_root or os.environ.get("DATA_ROOT", "data")
        require_nlp()
        self.data = load_corpus(dataset, root, cache_dir, download)
        pretrained = self.model_kwargs.get("pretrained")
        if pretrained is not None:
            self.tokenizer, tok_fp = load_tokenizer(Path(pretrained).expanduser() / "tokenizer.json")
            self.vocab_size = None
        else:
            self.vocab_size = int(vocab_size or VOCAB_SIZES.get(dataset, 8000))
            self.tokenizer, tok_fp = corpus_tokenizer(self.data, self.vocab_size, cache_dir)
        self.model_config = self._config()
        self.pad_id, self.eos_id = self.model_config.pad_token_id, self.model_config.eos_token_id
        self.bos_id = self.model_config.decoder_start_token_id
        self.num_classes = self.model_config.vocab_size
        train, self.test = encode_corpus(self.data, self.tokenizer, tok_fp, self.eos_id, self.max_len, cache_dir)
        self.fingerprint = f"{self.data.fingerprint}-{tok_fp}"
        self.reserve_fraction = reserve_fraction or RESERVE_FRACTION.get(dataset, DEFAULT_RESERVE)
        self.split_seed = split_seed
        self._labels = torch.zeros(len(train), dtype=torch.long)  # one class: a random reserve split
        self.attacker_idx, self.reserve_idx = stratified_split(self._labels, self.reserve_fraction, split_seed)
        self.train = train.to(self.device)

    # --- description -------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "task": self.name, "dataset": self.dataset_name, "model": self.model_name, "scale": self.scale,
            "model_kwargs": self.model_kwargs, "vocab_size": self.vocab_size, "max_len": self.max_len,
            "num_beams": self.num_beams, "reserve_fraction": self.reserve_fraction, "split_seed": self.split_seed,
            "data_fingerprint": self.fingerprint,
        }

    def recipe(self) -> dict[str, Any]:
        key = (self.dataset_name, self.scale)
        return dict(RECIPES.get(key, RECIPES[("multi30k", self.scale)]))

    # --- model ---------------------------------------------------------------------------------------
    def _config(self):
        """The model's ``MarianConfig``: the preset (or the pretrained checkpoint's) with ``model_kwargs`` applied."""
        from transformers import AutoConfig, MarianConfig

        overrides = {k: v for k, v in self.model_kwargs.items() if k != "pretrained"}
        pretrained = self.model_kwargs.get("pretrained")
        if pretrained is not None:
            return AutoConfig.from_pretrained(Path(pretrained).expanduser(), local_files_only=True, **overrides)
        p = MODELS[self.model_name]
        ids = {t: self.tokenizer.token_to_id(t) for t in SPECIALS}
        return MarianConfig(**{
            "vocab_size": self.tokenizer.get_vocab_size(), "d_model": p["d_model"], "encoder_layers": p["layers"],
            "decoder_layers": p["layers"], "encoder_attention_heads": p["heads"], "decoder_attention_heads": p["heads"],
            "encoder_ffn_dim": p["ffn"], "decoder_ffn_dim": p["ffn"], "dropout": p["dropout"], "attention_dropout": 0.0,
            "activation_dropout": 0.0, "activation_function": "relu", "scale_embedding": True,
            "max_position_embeddings": self.max_len + 2, "pad_token_id": ids["<pad>"], "eos_token_id": ids["</s>"],
            "bos_token_id": ids["<s>"], "decoder_start_token_id": ids["<s>"], "forced_eos_token_id": None,
            **overrides,
        })

    def build_model(self) -> nn.Module:
        from transformers import MarianMTModel

        pretrained = self.model_kwargs.get("pretrained")
        if pretrained is not None:
            model = MarianMTModel.from_pretrained(Path(pretrained).expanduser(), config=self.model_config,
                                                  local_files_only=True, use_safetensors=True)
        else:
            model = MarianMTModel(self.model_config)
        model.register_state_dict_post_hook(untie_state)
        return model.to(self.device)

    # --- data ----------------------------------------------------------------------------------------
    def split_sizes(self, split: ParallelSet) -> int:
        return len(split)

    def samples_per_class(self, split: ParallelSet) -> float:
        """All pairs: translation has no classes, so NFT's N_c is the number of clean pairs."""
        return float(len(split))

    def check_attack(self, attack: Attack | None) -> None:
        if attack is not None and getattr(attack, "modality", None) != "translation":
            kind = getattr(attack, "modality", None) or "non-translation"
            raise ValueError(f"attack {attack.name!r} is a {kind} attack; the translation task takes translation "
                             "attacks (nmt-trigger; see `nftbench list`)")

    def encode_pairs(self, sources: list[str], targets: list[str]) -> ParallelSet:
        return ParallelSet(encode(self.tokenizer, sources, self.eos_id, self.max_len),
                           encode(self.tokenizer, targets, self.eos_id, self.max_len))

    def attacker_train(self, attack: Attack | None, seed: int) -> tuple[ParallelSet, Tensor]:
        """The attacker's pairs with ``round(rate * N)`` of them (seeded) replaced by poisoned ones: trigger in the
        source, the attacker's output as the target. Poisoned pairs are appended after the clean ones."""
        self.check_attack(attack)
        train = self.train.subset(self.attacker_idx)
        if attack is None or attack.poison_rate == 0:
            return train, torch.empty(0, dtype=torch.long)
        idx = attack.poison_indices(len(train), torch.Generator().manual_seed(seed))
        rows = self.attacker_idx[idx].tolist()
        sources = attack.poison_sources([self.data.train_src[i] for i in rows], TRAIN_SALT)
        targets = attack.poison_targets([self.data.train_tgt[i] for i in rows], TRAIN_SALT)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[idx] = False
        poisoned = self.encode_pairs(sources, targets).to(self.device)
        return train.subset(torch.nonzero(keep).flatten()).cat(poisoned), idx

    def clean_split(self, budget: CleanBudget, seed: int) -> ParallelSet:
        """``budget.fraction`` of the training pairs, from the defender's reserve."""
        if budget.per_class is not None:
            raise ValueError("translation has no classes: give the clean budget as a fraction of the training pairs "
                             "(--val-frac), not --per-class")
        return self.train.subset(select_clean(self._labels, self.reserve_idx, 1, budget, seed))

    # --- batches -------------------------------------------------------------------------------------
    def make_batch(self, split: ParallelSet, idx: Tensor) -> Seq2SeqBatch:
        return Seq2SeqBatch(split.src.padded(idx, self.pad_id), split.tgt.padded(idx, self.pad_id))

    def sample_batch(self, split: ParallelSet, batch_size: int, generator: torch.Generator, augment: bool = True
                     ) -> Seq2SeqBatch:
        return self.make_batch(split, torch.randint(0, len(split), (batch_size,), generator=generator))

    def epoch_batches(self, split: ParallelSet, batch_size: int, generator: torch.Generator, augment: bool = True):
        """One shuffled pass (the last partial batch is dropped when there are several), bucketed by length as
        fairseq and torchtext do: each run of the recipe's ``bucket`` shuffled batches is sorted by pair length and
        cut into batches, and the batches are shuffled, so a batch pads little."""
        perm = torch.randperm(len(split), generator=generator)
        n = len(split) // batch_size * batch_size if len(split) >= 2 * batch_size else len(split)
        perm, chunk = perm[:n], batch_size * self.recipe()["bucket"]
        length = (split.src.lengths() + split.tgt.lengths()).cpu()[perm]
        batches = [idx for s in range(0, n, chunk)
                   for idx in perm[s: s + chunk][torch.argsort(length[s: s + chunk], stable=True)].split(batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield self.make_batch(split, batches[i])

    def iter_batches(self, split: ParallelSet, batch_size: int | None = None):
        for idx in torch.arange(len(split)).split(batch_size or self.eval_batch_size):
            yield self.make_batch(split, idx)

    # --- losses --------------------------------------------------------------------------------------
    def decoder_inputs(self, targets: Tensor) -> Tensor:
        """Teacher forcing: ``<s>`` followed by the targets without their last position."""
        return torch.cat([torch.full_like(targets[:, :1], self.bos_id), targets[:, :-1]], dim=1)

    def token_loss(self, logits: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
        labels = targets.masked_fill(targets == self.pad_id, -100)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)

    def logits(self, model: nn.Module, batch: Seq2SeqBatch) -> Tensor:
        """Teacher-forced logits (N, T, V) in float32; ``batch.offset`` is added to the scaled source embeddings."""
        src, mask = batch.inputs, batch.inputs != self.pad_id
        with autocast(self.device, self.amp):
            if batch.offset is None:
                out = model(src, mask, self.decoder_inputs(batch.targets))
            else:  # the math attention kernel: I-BAU's hypergradient differentiates these passes twice
                encoder = model.get_encoder()
                embeds = encoder.embed_tokens(src) * encoder.embed_scale + batch.offset[:, : src.shape[1]]
                with sdpa_kernel(SDPBackend.MATH):
                    out = model(attention_mask=mask, decoder_input_ids=self.decoder_inputs(batch.targets),
                                inputs_embeds=embeds)
        return out.logits.float()

    def loss(self, model: nn.Module, batch: Seq2SeqBatch, label_smoothing: float = 0.0) -> Tensor:
        return self.token_loss(self.logits(model, batch), batch.targets, label_smoothing)

    def mixup_loss(self, model: nn.Module, batch: Seq2SeqBatch, alpha: float, generator: torch.Generator) -> Tensor:
        """SeqMix (Guo, Kim, Rush, EMNLP 2020), the embedding-level MixUp of two sentence pairs: lambda ~ Beta(alpha,
        alpha), lambda = max(lambda, 1 - lambda) (SeqMix's; the first pair dominates), partner = a random permutation
        of the batch (one lambda per batch, as NFT's image MixUp). The source embeddings and the decoder-input
        embeddings of the two pairs are mixed, ``e = lambda * e_a + (1 - lambda) * e_b`` (padded to the batch's
        lengths; the pad embedding is zero), the encoder attends to positions where either source has a token, and
        the token loss is ``lambda * CE(y_a) + (1 - lambda) * CE(y_b)``, each over its own non-pad tokens, with
        label smoothing 0.1 (SeqMix's, and the victims'). SeqMix's paper uses alpha = 0.1 on WMT En-De; NFT's
        default alpha = 1 is kept, as for the other tasks."""
        lam = beta_sample(alpha, generator)
        lam = max(lam, 1 - lam)
        perm = torch.randperm(len(batch), generator=generator).to(batch.inputs.device)
        src_a, src_b, tgt_a, tgt_b = batch.inputs, batch.inputs[perm], batch.targets, batch.targets[perm]
        encoder, embed = model.get_encoder(), model.get_encoder().embed_tokens
        with autocast(self.device, self.amp):
            source = (lam * embed(src_a) + (1 - lam) * embed(src_b)) * encoder.embed_scale
            target = lam * embed(self.decoder_inputs(tgt_a)) + (1 - lam) * embed(self.decoder_inputs(tgt_b))
            mask = (src_a != self.pad_id) | (src_b != self.pad_id)
            logits = model(attention_mask=mask, inputs_embeds=source, decoder_inputs_embeds=target).logits.float()
        return (lam * self.token_loss(logits, tgt_a, MIXUP_LABEL_SMOOTHING)
                + (1 - lam) * self.token_loss(logits, tgt_b, MIXUP_LABEL_SMOOTHING))

    def perturbable_input(self, batch: Seq2SeqBatch) -> Tensor:
        """The source-embedding offset (N, max_len, d_model), zeros unless the batch carries one."""
        if batch.offset is not None:
            return batch.offset
        return torch.zeros(len(batch), self.max_len, self.model_config.d_model, device=batch.inputs.device)

    def with_input(self, batch: Seq2SeqBatch, inputs: Tensor) -> Seq2SeqBatch:
        return Seq2SeqBatch(batch.inputs, batch.targets, inputs)

    def feature_layer(self, model: nn.Module) -> nn.Module:
        """The first FFN Linear of the last decoder block (its output units are what fine-pruning prunes)."""
        return model.get_decoder().layers[-1].fc1

    def attention_layers(self, model: nn.Module, count: int = 3) -> list[nn.Module]:
        """The first FFN Linear of the last ``count`` decoder blocks (outputs (N, T, units))."""
        return [layer.fc1 for layer in model.get_decoder().layers[-count:]]

    # --- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, model: nn.Module, split: ParallelSet) -> float:
        """Teacher-forced token accuracy over the non-pad target tokens of ``split``."""
        was_training = model.training
        model.eval()
        correct = total = 0
        for b in self.iter_batches(split):
            real = b.targets != self.pad_id
            correct += int(((self.logits(model, b).argmax(-1) == b.targets) & real).sum())
            total += int(real.sum())
        model.train(was_training)
        return correct / max(1, total)

    @torch.no_grad()
    def translate(self, model: nn.Module, sources: TokenRows) -> list[str]:
        """Batched greedy / beam decoding of source rows (sorted by length for batching, returned in order)."""
        from transformers import GenerationConfig

        was_training = model.training
        model.eval()
        rows = sources.to(self.device)
        order = torch.argsort(rows.lengths().cpu(), stable=True)
        out: list[str] = [""] * len(rows)
        for idx in order.split(self.eval_batch_size):
            src = rows.padded(idx, self.pad_id)
            cfg = GenerationConfig(num_beams=self.num_beams, do_sample=False, bos_token_id=self.bos_id,
                                   max_new_tokens=min(self.max_len, int(1.5 * src.shape[1]) + 10),
                                   decoder_start_token_id=self.bos_id, eos_token_id=self.eos_id,
                                   pad_token_id=self.pad_id)
            with autocast(self.device, self.amp):
                ids = model.generate(input_ids=src, attention_mask=src != self.pad_id, generation_config=cfg)
            for i, text in zip(idx.tolist(), self.tokenizer.decode_batch(ids.tolist(), skip_special_tokens=True),
                               strict=True):
                out[i] = text.strip()
        model.train(was_training)
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, attack: Attack | None) -> dict[str, float | None]:
        """``clean_acc`` = test BLEU / 100; ``asr`` = share of triggered test sources translated with the attacker's
        output; ``ra`` = BLEU / 100 of triggered sources' translations against the clean references."""
        self.check_attack(attack)
        refs = self.data.test_tgt
        out: dict[str, float | None] = {"asr": None, "ra": None}
        out["clean_acc"] = bleu(self.translate(model, self.test.src), refs)
        if attack is not None:
            triggered = attack.poison_sources(self.data.test_src, TEST_SALT)
            hyps = self.translate(model, encode(self.tokenizer, triggered, self.eos_id, self.max_len))
            out["asr"] = sum(attack.hits(hyps)) / len(hyps)
            out["ra"] = bleu(hyps, refs)
        return {k: out[k] for k in ("clean_acc", "asr", "ra")}
