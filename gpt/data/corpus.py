"""Text corpora, read as ArrayRecord through TFDS without TensorFlow.

`data.name` is one of three things: a built-in corpus (`pydoc`, CPython's own
documentation, always offline), `text:PATH` (the user's .txt / .jsonl files),
or the name of any TFDS dataset with a text feature (`tiny_shakespeare`,
`lm1b`, `pg19`, `c4/en`, `wikipedia/20230601.en`, ...). The first two go
through `TextCorpus`, which turns a set of named documents into a `train` and a
`validation` split on disk; each `CorpusConfig` says where its documents come
from, so the user's own files are one more config, not another builder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping

import grain
import ml_collections
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from gpt.config import ConfigError

SPLITS = ("train", "validation")
VALIDATION_START = 0.9  # validation is what follows the first paragraph break past here
HOLD_OUT_ONE_IN = 10  # local text: a document without such a break goes whole to validation 1 in 10
LOCAL_PREFIX = "text:"
LOCAL_EXTENSIONS = (".txt", ".jsonl")
TFDS_HELD_OUT = "1%"  # the tail of train that validates a TFDS dataset with neither validation nor test
# Packages that some TFDS builders need to prepare (never to read): (pip name, module, marker in source).
PREPARE_EXTRAS = (("tensorflow", "tensorflow", "import tensorflow as tf"),
                  ("apache-beam", "apache_beam", "apache_beam"))


def _pydoc_topics() -> Mapping[str, str]:
    """CPython's help() texts: 79 topics, ~465 KB of English prose and code, always installed."""
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel

    return topics.topics


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
    """One corpus: `documents()` returns its documents as {unique key: text}.

    `hold_out_whole`: see `split_document`.
    """

    documents: Callable[[], Mapping[str, str]] = dict
    hold_out_whole: bool = False


def deduplicate_paragraphs(documents: Mapping[str, str]) -> dict[str, str]:
    """Keeps each paragraph only where it first occurs, visiting documents by key.

    Corpora repeat themselves: pydoc's topics copy whole sections of one another
    (19% of its characters are repeated paragraphs; "if" and "else" are the same
    text). Left in, a paragraph could sit in train through one document and in
    validation through another, and validation would reward memorising it.
    A document left with nothing is dropped.
    """
    seen = set()
    unique = {}
    for key in sorted(documents):
        kept = []
        for paragraph in documents[key].split("\n\n"):
            content = paragraph.strip()  # the same words, indented or ended differently
            if content and content in seen:
                continue
            seen.add(content)
            kept.append(paragraph)
        text = "\n\n".join(kept)
        if text.strip():
            unique[key] = text
    return unique


def split_document(text: str, hold_out_whole: bool = False) -> tuple[str, str]:
    """Splits one document into its train part and its validation part.

    Every document gives its tail to validation, cut at the first paragraph break
    ("\\n\\n") at or after 90% of its length; a document with no such break stays
    whole in train. Cutting every document, rather than holding out whole ones,
    keeps the split stable on a corpus whose documents differ in length by 300x
    (on pydoc one topic is 13% of the text), and cutting at a paragraph break
    keeps both parts readable text. After `deduplicate_paragraphs`, pydoc keeps
    78 topics and 373 KB, and validation gets 8.3% of the characters, from 33
    topics. With `hold_out_whole` (the user's files, where a .jsonl line is often
    one paragraph), a document with no such break goes whole to validation when
    its sha256 is 0 modulo 10. The rule reads only the text, so the split is the
    same on every machine and every run.
    """
    cut = text.find("\n\n", int(len(text) * VALIDATION_START))
    if cut == -1:
        digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
        if hold_out_whole and digest % HOLD_OUT_ONE_IN == 0:
            return "", text
        return text, ""
    cut += 2  # the paragraph break ends the train part
    return text[:cut], text[cut:]


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Named documents, deduplicated, each split by `split_document` into train and validation."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        CorpusConfig(name="pydoc", description=_pydoc_topics.__doc__, documents=_pydoc_topics),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the documents are already local
        documents = deduplicate_paragraphs(self.builder_config.documents())
        return {split: self._generate_examples(documents, split) for split in SPLITS}

    def _generate_examples(self, documents: Mapping[str, str], split: str):
        for key, text in documents.items():
            part = split_document(text, self.builder_config.hold_out_whole)[SPLITS.index(split)]
            if part:
                yield key, {"text": part}


CORPORA = tuple(config.name for config in TextCorpus.BUILDER_CONFIGS)


def data_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """Where prepared corpora and learned tokenizers live; "" means ./data."""
    return os.path.abspath(data_cfg.data_dir or "data")


