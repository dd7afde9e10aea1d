"""Parallel corpora for the translation task (English source, German target), and the BPE tokenizer trained on them.

Every corpus becomes line-aligned UTF-8 text (one sentence a line, whitespace collapsed to single spaces), cached
under ``<cache_dir>/datasets/translation-<name>-<key>/{train,test}.{src,tgt}`` (``tasks.data_cache``) with a
``meta.json`` fingerprint. Nothing is downloaded unless the caller passes ``download=True``.

- ``wmt14`` (Bojar et al., "Findings of the 2014 Workshop on Statistical Machine Translation", WMT 2014): En-De,
  4.5M training pairs, test newstest2014 (3,003 pairs), read with Hugging Face ``datasets`` (imported lazily) from
  a local copy in ``datasets``' own layouts: a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``) under
  ``<data_root>/wmt14/de-en`` (or ``wmt14``, ``wmt14-de-en``), or the hub repository ``wmt/wmt14``'s parquet files
  (``de-en/{train,validation,test}-*.parquet``, rows ``{"translation": {"de": ..., "en": ...}}``) there or in a
  Hugging Face hub cache (``<data_root>/huggingface/hub``, ``$HF_HUB_CACHE``, ``~/.cache/huggingface/hub``). With
  ``download=True`` the parquet files are fetched into ``<data_root>/huggingface/hub`` (``snapshot_download``).
- ``multi30k`` (Elliott, Frank, Sima'an, Specia, "Multi30K: Multilingual English-German Image Descriptions", VL
  2016): task 1, train 29,000 / test_2016_flickr 1,000 pairs, the layout ``multi30k/{train,val,test_2016_flickr}.
  {en,de}.gz`` (gzip text, or the same names without ``.gz``), line-aligned. The CPU-scale benchmark.
- ``procedural`` (the embedded default; no files): a toy language pair. English sentences ``NP VERB NP [PREP NP] .``
  from a fixed lexicon (NP = determiner, optional adjective, noun) map to a pseudo-German whose words are generated
  from syllables; the translation is word by word except that an adjective follows its noun and the determiner
  agrees with the noun's gender (three genders), so it needs alignment and agreement, and copying the source
  scores a BLEU near 0. 4,000 training and 200 test pairs, deterministic from a fixed seed.

Tokenizer (``corpus_tokenizer``): one byte-level BPE vocabulary for both languages (Sennrich, Haddow, Birch,
"Neural Machine Translation of Rare Words with Subword Units", ACL 2016; byte-level as GPT-2, so any string, e.g.
an attacker's phrase, encodes without unknown tokens), trained with ``tokenizers`` on the training corpus (source
and target; at most the first ``TOKENIZER_PAIRS`` pairs), special tokens ``<pad> <s> </s> <unk>`` = ids 0-3, and
cached as ``tokenizer.json`` under ``<cache_dir>/tokenizers/``. Token ids are cached as ``.npy`` per tokenizer.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.base import Registry
from tasks.data_cache import dataset_cache


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing; the message says where it was looked for and how to get it."""


SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
TOKENIZER_PAIRS = 1_000_000
PARTS = ("train.src", "train.tgt", "test.src", "test.tgt")


@dataclass
class TokenRows:
    """Variable-length token sequences as one flat id array and row offsets (CSR), on CPU or a device."""

    flat: Tensor  # (total,) int32
    offsets: Tensor  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def subset(self, idx: Tensor) -> TokenRows:
        idx = idx.to(self.offsets.device)
        start, length = self.offsets[idx], self.lengths()[idx]
        offsets = torch.cat([length.new_zeros(1), length.cumsum(0)])
        within = torch.arange(int(offsets[-1]), device=idx.device) - offsets[:-1].repeat_interleave(length)
        return TokenRows(self.flat[start.repeat_interleave(length) + within], offsets)

    def cat(self, other: TokenRows) -> TokenRows:
        return TokenRows(torch.cat([self.flat, other.flat.to(self.flat.device)]),
                         torch.cat([self.offsets, other.offsets[1:].to(self.offsets.device) + self.offsets[-1]]))

    def padded(self, idx: Tensor, pad_id: int) -> Tensor:
        """Rows ``idx`` as int64 (n, L), right-padded with ``pad_id`` to the longest of them."""
        idx = idx.to(self.offsets.device)
        start, length = self.offsets[idx], self.lengths()[idx]
        cols = torch.arange(int(length.max()) if len(idx) else 0, device=idx.device)
        pos = (start[:, None] + cols[None]).clamp_(max=max(len(self.flat) - 1, 0))
        return torch.where(cols[None] < length[:, None], self.flat[pos].long(), pad_id)

    def to(self, device: torch.device) -> TokenRows:
        return TokenRows(self.flat.to(device), self.offsets.to(device))

    @classmethod
    def from_ids(cls, ids: Sequence[Sequence[int]]) -> TokenRows:
        lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for r in ids for t in r), dtype=np.int32, count=int(lengths.sum()))
        return cls(torch.from_numpy(flat), torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])))


