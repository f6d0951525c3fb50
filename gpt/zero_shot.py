"""GPT-2's zero-shot table (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", Table 3) scored as the paper scored it, plus HellaSwag as today's reproductions
report it, from the benchmarks' own release files.

- Perplexity benchmarks (WikiText-2/103, PTB, One Billion Word) are scored over the whole
  test set with `evaluation.perplexity`'s sliding window, on text detokenized by GPT-2's
  rules (section 3.1), and normalised as the paper did: total log-likelihood over the
  dataset's original token count, so that the detokenization changes what the model reads
  but not the unit it is reported in. enwik8 and text8 report bits per byte / character.
- CBT-CN/NE: each candidate substituted into the blank, the sentence with the highest
  probability given the story chosen (section 3.2).
- LAMBADA: `evaluation.lambada`, optionally with the stop-word filter.
- HellaSwag: as lm-evaluation-harness scores it (see `hellaswag`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence

import jax
import numpy as np

from gpt import evaluation
from gpt.data import Tokenizer
from gpt.model import GPT

# Exact parameter counts (tied head) of GPT-2's four sizes; Table 3 calls them 117M, 345M,
# 762M and 1542M.
SIZES = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}
PAPER_SIZE_NAMES = {"small": "117M", "medium": "345M", "large": "762M", "xl": "1542M"}
# GPT-2 paper, Table 3. LAMBADA accuracy there is with the stop-word filter; section 3.3
# gives xl's accuracy without it.
PAPER_TABLE3 = {
    "small": {"lambada_ppl": 35.13, "lambada_acc": 45.99, "cbt_cn": 87.65, "cbt_ne": 83.4,
              "wikitext2": 29.41, "ptb": 65.85, "enwik8": 1.16, "text8": 1.17,
              "wikitext103": 37.50, "lm1b": 75.20},
    "medium": {"lambada_ppl": 15.60, "lambada_acc": 55.48, "cbt_cn": 92.35, "cbt_ne": 87.1,
               "wikitext2": 22.76, "ptb": 47.33, "enwik8": 1.01, "text8": 1.06,
               "wikitext103": 26.37, "lm1b": 55.72},
    "large": {"lambada_ppl": 10.87, "lambada_acc": 60.12, "cbt_cn": 93.45, "cbt_ne": 88.0,
              "wikitext2": 19.93, "ptb": 40.31, "enwik8": 0.97, "text8": 1.02,
              "wikitext103": 22.05, "lm1b": 44.575},
    "xl": {"lambada_ppl": 8.63, "lambada_acc": 63.24, "cbt_cn": 93.30, "cbt_ne": 89.05,
           "wikitext2": 18.34, "ptb": 35.76, "enwik8": 0.93, "text8": 0.98,
           "wikitext103": 17.48, "lm1b": 42.16},
}
PAPER_LAMBADA_ACC_UNFILTERED = {"xl": 52.66}

# Each benchmark's release file, relative to --data_root, as its archive unpacks.
FILES = {
    "lambada": "lambada_test.jsonl",
    "cbt_cn": "CBTest/data/cbtest_CN_test_2500ex.txt",
    "cbt_ne": "CBTest/data/cbtest_NE_test_2500ex.txt",
    "wikitext2": "wikitext-2/wiki.test.tokens",
    "ptb": "simple-examples/data/ptb.test.txt",
    "enwik8": "enwik8",
    "text8": "text8",
    "wikitext103": "wikitext-103/wiki.test.tokens",
    "lm1b": "1-billion-word-language-modeling-benchmark-r13output/"
            "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050",
    "hellaswag": "hellaswag_val.jsonl",
}
LABELS = {"lambada": "LAMBADA", "cbt_cn": "CBT-CN", "cbt_ne": "CBT-NE",
          "wikitext2": "WikiText-2", "ptb": "PTB", "enwik8": "enwik8", "text8": "text8",
          "wikitext103": "WikiText-103", "lm1b": "1BW", "hellaswag": "HellaSwag"}
CBT_BLANK = "XXXXX"
TEST_FRACTION = 20  # enwik8 and text8: the last 1/20 (5M of 100M) is the standard test split


# ---- GPT-2's detokenizers ----------------------------------------------------------------
# GPT-2's paper, section 3.1: the pre-tokenized sets are scored through "invertible
# de-tokenizers to remove as many of these tokenization / pre-processing artifacts as
# possible"; OpenAI did not publish them. The rules below are written from each release's
# format (Megatron-LM's and lm-evaluation-harness's `wikitext_detokenizer` and
# `ptb_detokenizer` are public renderings of the same idea). They act within a line.

_CONTRACTION = re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE)
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{$#]) ")
_QUOTED = re.compile(r'" *([^"]*?) *"')


def _detokenize_english(line: str) -> str:
    """Tokenized English back to running text: contractions rejoined ("do n't" -> "don't",
    "John 's" -> "John's"), no space before closing punctuation or after opening brackets,
    currency and hash signs ("$ 5" -> "$5"), `` and '' as ", and the text between a pair
    of " quotes tightened ('" yes "' -> '"yes"')."""
    line = line.replace("``", '"').replace("''", '"')
    line = _CONTRACTION.sub(r"\1", line)
    line = _QUOTED.sub(r'"\1"', line)
    line = _SPACE_BEFORE.sub(r"\1", line)
    line = _SPACE_AFTER.sub(r"\1", line)
    return line.strip()