def _local_files(spec: str) -> list[str]:
    """The .txt / .jsonl files that `text:SPEC` names: directories, globs or files, comma-separated."""
    files = []
    for item in spec.split(","):
        item = os.path.expanduser(item.strip())
        if os.path.isdir(item):
            found = [p for ext in LOCAL_EXTENSIONS
                     for p in glob.glob(os.path.join(item, "**", "*" + ext), recursive=True)]
        elif glob.has_magic(item):
            found = [p for p in glob.glob(item, recursive=True)
                     if p.endswith(LOCAL_EXTENSIONS) and os.path.isfile(p)]
        elif os.path.isfile(item) and not item.endswith(LOCAL_EXTENSIONS):
            raise ValueError(f"data.name={LOCAL_PREFIX + spec!r}: {item} is neither .txt nor .jsonl")
        else:
            found = [item] if os.path.isfile(item) else []
        if not found:
            raise FileNotFoundError(
                f"data.name={LOCAL_PREFIX + spec!r}: {item!r} is no .txt or .jsonl file, "
                "nor a directory or glob holding one")
        files += sorted(os.path.abspath(p) for p in found)
    return list(dict.fromkeys(files))


def _read_local(path: str, spec: str) -> dict[str, str]:
    """One .txt file is one document; each line of a .jsonl file is one, its "text" field."""
    where = f"data.name={LOCAL_PREFIX + spec!r}: {path}"
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e})") from None
    docs = {path: content}
    if path.endswith(".jsonl"):
        docs = {}
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise ValueError(f"{where}:{number} is not a JSON object with a string \"text\"")
            docs[f"{path}:{number}"] = text
    docs = {key: text for key, text in docs.items() if text.strip()}
    if not docs:
        raise ValueError(f"{where} is empty")
    return docs


def _local_config(spec: str) -> CorpusConfig:
    """The user's files as a corpus named by a hash of their names and contents.

    An edited file changes the name, so it is prepared again, never read stale.
    """
    docs = {}
    for path in _local_files(spec):
        docs.update(_read_local(path, spec))
    digest = hashlib.sha256()
    for key in sorted(docs):
        digest.update(f"{len(key)}:{key}{len(docs[key])}:{docs[key]}".encode("utf-8"))
    parts = [split_document(text, True) for text in deduplicate_paragraphs(docs).values()]
    for index, split in enumerate(SPLITS):
        if not any(part[index] for part in parts):
            raise ValueError(
                f"data.name={LOCAL_PREFIX + spec!r} leaves nothing for {split}: validation takes "
                f"the text after a blank line in the last {1 - VALIDATION_START:.0%} of a "
                f"document, or 1 in {HOLD_OUT_ONE_IN} documents without one, whole; give more "
                "documents or blank lines")
    return CorpusConfig(name=f"text-{digest.hexdigest()[:16]}", description=f"{LOCAL_PREFIX}{spec}",
                        documents=lambda: docs, hold_out_whole=True)


def corpus_id(data_cfg: ml_collections.ConfigDict) -> str:
    """A file name for `data.name` that changes whenever its documents do."""
    if data_cfg.name.startswith(LOCAL_PREFIX):
        return _local_config(data_cfg.name[len(LOCAL_PREFIX):]).name
    return data_cfg.name.replace("/", "_").replace(":", "-")


Progress = Callable[[str], None]  # hears one line before long work; see `prepare`


def show_bars(progress: Progress | None) -> bool:
    """Whether the libraries draw their progress bars: when the caller asked for progress,
    and only to a terminal, since a log gets a bar's every redraw (the line is enough there)."""
    return progress is not None and sys.stderr.isatty()


@contextlib.contextmanager
def _tfds_output(shown: bool) -> Iterator[None]:
    """TFDS's progress bars on or off, and its own printed lines (whose sizes read "Unknown
    size" for our corpora) dropped; restores the caller's bar setting after."""
    was_on = tqdm_utils._active  # pylint: disable=protected-access
    tfds.display_progress_bar(shown)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(was_on)


def _is_text_corpus(data_cfg: ml_collections.ConfigDict) -> bool:
    return data_cfg.name in CORPORA or data_cfg.name.startswith(LOCAL_PREFIX)


def _text_corpus(data_cfg: ml_collections.ConfigDict,
                 progress: Progress | None = None) -> TextCorpus:
    """pydoc or the user's files, prepared on first use and reused after."""
    if data_cfg.name.startswith(LOCAL_PREFIX):
        config = _local_config(data_cfg.name[len(LOCAL_PREFIX):])
    else:
        config = data_cfg.name
    builder = TextCorpus(config=config, data_dir=data_dir(data_cfg), file_format="array_record")
    if not builder.is_prepared():
        if progress:
            progress(f"preparing {data_cfg.name} in {builder.data_dir} (once: later runs reuse it)")
        with _tfds_output(show_bars(progress)):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def prepare(data_cfg: ml_collections.ConfigDict, progress: Progress | None = None) -> None:
    """Makes `data.name` readable: prepares a built-in or local corpus if it is not yet, and
    checks that a TFDS dataset is (the error says how to prepare it). With `progress`, the
    caller hears one line before preparing, and TFDS draws its bars (`show_bars`)."""
    if _is_text_corpus(data_cfg):
        _text_corpus(data_cfg, progress)
    else:
        prepared_builder(data_cfg)