@dataclass
class ParallelSet:
    """Source and target token rows of the same pairs (targets end in ``</s>``)."""

    src: TokenRows
    tgt: TokenRows

    def __len__(self) -> int:
        return len(self.src)

    def subset(self, idx: Tensor) -> ParallelSet:
        return ParallelSet(self.src.subset(idx), self.tgt.subset(idx))

    def cat(self, other: ParallelSet) -> ParallelSet:
        return ParallelSet(self.src.cat(other.src), self.tgt.cat(other.tgt))

    def to(self, device: torch.device) -> ParallelSet:
        return ParallelSet(self.src.to(device), self.tgt.to(device))


@dataclass
class ParallelCorpus:
    name: str
    train_src: list[str]
    train_tgt: list[str]
    test_src: list[str]
    test_tgt: list[str]
    fingerprint: str
    source: str


Loader = Callable[[Path, bool, Path], tuple[dict[str, list[str]], str]]
TRANSLATION_DATASETS: Registry[Loader] = Registry("translation dataset")


def clean_line(s: str) -> str:
    """One line of text: every run of whitespace (line breaks included) becomes one space."""
    return " ".join(s.split())


def load_corpus(name: str, root: str | os.PathLike, cache_dir: str | os.PathLike, download: bool = False
                ) -> ParallelCorpus:
    """Load corpus ``name`` (read once into the text cache under ``cache_dir``)."""
    loader = TRANSLATION_DATASETS.get(name)

    def build(tmp: Path) -> None:
        parts, source = loader(Path(root).expanduser(), download, tmp)
        digest = hashlib.sha256()
        for k in PARTS:
            text = "\n".join(clean_line(s) for s in parts[k])
            (tmp / k).write_text(text, encoding="utf-8")
            digest.update(k.encode() + text.encode())
        sizes = {k: len(parts[k]) for k in PARTS}
        meta = {"fingerprint": digest.hexdigest()[:16], "source": source, "sizes": sizes}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    def load(cache: Path) -> ParallelCorpus:
        meta = json.loads((cache / "meta.json").read_text())
        text = {k: (cache / k).read_text(encoding="utf-8").split("\n") for k in PARTS}
        return ParallelCorpus(name, text["train.src"], text["train.tgt"], text["test.src"], text["test.tgt"],
                              meta["fingerprint"], meta["source"])

    return dataset_cache(cache_dir, f"translation-{name}", root, build, load)


def _aligned(src: list[str], tgt: list[str], where: str) -> None:
    if len(src) != len(tgt) or not src:
        raise ValueError(f"{where}: source and target must be non-empty and line-aligned, got {len(src)} and "
                         f"{len(tgt)} lines; re-extract the corpus")


