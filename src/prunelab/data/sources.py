"""Named text sources for calibration and evaluation.

| source          | text                                                                 |
|-----------------|----------------------------------------------------------------------|
| `enwiki`        | embedded (default): 101 English Wikipedia articles of 2016 (gensim's test data), markup |
|                 | stripped; every 4th article for evaluation, the others for calibration |
| `web`           | bigbench (a copy by hand): SQuAD-shifts NYT + Reddit + Amazon passages                |
| `wiki`          | bigbench (a copy by hand): English Wikipedia articles of bigbench paragraph_segmentation |
| `new-wiki`      | bigbench (a copy by hand): SQuAD-shifts newer-Wikipedia passages                      |
| `wikitext2`     | Hugging Face `wikitext-2-raw-v1` (train for calibration, test for evaluation) |
| `c4`            | Hugging Face `allenai/c4` English (a train shard / a validation shard) |
| `*.txt`         | a local UTF-8 text file                                               |
| `*.jsonl`       | a local JSON-lines file, one document per line in field `text`       |
| `*.parquet`     | a local Parquet file with a `text` column                             |

Documents are joined by blank lines.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from ..assets import bigbench_task_dir, cache_dir, enwiki_dump
from ..errors import PrunelabError, quoted
from . import wikipedia

EMBEDDED = ("enwiki", "web", "wiki", "new-wiki")
SPLIT = ("enwiki", "wikitext2", "c4")  # one name, disjoint parts for calibration and evaluation
HUB = ("wikitext2", "c4")
_WEB_FILES = ("nyt_v1.0.json", "reddit_v1.0.json", "amazon_reviews_v1.0.json")
_STOPWORDS = frozenset("the of and to in is was a for that with as by on are from his it at an be which".split())


def describe(source: str) -> str:
    return {"enwiki": f"gensim-4.4.0 test_data enwiki sample, markup stripped, calib: articles i % "
                      f"{wikipedia.EVAL_EVERY} != {wikipedia.EVAL_EVERY - 1}, eval: the others",
            "web": "bigbench-1.0.0 squad_shifts nyt+reddit+amazon_reviews contexts",
            "wiki": "bigbench-1.0.0 paragraph_segmentation English articles",
            "new-wiki": "bigbench-1.0.0 squad_shifts new_wiki contexts",
            "wikitext2": "wikitext/wikitext-2-raw-v1", "c4": "allenai/c4 en"}.get(source, source)


def load_text(source: str, role: str = "calib") -> str:
    """Return the text of `source`; `role` ("calib" or "eval") picks the split of hub datasets."""
    if source in EMBEDDED:
        text = _embedded(source, role if source in SPLIT else "")
    elif source in HUB:
        text = _hub(source, role)
    else:
        text = _local(Path(source).expanduser())
    if not text.strip():
        raise PrunelabError(f"text source {source!r} is empty")
    return text


def check_disjoint(calib: str, evaluation: str) -> None:
    """Calibration and evaluation text must not be the same text (`SPLIT` sources use different parts)."""
    if evaluation == "none" or (calib in SPLIT and calib == evaluation):
        return
    if calib in EMBEDDED or evaluation in EMBEDDED:
        same = calib == evaluation
    else:
        same = Path(calib).expanduser().resolve() == Path(evaluation).expanduser().resolve()
    if same:
        raise PrunelabError(f"calibration and evaluation text must be disjoint; both are {calib!r}")


@lru_cache(maxsize=4)
def _embedded(source: str, part: str) -> str:
    """The joined text, extracted once from its XML or JSON into a plain file of the cache.

    Later runs read the plain file instead of parsing again (seconds of the data stage).
    """
    name = f"{source}-v{wikipedia.CONVERSION}-{part}" if source == "enwiki" else source
    extracted = cache_dir() / "text" / f"{name}.txt"
    if extracted.exists():
        return extracted.read_text(encoding="utf-8")
    if source == "enwiki":
        text = wikipedia.split_articles(enwiki_dump(), part)
    elif source == "wiki":
        text = english_articles(bigbench_task_dir() / "paragraph_segmentation" / "task.json")
    else:
        files = _WEB_FILES if source == "web" else ("new_wiki_v1.0.json",)
        root = bigbench_task_dir() / "squad_shifts"
        text = "\n\n".join(p for name in files for p in squad_contexts(root / name))
    tmp = extracted.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, extracted)
    return text


def squad_contexts(path: Path) -> list[str]:
    data = json.loads(path.read_text())["data"]
    return [para["context"].strip() for article in data for para in article["paragraphs"]]


def english_articles(path: Path) -> str:
    """The English articles among paragraph_segmentation's examples, picked by stop-word ratio."""
    articles = []
    for example in json.loads(path.read_text())["examples"]:
        text = example["input"].strip()
        words = text.lower().split()
        if words and sum(w in _STOPWORDS for w in words) / len(words) > 0.15:
            articles.append(text)
    return "\n\n".join(articles)


def _hub(source: str, role: str) -> str:
    try:
        from datasets import load_dataset

        if source == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if role == "calib" else "test")
            return "\n\n".join(rows["text"])  # the literature's protocol (SparseGPT, Wanda): rows joined by blank lines
        shard = ("en/c4-train.00000-of-01024.json.gz" if role == "calib" else "en/c4-validation.00000-of-00008.json.gz")
        split = "train" if role == "calib" else "validation"
        rows = load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return "\n\n".join(rows["text"])
    except Exception as exc:
        raise PrunelabError(f"cannot load {source} from the Hugging Face hub ({type(exc).__name__}); "
                            "offline machines can use the embedded source 'enwiki' or a local file") from exc


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PrunelabError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded): a binary file?") from None
    if "\x00" in text:
        raise PrunelabError(f"{path} is not UTF-8 text (it holds NUL bytes): a binary file?")
    return text


def _local(path: Path) -> str:
    try:
        found = path.is_file()
    except OSError:  # a name too long to be a path: a text given where its source's name goes
        found = False
    if not found:
        name = str(path)
        raise PrunelabError(f"unknown text source {quoted(name)}: not a file, nor one of {', '.join(EMBEDDED + HUB)}"
                            + ("; a text of your own goes in a .txt file, named by its path" if quoted(name) !=
                               repr(name) else ""))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_utf8(path)
    if suffix == ".jsonl":
        docs = []
        for number, line in enumerate(_read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                doc = None
            if not isinstance(doc, str):
                raise PrunelabError(f"{path}:{number}: expected a JSON object with a 'text' string")
            docs.append(doc)
        return "\n\n".join(docs)
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # an optional reader: only for Parquet sources

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's errors (ArrowInvalid, OSError) vary by version
            raise PrunelabError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        if "text" not in table.column_names:
            raise PrunelabError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return "\n\n".join(str(t) for t in table.column("text").to_pylist() if t)
    raise PrunelabError(f"unsupported text file type {suffix!r} for {path}; use .txt, .jsonl or .parquet")