def _tfds_builder(data_cfg: ml_collections.ConfigDict, key: str) -> tfds.core.DatasetBuilder:
    name = data_cfg.name
    # TFDS registers its older text builders (c4, wikipedia, ...) only when this module is imported.
    importlib.import_module("tensorflow_datasets.text")
    try:
        return tfds.builder(name, data_dir=data_cfg.data_dir or None, file_format="array_record")
    except (ValueError, AssertionError) as e:  # unknown name, config or version
        reason = str(e).splitlines()[0]
        raise ConfigError(
            key, f"{', '.join(CORPORA)}, {LOCAL_PREFIX}PATH (.txt / .jsonl files, a "
            f"directory or a glob) or a TFDS dataset name ({reason})", name) from None


def _how_to_prepare(builder: tfds.core.DatasetBuilder, name: str) -> str:
    """What to run, where the network is reachable, to prepare `builder` as ArrayRecord."""
    root = os.fspath(builder.data_dir_root)
    source = inspect.getsource(sys.modules[type(builder).__module__])
    extras = [pip for pip, module, marker in PREPARE_EXTRAS
              if marker in source and importlib.util.find_spec(module) is None]
    steps = [f"pip install {' '.join(extras)}"] if extras else []
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        steps.append(f"if it needs files downloaded by hand, put them in "
                     f"{os.path.join(root, 'downloads', 'manual')} ({manual})")
    steps.append(f"python -c \"import tensorflow_datasets as tfds, tensorflow_datasets.text; "
                 f"tfds.builder('{name}', data_dir='{root}')"
                 f".download_and_prepare(file_format='array_record')\"")
    if "apache_beam" in source:
        steps.append("a large Beam dataset is best prepared on a cluster: "
                     "https://www.tensorflow.org/datasets/beam_datasets")
    return "; ".join(steps)


def prepared_builder(data_cfg: ml_collections.ConfigDict,
                     key: str = "data.name") -> tfds.core.DatasetBuilder:
    """The TFDS builder of `data_cfg.name` (in `data_cfg.data_dir`), which must be prepared:
    nothing is downloaded during a run. `key` is the config key errors name."""
    builder = _tfds_builder(data_cfg, key)
    name = data_cfg.name
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{key}={name!r}: the TFDS dataset {name} is not prepared in "
            f"{builder.data_dir_root}, and it is never downloaded during a run. "
            f"To prepare it once with network access: {_how_to_prepare(builder, name)}")
    return builder


def _tfds_source(data_cfg: ml_collections.ConfigDict, split: str):
    """One split of a prepared TFDS dataset and the name of its text feature."""
    builder = prepared_builder(data_cfg)
    name = data_cfg.name
    feature = _text_feature(builder.info.features, data_cfg)
    splits = builder.info.splits
    held_out = "validation" not in splits and "test" not in splits
    if split == "train":
        tfds_split = f"train[:-{TFDS_HELD_OUT}]" if held_out else "train"
    else:
        tfds_split = (f"train[-{TFDS_HELD_OUT}:]" if held_out
                      else "validation" if "validation" in splits else "test")
    return _as_source(builder, tfds_split, name), feature


def _as_source(builder: tfds.core.DatasetBuilder, split: str, name: str, key: str = "data.name"):
    """A split of a prepared dataset for random access, without TensorFlow."""
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:  # prepared, but as TFRecord, which TFDS reads only with TensorFlow
        raise ValueError(
            f"{key}={name!r}: {builder.data_dir} holds it as "
            f"{builder.info.file_format.value}, not ArrayRecord; prepare it again into another "
            f"data.data_dir: {_how_to_prepare(builder, name)}") from None


def tfds_split(name: str, split: str, data_dir: str = "", key: str = "data.name"):
    """Any split (TFDS split syntax) of the prepared TFDS dataset `name`, for random access;
    errors name `key`."""
    data_cfg = ml_collections.ConfigDict({"name": name, "data_dir": data_dir})
    return _as_source(prepared_builder(data_cfg, key), split, name, key)


def _text_feature(features: tfds.features.FeaturesDict,
                  data_cfg: ml_collections.ConfigDict) -> str:
    """`data.text_feature`, else the dataset's only text feature, else the one called "text"."""
    texts = [key for key, feature in features.items() if isinstance(feature, tfds.features.Text)]
    wanted = data_cfg.get("text_feature", "")
    if wanted in texts or (not wanted and len(texts) == 1):
        return wanted or texts[0]
    if not wanted and "text" in texts:
        return "text"
    raise ConfigError("data.text_feature",
                      f"a text feature of {data_cfg.name}: one of {', '.join(texts) or '(none)'}",
                      wanted)


def _as_str(text: bytes | str) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text


def documents(data_cfg: ml_collections.ConfigDict, split: str) -> grain.MapDataset:
    """The texts (str) of one split of `data.name`; the built-in and local corpora are
    prepared on first use, a TFDS dataset must be prepared already."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed: one of {', '.join(SPLITS)}")
    if _is_text_corpus(data_cfg):
        source, feature = _text_corpus(data_cfg).as_data_source(split=split), "text"
    else:
        source, feature = _tfds_source(data_cfg, split)
    return grain.MapDataset.source(source).map(lambda example: _as_str(example[feature]))