# --------------------------------------------------------------------------------------------- tokenizer
def corpus_tokenizer(corpus: ParallelCorpus, vocab_size: int, cache_dir: str | os.PathLike):
    """The corpus's byte-level BPE tokenizer (trained once, cached as ``tokenizer.json``) and its fingerprint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(cache_dir) / "tokenizers" / f"{corpus.name}-{corpus.fingerprint}-bpe{vocab_size}"
    path = folder / "tokenizer.json"
    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        n = min(len(corpus.train_src), TOKENIZER_PAIRS)
        tok.train_from_iterator(corpus.train_src[:n] + corpus.train_tgt[:n], trainer)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"tokenizer.json.tmp{os.getpid()}"
        tok.save(str(tmp))
        os.replace(tmp, path)
    return load_tokenizer(path)


def load_tokenizer(path: Path):
    """A ``tokenizers`` tokenizer from its JSON file, and the file's fingerprint."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DatasetNotFoundError(f"tokenizer {path} not found; a pretrained model folder needs its tokenizer.json "
                                   "(a `tokenizers` tokenizer) next to config.json and model.safetensors")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for a malformed file)
        raise ValueError(f"tokenizer {path} is not a `tokenizers` tokenizer file ({e}); copy the checkpoint's "
                         "tokenizer.json again") from None
    return tokenizer, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def encode(tokenizer, texts: list[str], eos_id: int, max_len: int) -> TokenRows:
    """Token ids of ``texts`` (no special tokens), cut to ``max_len - 1``, each followed by ``</s>``."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return TokenRows.from_ids([e.ids[: max_len - 1] + [eos_id] for e in encodings])


def encode_corpus(corpus: ParallelCorpus, tokenizer, tokenizer_fingerprint: str, eos_id: int, max_len: int,
                  cache_dir: str | os.PathLike) -> tuple[ParallelSet, ParallelSet]:
    """Train and test sets as token rows (cached as ``.npy`` per corpus, tokenizer and ``max_len``)."""
    folder = (Path(cache_dir) / "tokens" /
              f"translation-{corpus.name}-{corpus.fingerprint}-{tokenizer_fingerprint}-L{max_len}")
    texts = dict(zip(PARTS, (corpus.train_src, corpus.train_tgt, corpus.test_src, corpus.test_tgt), strict=True))
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for k, t in texts.items():
            rows = encode(tokenizer, t, eos_id, max_len)
            np.save(folder / f"{k}.flat.npy", rows.flat.numpy(), allow_pickle=False)
            np.save(folder / f"{k}.offsets.npy", rows.offsets.numpy(), allow_pickle=False)
        (folder / "done").write_text("")
    rows = {k: TokenRows(*(torch.from_numpy(np.load(folder / f"{k}.{a}.npy", allow_pickle=False))
                           for a in ("flat", "offsets"))) for k in PARTS}
    return ParallelSet(rows["train.src"], rows["train.tgt"]), ParallelSet(rows["test.src"], rows["test.tgt"])


# --------------------------------------------------------------------------------------------- WMT14
WMT14_REPO, WMT14_CONFIG = "wmt/wmt14", "de-en"


def _hub_snapshots(root: Path) -> list[Path]:
    """``de-en`` folders of the hub repository's snapshots in the data root's or the user's Hugging Face cache."""
    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    hubs = [root / "huggingface" / "hub", Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser()]
    repo = "datasets--" + WMT14_REPO.replace("/", "--")
    return [d for h in hubs for d in sorted((h / repo / "snapshots").glob(f"*/{WMT14_CONFIG}"))]