def detokenize_wikitext(line: str) -> str:
    """A line of WikiText's wiki.*.tokens: " @-@ ", " @,@ " and " @.@ " (hyphens and
    separators inside words and numbers: "1 @,@ 000" -> "1,000"), headings "= = Title = ="
    -> "== Title ==", then `_detokenize_english`. `<unk>` stays: it is what the set holds."""
    for marked, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        line = line.replace(marked, plain)
    line = re.sub(r"(?<==) (?==)", "", line)
    return _detokenize_english(line)


def detokenize_ptb(line: str) -> str:
    """A line of Mikolov's PTB (ptb.*.txt: lower-case, no punctuation but ' $ & # .):
    contractions and "$ N" rejoined by `_detokenize_english`. `<unk>` (a rare word) and
    `N` (a number) stay as written: any other word would be a guess, and the normalisation
    by PTB's own token count does not depend on it."""
    return _detokenize_english(line)


def detokenize_lm1b(line: str) -> str:
    """A sentence of One Billion Word (tokenized news: "It 's $ 5 , he said ."):
    `_detokenize_english`."""
    return _detokenize_english(line)


# ---- the release files -------------------------------------------------------------------

def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None


def read_jsonl(path: str, key: str) -> list:
    """Each non-empty line's `key`; errors name the file and line."""
    items = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line)[key])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number} is not a JSON object with {key!r}") from None
    if not items:
        raise ValueError(f"{path} is empty")
    return items


def read_lines(path: str) -> list[str]:
    lines = _read_text(path).splitlines()
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path} is empty")
    return lines


def word_level_text(lines: Sequence[str], detokenize: Callable[[str], str]) -> tuple[str, int]:
    """(the detokenized text, the original token count) of a word-level test set: each line
    ends with a newline, and counts its whitespace-separated tokens plus one end-of-line,
    as word-level language models count <eos> on PTB, WikiText and 1BW."""
    return "".join(detokenize(line) + "\n" for line in lines), sum(len(line.split()) + 1 for line in lines)


