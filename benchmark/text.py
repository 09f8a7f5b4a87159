"""Text data: sentences tokenized with a WordPiece vocabulary trained locally, so nothing is downloaded.

``table1-sentences`` holds the three sentences of DLG's Table 1 (``configs/_text-dlg-table1.yaml``, with
their source). Its vocabulary is a lower-cased WordPiece (BERT's normalizer and pre-tokenizer, ``##``
continuation pieces) trained with Hugging Face ``tokenizers`` on the embedded corpus
``configs/_text-corpus.yaml``: the same kind of vocabulary as ``bert-base-uncased``, much smaller and from
far less text (see the README's Text section).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from .data import SPLITS, Dataset
from .errors import ConfigError
from .params import Param
from .registry import register_dataset

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def shipped_yaml(name: str) -> dict:
    """A YAML data file shipped in ``leakbench.configs``."""
    return yaml.safe_load(resources.files("leakbench.configs").joinpath(name).read_text())


class Vocabulary:
    """A trained WordPiece tokenizer (HF ``tokenizers``) and the special tokens BERT's masked LM uses."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.size = tokenizer.get_vocab_size()
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as BERT reads a sentence: ``[CLS] pieces [SEP]``."""
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text of token ids, special tokens left out and ``##`` pieces joined to their word."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def pieces(self, ids) -> list[str]:
        return [self.tokenizer.id_to_token(int(i)) for i in ids]


@lru_cache(maxsize=8)
def train_vocabulary(corpus: str, vocab_size: int) -> Vocabulary:
    """A lower-cased WordPiece vocabulary of at most ``vocab_size`` entries trained on ``corpus`` (one
    document per line). Training is deterministic and takes milliseconds, so it runs on load rather than
    being stored."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tokenizer.train_from_iterator([line for line in corpus.splitlines() if line.strip()], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return Vocabulary(tokenizer)


@dataclass
class TextData:
    """Sentences and their token ids (``[CLS] ... [SEP]``) under one vocabulary. ``shape`` is the longest
    sequence and ``num_classes`` the vocabulary size, which is what a masked LM is built for."""

    name: str
    texts: list[str]
    token_ids: list[list[int]]
    vocabulary: Vocabulary

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def shape(self) -> tuple[int]:
        return (max(len(ids) for ids in self.token_ids),)

    @property
    def num_classes(self) -> int:
        return self.vocabulary.size


class TextDataset(Dataset):
    """A registered text dataset: embedded sentences and the vocabulary they are tokenized with."""

    modality = "text"
    embedded = True
    params = (
        Param("vocab_size", int, 2000, "WordPiece vocabulary size trained on the embedded corpus (at most)",
              low=100, high=100_000),
        Param("max_words", int, None, "keep each sentence's first N words (null: whole sentences)", low=1,
              nullable=True),
    )
    vocab_size: int
    max_words: int | None

    def sentences(self) -> list[str]:
        raise NotImplementedError

    def vocabulary(self) -> Vocabulary:
        return train_vocabulary(shipped_yaml("_text-corpus.yaml")["text"], self.vocab_size)

    def load(self, split: str = "train", *, data_dir: str | os.PathLike | Path | None = None) -> TextData:
        """The embedded sentences (both splits: nothing is trained on them; ``data_dir`` is not read)."""
        if split not in SPLITS:
            raise ConfigError(f"dataset {self.registry_name!r}: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        texts = self.sentences()
        if self.max_words is not None:
            texts = [" ".join(t.split()[:self.max_words]) for t in texts]
        vocabulary = self.vocabulary()
        return TextData(self.registry_name, texts, [vocabulary.encode(t) for t in texts], vocabulary)


@register_dataset("table1-sentences")
class Table1Sentences(TextDataset):
    """The three sentences of DLG's Table 1 (NeurIPS conference page text), embedded: no download."""

    def sentences(self) -> list[str]:
        return list(shipped_yaml("_text-dlg-table1.yaml")["sentences"])