@TRANSLATION_DATASETS.register("wmt14")
def load_wmt14(root: Path, download: bool, scratch: Path):
    """WMT14 En-De (train / newstest2014) from a local ``datasets`` copy or the hub cache (module docstring)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading WMT14 needs Hugging Face datasets: pip install 'nftbench[nlp]'") from e
    candidates = [root / "wmt14" / WMT14_CONFIG, root / "wmt14", root / "wmt14-de-en", *_hub_snapshots(root)]
    saved = next((d for d in candidates if (d / "dataset_dict.json").is_file()), None)
    parquet = next((d for d in candidates if d.is_dir() and any(d.glob("train-*.parquet"))), None)
    if saved is None and parquet is None and download:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(WMT14_REPO, repo_type="dataset", allow_patterns=[f"{WMT14_CONFIG}/*"],
                                     cache_dir=str(root / "huggingface" / "hub"))
        parquet = Path(snapshot) / WMT14_CONFIG
    if saved is not None:
        dd, source = datasets.load_from_disk(str(saved)), str(saved)
    elif parquet is not None:
        files = {s: sorted(str(f) for f in parquet.glob(f"{s}-*.parquet")) for s in ("train", "test")}
        if not all(files.values()):
            raise DatasetNotFoundError(f"WMT14 at {parquet} lacks train-*.parquet or test-*.parquet files")
        dd, source = datasets.load_dataset("parquet", data_files=files, cache_dir=str(scratch / "hf")), str(parquet)
    else:
        raise DatasetNotFoundError(
            f"WMT14 En-De not found. Looked in: {', '.join(str(d) for d in candidates)} for a datasets save_to_disk "
            "folder (dataset_dict.json) or the hub's parquet files ({train,validation,test}-*.parquet, rows "
            "{'translation': {'de': ..., 'en': ...}}). Put a copy under --data-root (e.g. load_dataset('wmt/wmt14', "
            f"'de-en').save_to_disk('{candidates[0]}')), or pass --download to fetch it."
        )
    parts = {}
    for split in ("train", "test"):
        if split not in dd:
            raise DatasetNotFoundError(f"WMT14 at {source} has no {split} split (found {sorted(dd)})")
        pairs = dd[split]["translation"]
        parts[f"{split}.src"], parts[f"{split}.tgt"] = [p["en"] for p in pairs], [p["de"] for p in pairs]
        _aligned(parts[f"{split}.src"], parts[f"{split}.tgt"], f"WMT14 {split} at {source}")
    return parts, source


# --------------------------------------------------------------------------------------------- Multi30k
MULTI30K_SPLITS = {"train": "train", "test": "test_2016_flickr"}


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().rstrip("\n").split("\n")


@TRANSLATION_DATASETS.register("multi30k")
def load_multi30k(root: Path, download: bool, scratch: Path):
    """Multi30k task 1 En-De (Elliott et al., 2016): train 29,000 / test_2016_flickr 1,000 pairs."""
    candidates = [root / "multi30k", root / "Multi30k", root]

    def find(d: Path, stem: str) -> Path | None:
        return next((p for p in (d / f"{stem}.gz", d / stem) if p.is_file()), None)

    base = next((d for d in candidates if find(d, "train.en") and find(d, "train.de")), None)
    if base is None:
        raise DatasetNotFoundError(
            f"Multi30k not found. Looked in: {', '.join(str(d) for d in candidates)} for train.en.gz / train.de.gz. "
            "Put task 1's files {train,val,test_2016_flickr}.{en,de}.gz (gzip text, one sentence a line, "
            "line-aligned) in <data-root>/multi30k/; nftbench does not download Multi30k."
        )
    parts = {}
    for ours, theirs in MULTI30K_SPLITS.items():
        src, tgt = find(base, f"{theirs}.en"), find(base, f"{theirs}.de")
        if src is None or tgt is None:
            raise DatasetNotFoundError(f"Multi30k at {base} lacks {theirs}.en.gz or {theirs}.de.gz")
        parts[f"{ours}.src"], parts[f"{ours}.tgt"] = _read_lines(src), _read_lines(tgt)
        _aligned(parts[f"{ours}.src"], parts[f"{ours}.tgt"], f"Multi30k {theirs} at {base}")
    return parts, str(base)


# --------------------------------------------------------------------------------------------- procedural
LEXICON = {
    "det": ["the", "a", "every", "this", "one"],
    "adj": ["red", "big", "small", "old", "young", "green", "happy", "quiet", "fast", "tall", "dark", "bright"],
    "noun": ["dog", "cat", "man", "woman", "child", "bird", "horse", "boy", "girl", "car", "ball", "tree", "house",
             "river", "table", "book", "chair", "window", "garden", "street"],
    "verb": ["sees", "likes", "finds", "holds", "follows", "watches", "carries", "pushes", "paints", "visits"],
    "prep": ["near", "under", "behind", "beside", "above"],
}
PROCEDURAL_SIZES = {"train": 4000, "test": 200}
PROCEDURAL_SEED = 0
GENDERS = 3
P_ADJ, P_PP = 0.5, 0.4


def pseudo_lexicon(seed: int) -> tuple[dict[str, str], dict[str, int], dict[tuple[str, int], str]]:
    """The pseudo-German lexicon: a word per English adjective, noun, verb and preposition, a gender per noun and a
    determiner per (English determiner, gender); words are two or three random consonant-vowel syllables."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    used: set[str] = {w for words in LEXICON.values() for w in words}

    def word() -> str:
        while True:
            w = "".join(rng.choice(syllables, size=int(rng.integers(2, 4))))
            if w not in used:
                used.add(w)
                return w

    words = {w: word() for kind in ("adj", "noun", "verb", "prep") for w in LEXICON[kind]}
    gender = {n: int(rng.integers(GENDERS)) for n in LEXICON["noun"]}
    dets = {(d, g): word() for d in LEXICON["det"] for g in range(GENDERS)}
    return words, gender, dets


def procedural_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` (English, pseudo-German) pairs, deterministic in ``seed`` (see the module docstring)."""
    words, gender, dets = pseudo_lexicon(PROCEDURAL_SEED)
    rng = np.random.default_rng(seed)

    def pick(kind: str) -> str:
        return LEXICON[kind][int(rng.integers(len(LEXICON[kind])))]

    def phrase() -> tuple[list[str], list[str]]:
        det, noun = pick("det"), pick("noun")
        adj = pick("adj") if rng.random() < P_ADJ else None
        src = [det, *([adj] if adj else []), noun]
        tgt = [dets[det, gender[noun]], words[noun], *([words[adj]] if adj else [])]
        return src, tgt

    sources, targets = [], []
    for _ in range(n):
        (s1, t1), verb, (s2, t2) = phrase(), pick("verb"), phrase()
        src, tgt = [*s1, verb, *s2], [*t1, words[verb], *t2]
        if rng.random() < P_PP:
            prep, (s3, t3) = pick("prep"), phrase()
            src, tgt = [*src, prep, *s3], [*tgt, words[prep], *t3]
        sources.append(" ".join([*src, "."]))
        targets.append(" ".join([*tgt, "."]))
    return sources, targets


@TRANSLATION_DATASETS.register("procedural")
def load_procedural(root: Path, download: bool, scratch: Path):
    """The procedural toy language pair (see the module docstring); needs no files."""
    parts = {}
    for i, split in enumerate(("train", "test")):
        pairs = procedural_pairs(PROCEDURAL_SIZES[split], PROCEDURAL_SEED + 1 + i)
        parts[f"{split}.src"], parts[f"{split}.tgt"] = pairs
    return parts, "procedural (tasks/translation_data.py)"