def character_level_text(path: str) -> tuple[str, int]:
    """(text, bytes) of enwik8's or text8's test split: the file's last 1/20 (the last 5M of
    100M bytes), started at a UTF-8 character boundary."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError(f"{path} is empty")
    cut = len(data) - len(data) // TEST_FRACTION
    while cut < len(data) and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut += 1
    try:
        return data[cut:].decode("utf-8"), len(data) - cut
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 ({e})") from None


@dataclasses.dataclass(frozen=True)
class Choice:
    """A multiple-choice item: a context and its candidate continuations."""
    context: str
    options: tuple[str, ...]
    answer: int


def read_cbt(path: str) -> list[Choice]:
    """CBT's cbtest_*_test_2500ex.txt: numbered story sentences 1..20, then
    "21 question with XXXXX\\tanswer\\t\\tcand1|...|cand10", a blank line between questions.
    Each option is the question with the candidate in the blank, detokenized."""
    questions, story = [], []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        index, _, text = line.partition(" ")
        fields = text.split("\t")
        if index != str(len(story) + 1) or (len(fields) != 1 and len(fields) != 4):
            raise ValueError(f"{path}:{number} is not a CBT line: 'N sentence' or "
                             f"'21 question\\tanswer\\t\\tcandidates'")
        if len(fields) == 1:
            story.append(text)
            continue
        question, answer, _, candidates = fields
        candidates = candidates.split("|")
        if CBT_BLANK not in question or answer not in candidates:
            raise ValueError(f"{path}:{number}: a CBT question needs {CBT_BLANK} and its answer "
                             f"among the candidates")
        questions.append(Choice(
            _detokenize_english(" ".join(story)),
            tuple(" " + _detokenize_english(question.replace(CBT_BLANK, c)) for c in candidates),
            candidates.index(answer)))
        story = []
    if not questions:
        raise ValueError(f"{path} holds no CBT question")
    return questions


def _hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag `preprocess`: WikiHow's " [title]" becomes ". ",
    other [bracketed] markers go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def read_hellaswag(path: str) -> list[Choice]:
    """hellaswag_val.jsonl: context "activity_label: ctx_a Ctx_b", options " " + ending,
    as lm-evaluation-harness builds them."""
    items = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            context = _hellaswag_preprocess(
                f"{item['activity_label']}: {item['ctx_a']} {item['ctx_b'].capitalize()}")
            options = tuple(" " + _hellaswag_preprocess(e) for e in item["endings"])
            answer = int(item["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{path}:{number} is not a HellaSwag item: a JSON object with "
                             f"activity_label, ctx_a, ctx_b, endings and label") from None
        if not 0 <= answer < len(options):
            raise ValueError(f"{path}:{number}: label {answer} is not one of its endings")
        items.append(Choice(context, options, answer))
    if not items:
        raise ValueError(f"{path} is empty")
    return items


# ---- scorers -----------------------------------------------------------------------------

def corpus_nats(model: GPT, params, tokenizer: Tokenizer, text: str, **kwargs) -> dict:
    """`evaluation.perplexity` of one text, with its total nats."""
    metrics = evaluation.perplexity(model, params, tokenizer, [text], **kwargs)
    return {**metrics, "nats": metrics["loss"] * metrics["tokens"]}


def choice_log_likelihoods(model: GPT, params, tokenizer: Tokenizer, items: Sequence[Choice],
                           **kwargs) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item, each option's summed log-likelihood given end-of-text + context, and its
    token count."""
    examples = [([tokenizer.eot_id, *tokenizer.encode(item.context)], tokenizer.encode(option))
                for item in items for option in item.options]
    scores = evaluation.continuations(model, params, examples, **kwargs)
    results, at = [], 0
    for item in items:
        part = scores[at:at + len(item.options)]
        at += len(item.options)
        results.append((np.array([lp.sum() for lp, _ in part]), np.array([len(lp) for lp, _ in part])))
    return results


def cbt(model: GPT, params, tokenizer: Tokenizer, questions: Sequence[Choice], **kwargs) -> dict:
    """Accuracy: the candidate whose sentence is most probable given the story. The paper
    scores "each choice and the rest of the sentence"; the words before the blank are the
    same for every candidate, so the whole sentence chooses the same one."""
    lls = choice_log_likelihoods(model, params, tokenizer, questions, **kwargs)
    return {"accuracy": float(np.mean([ll.argmax() == q.answer for (ll, _), q in zip(lls, questions)])),
            "examples": len(questions)}


def hellaswag(model: GPT, params, tokenizer: Tokenizer, items: Sequence[Choice], **kwargs) -> dict:
    """lm-evaluation-harness's hellaswag: acc, the ending with the highest summed
    log-likelihood; acc_norm, the highest log-likelihood per character of the ending
    (without its leading space), the harness's normalisation (llm.c divides by tokens)."""
    lls = choice_log_likelihoods(model, params, tokenizer, items, **kwargs)
    chars = [np.array([len(o) - 1 for o in item.options]) for item in items]
    return {"accuracy": float(np.mean([ll.argmax() == it.answer for (ll, _), it in zip(lls, items)])),
            "accuracy_norm": float(np.mean([(ll / n).argmax() == it.answer
                                            for (ll, _), n, it in zip(lls, chars, items)])),
            "examples": len(items)}


# ---- the suite ---------------------------------------------------------------------------

DETOKENIZERS = {"wikitext2": detokenize_wikitext, "wikitext103": detokenize_wikitext,
                "ptb": detokenize_ptb, "lm1b": detokenize_lm1b}


def parameter_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def paper_size(n_params: int) -> str:
    """The GPT-2 size nearest to `n_params` (by ratio)."""
    return min(SIZES, key=lambda size: abs(math.log(n_params / SIZES[size])))


def _row(benchmark: str, metric: str, value: float, paper: float | None, **details) -> dict:
    return {"benchmark": LABELS[benchmark], "metric": metric, "value": value, "paper": paper,
            **details}


def _language_model_row(name: str, text: str, units: int, paper: float, model, params,
                        tokenizer, **kwargs) -> dict:
    """Perplexity per original word, or bits per byte / character."""
    m = corpus_nats(model, params, tokenizer, text, **kwargs)
    per_unit = m["nats"] / units
    if name in DETOKENIZERS:
        return _row(name, "perplexity", math.exp(per_unit), paper, tokens=m["tokens"], words=units)
    unit = "byte" if name == "enwik8" else "character"
    return _row(name, f"bits per {unit}", per_unit / math.log(2), paper, tokens=m["tokens"],
                **{unit + "s": units})


def gpt2_zero_shot(model: GPT, params, tokenizer: Tokenizer, data_root: str, *,
                   context_len: int | None = None, stride: int | None = None,
                   batch_tokens: int = 4096, stopword_filter: bool = False,
                   lm1b_sentences: Callable[[], Sequence[str] | None] = lambda: None,
                   progress: Callable[[str], evaluation.Progress | None] = lambda name: None
                   ) -> dict:
    """Scores every benchmark of `FILES` present under `data_root` (1BW, when its file is
    absent, from `lm1b_sentences()`, e.g. TFDS's lm1b test split, if that gives some) and
    returns {size, parameters, rows, missing}: rows of (benchmark, metric, value, the
    paper's Table 3 figure for the nearest size), and the path each absent one needs.
    `progress(label)` gives a benchmark's progress callback."""
    n_params = parameter_count(params)
    size = paper_size(n_params)
    paper = PAPER_TABLE3[size]
    rows, missing = [], {}
    for name, relative in FILES.items():
        path = os.path.join(data_root, relative)
        sentences = None if os.path.isfile(path) or name != "lm1b" else lm1b_sentences()
        if not os.path.isfile(path) and sentences is None:
            missing[LABELS[name]] = path + (" nor a prepared TFDS lm1b" if name == "lm1b" else "")
            continue
        kwargs = dict(context_len=context_len, batch_tokens=batch_tokens,
                      progress=progress(LABELS[name]))
        if name == "lambada":
            m = evaluation.lambada(model, params, tokenizer, read_jsonl(path, "text"),
                                   stopword_filter=stopword_filter, **kwargs)
            rows += [_row(name, "perplexity", m["perplexity"], paper["lambada_ppl"],
                          examples=m["examples"]),
                     _row(name, "accuracy (%), " + ("stop-word filter" if stopword_filter else "no filter"),
                          100 * m["accuracy"], paper["lambada_acc"] if stopword_filter
                          else PAPER_LAMBADA_ACC_UNFILTERED.get(size), examples=m["examples"])]
        elif name in ("cbt_cn", "cbt_ne"):
            m = cbt(model, params, tokenizer, read_cbt(path), **kwargs)
            rows.append(_row(name, "accuracy (%)", 100 * m["accuracy"], paper[name],
                             examples=m["examples"]))
        elif name == "hellaswag":
            m = hellaswag(model, params, tokenizer, read_hellaswag(path), **kwargs)
            rows += [_row(name, "acc (%)", 100 * m["accuracy"], None, examples=m["examples"]),
                     _row(name, "acc_norm (%)", 100 * m["accuracy_norm"], None,
                          examples=m["examples"])]
        else:
            text, units = (word_level_text(sentences or read_lines(path), DETOKENIZERS[name])
                           if name in DETOKENIZERS else character_level_text(path))
            rows.append(_language_model_row(name, text, units, paper[name], model, params,
                                            tokenizer, stride=stride, **kwargs))
    return {"size": size, "paper_size": PAPER_SIZE_NAMES[size], "parameters": n_params,
            "stopword_filter": stopword_filter, "rows": rows, "missing": missing}


def markdown(result: dict) -> str:
    """The suite's result as a Markdown table, the paper's figure beside each row."""
    def number(x):
        return "—" if x is None else f"{x:.2f}"

    lines = [f"| Benchmark | Metric | This model ({result['parameters']:,} parameters) | "
             f"GPT-2 {result['paper_size']}, paper's Table 3 |", "|---|---|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['benchmark']} | {row['metric']} | {number(row['value'])} | "
                     f"{number(row['paper'])} |")
    lines += [f"| {name} | not scored: no {path} | | |" for name, path in result["missing"].items()]
    return "\n".join(lines) + "\n"
