"""DataConfig, tokenizers, the default corpus, pre-tokenized data and bad inputs (CPU, no network)."""

import json
import os

import pytest
import torch

from flame.data import DataConfig, SourceConfig, build_dataloader, build_tokenizer
from tests.test_data_helpers import doc_ids, make_docs, make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("data")
    datasets.config.HF_DATASETS_CACHE = str(root / "hf_cache")
    docs = make_docs(80, seed=2)
    return {"root": root, "docs": docs, "tokenizer": make_tokenizer(root / "tok"),
            "jsonl": write_jsonl(root / "one", docs)[0]}


def _build(cfg, **kw):
    args = dict(seq_len=16, local_batch_size=2, dp_rank=0, dp_world_size=1, seed=0)
    args.update(kw)
    return build_dataloader(cfg, build_tokenizer(cfg), **args)


# --- config ---------------------------------------------------------------------------------

def test_config_from_toml_table():
    import tomllib

    table = tomllib.loads("""
        [data]
        tokenizer = "default"
        separator = "bos"
        max_doc_len = 2048
        num_workers = 4
        [[data.sources]]
        kind = "hub"
        path = "HuggingFaceFW/fineweb-edu"
        name = "sample-10BT"
        streaming = true
        weight = 0.7
        [[data.sources]]
        kind = "files"
        path = "/data/code/*.parquet"
        text_column = "content"
        weight = 0.3
    """)["data"]
    cfg = DataConfig.from_dict(table)
    assert [s.kind for s in cfg.sources] == ["hub", "files"]
    assert cfg.sources[0].streaming and cfg.sources[1].text_column == "content"
    assert cfg.separator == "bos" and cfg.max_doc_len == 2048 and cfg.num_workers == 4
    DataConfig().validate()  # the defaults: the embedded corpus and tokenizer


@pytest.mark.parametrize("table,match", [
    ({"sepparator": "eos"}, "did you mean 'separator'"),
    ({"sources": [{"kind": "files", "pth": "x"}]}, r"data.sources\[0\].pth"),
    ({"sources": [{"kind": "s3", "path": "x"}]}, r"data.sources\[0\].kind"),
    ({"sources": [{"kind": "files"}]}, r"data.sources\[0\].path"),
    ({"sources": [{"kind": "default", "path": "x"}]}, r"data.sources\[0\].path"),
    ({"sources": []}, "data.sources is empty"),
    ({"sources": [{"weight": 0.0}, {"kind": "files", "path": "x", "weight": 0.0}]}, "weights sum to 0"),
    ({"sources": [{"weight": -1.0}]}, r"data.sources\[0\].weight"),
    ({"separator": "pad"}, "data.separator"),
    ({"max_doc_len": -3}, "data.max_doc_len"),
    ({"num_workers": -1}, "data.num_workers"),
])
def test_config_errors_name_the_key(table, match):
    with pytest.raises(ValueError, match=match):
        DataConfig.from_dict(table)


# --- default corpus and tokenizer -----------------------------------------------------------

def test_default_corpus_is_the_stdlib_in_fixed_order():
    from flame.data.corpus import iter_documents, load_default_corpus, stdlib_files

    files = stdlib_files()
    names = [f.name for f in files]
    assert "os.py" in names and "typing.py" in names
    assert not any("site-packages" in str(f) for f in files)
    ds = load_default_corpus()
    assert len(ds) > 500
    first = [d for _, d in zip(range(4), iter_documents())]
    assert ds[:4]["text"] == first  # same documents, same order, every build


def test_default_tokenizer_is_cached_hf_bpe():
    from flame.data.tokenizer import default_tokenizer_path

    tok = build_tokenizer(DataConfig())
    assert len(tok) == 4096
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    text = "def mean(xs):\n    \"\"\"Return the arithmetic mean.\"\"\"\n    return sum(xs) / len(xs)  # é\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges learned from Python sources compress Python
    path = default_tokenizer_path(4096)
    assert (path / "tokenizer.json").exists() and (path / "tokenizer_config.json").exists()
    mtime = (path / "tokenizer.json").stat().st_mtime
    build_tokenizer(DataConfig())
    assert (path / "tokenizer.json").stat().st_mtime == mtime  # second use reads the cache


def test_default_corpus_and_tokenizer_end_to_end():
    cfg = DataConfig(num_workers=1)
    tok = build_tokenizer(cfg)
    loader = build_dataloader(cfg, tok, seq_len=128, local_batch_size=2, dp_rank=0, dp_world_size=1, seed=0)
    b = next(iter(loader))
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (2, 128)
    assert int(b["input_ids"].max()) < len(tok)
    cu = b["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == 256 and 128 in cu.tolist()
    text = tok.decode(b["input_ids"][0])
    assert any(w in text for w in ("def ", "import ", "return", "self"))


# --- pre-tokenized data ---------------------------------------------------------------------

def test_pretokenized_round_trip(corpus, tmp_path):
    from flame.data.tokenize import main

    out = tmp_path / "tokenized"
    main(["--kind", "files", "--path", corpus["jsonl"], "--tokenizer", corpus["tokenizer"],
          "--output", str(out), "--num-proc", "2", "--batch-size", "16"])
    meta = json.loads((out / "flame_tokenizer.json").read_text())
    assert meta["vocab_size"] == 1003 and meta["documents"] == 80

    import datasets

    table = datasets.load_from_disk(str(out))
    assert table.column_names == ["input_ids"]
    assert [list(r) for r in table["input_ids"]] == [doc_ids(d) for d in corpus["docs"]]

    kw = dict(tokenizer=corpus["tokenizer"], num_workers=2, max_doc_len=9)
    online = _build(DataConfig(sources=[SourceConfig(kind="files", path=corpus["jsonl"])], **kw), seed=5)
    offline = _build(DataConfig(sources=[SourceConfig(kind="disk", path=str(out))], **kw), seed=5)
    for a, b, _ in zip(online, offline, range(12)):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_pretokenized_with_another_tokenizer_is_refused(corpus, tmp_path):
    from flame.data.tokenize import tokenize_corpus

    out = str(tmp_path / "tok_default_ids")
    tokenize_corpus(SourceConfig(kind="files", path=corpus["jsonl"]), corpus["tokenizer"], out)
    meta_path = os.path.join(out, "flame_tokenizer.json")
    meta = json.load(open(meta_path))
    meta["vocab_size"] = 4096
    json.dump(meta, open(meta_path, "w"))
    cfg = DataConfig(sources=[SourceConfig(kind="disk", path=out)], tokenizer=corpus["tokenizer"])
    with pytest.raises(ValueError, match="tokenized with"):
        _build(cfg)
    with pytest.raises(ValueError, match="not empty"):
        tokenize_corpus(SourceConfig(kind="files", path=corpus["jsonl"]), corpus["tokenizer"], out)


def test_pretokenized_ids_outside_vocabulary(corpus, tmp_path):
    import datasets

    path = str(tmp_path / "bad_ids")
    datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 99999]] * 4}).save_to_disk(path)
    cfg = DataConfig(sources=[SourceConfig(kind="disk", path=path)], tokenizer=corpus["tokenizer"], num_workers=0)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        next(iter(_build(cfg)))


def test_txt_parquet_and_disk_sources(corpus, tmp_path):
    import datasets

    docs = corpus["docs"][:20]
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d + "\n")
    datasets.Dataset.from_dict({"body": docs}).to_parquet(str(tmp_path / "docs.parquet"))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    stream = []
    for d in docs:
        stream += doc_ids(d) + [0]
    for src in [SourceConfig(kind="files", path=str(tmp_path / "txt")),
                SourceConfig(kind="files", path=str(tmp_path / "docs.parquet"), text_column="body"),
                SourceConfig(kind="disk", path=str(tmp_path / "saved")),
                SourceConfig(kind="disk", path=str(tmp_path / "saved"), streaming=True)]:
        cfg = DataConfig(sources=[src], tokenizer=corpus["tokenizer"], num_workers=0, shuffle=False)
        b = next(iter(_build(cfg, seq_len=31, local_batch_size=3)))
        rows = torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).flatten().tolist()
        assert rows == stream[:96], src
    # Paragraphs of one text file as documents
    (tmp_path / "paras.txt").write_text("\n\n".join(docs) + "\n")
    cfg = DataConfig(sources=[SourceConfig(kind="files", path=str(tmp_path / "paras.txt"), txt_sample_by="paragraph")],
                     tokenizer=corpus["tokenizer"], num_workers=0, shuffle=False)
    b = next(iter(_build(cfg, seq_len=31, local_batch_size=3)))
    assert torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).flatten().tolist() == stream[:96]


# --- bad input: clear errors before training starts -----------------------------------------

def test_missing_column(corpus):
    cfg = DataConfig(sources=[SourceConfig(kind="files", path=corpus["jsonl"], text_column="content")],
                     tokenizer=corpus["tokenizer"])
    with pytest.raises(ValueError, match=r"data.sources\[0\].text_column = 'content'.*columns are \['text', 'meta'\]"):
        _build(cfg)


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_dataset(corpus, tmp_path, streaming):
    import datasets

    (tmp_path / "empty.jsonl").write_text("")
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty_disk"))
    for src in [SourceConfig(kind="files", path=str(tmp_path / "empty.jsonl"), streaming=streaming),
                SourceConfig(kind="disk", path=str(tmp_path / "empty_disk"), streaming=streaming)]:
        cfg = DataConfig(sources=[src], tokenizer=corpus["tokenizer"])
        with pytest.raises(ValueError, match="empty"):
            _build(cfg)


def test_fewer_documents_than_readers(corpus, tmp_path):
    path = write_jsonl(tmp_path / "three", corpus["docs"][:3])[0]
    cfg = DataConfig(sources=[SourceConfig(kind="files", path=path)], tokenizer=corpus["tokenizer"], num_workers=2)
    with pytest.raises(ValueError, match="fewer than the 4 readers"):
        _build(cfg, dp_world_size=2)


def test_weights_must_sum_to_a_positive_number(corpus):
    src = SourceConfig(kind="files", path=corpus["jsonl"], weight=0.0)
    cfg = DataConfig(sources=[src, SourceConfig(weight=0.0)], tokenizer=corpus["tokenizer"])
    with pytest.raises(ValueError, match="weights sum to 0"):
        _build(cfg)


def test_tokenizer_without_separator(corpus, tmp_path):
    no_eos = make_tokenizer(tmp_path / "no_eos", eos=False)
    src = [SourceConfig(kind="files", path=corpus["jsonl"])]
    with pytest.raises(ValueError, match="has no EOS token.*data.separator"):
        build_tokenizer(DataConfig(sources=src, tokenizer=no_eos))
    tok = build_tokenizer(DataConfig(sources=src, tokenizer=no_eos, separator="bos"))  # BOS works
    with pytest.raises(ValueError, match="has no EOS token"):  # and the loader checks too
        build_dataloader(DataConfig(sources=src, tokenizer=no_eos), tok, seq_len=8, local_batch_size=1,
                         dp_rank=0, dp_world_size=1, seed=0)


def test_hub_without_network(corpus, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for streaming in (True, False):
        cfg = DataConfig(sources=[SourceConfig(kind="hub", path="flame-nonexistent/corpus", streaming=streaming)],
                         tokenizer=corpus["tokenizer"])
        with pytest.raises(ValueError, match=r"data.sources\[0\].*flame-nonexistent/corpus.*unreachable"):
            _build(cfg)
    with pytest.raises(ValueError, match=r"(?s)data.tokenizer = 'flame-nonexistent/tokenizer'.*unreachable"):
        build_tokenizer(DataConfig(tokenizer="flame-nonexistent/tokenizer"))


def test_bad_loader_arguments(corpus):
    cfg = DataConfig(sources=[SourceConfig(kind="files", path=corpus["jsonl"])], tokenizer=corpus["tokenizer"])
    with pytest.raises(ValueError, match="dp_rank"):
        _build(cfg, dp_rank=2, dp_world_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        _build(cfg, seq_len=0)
    with pytest.raises(ValueError, match="matches no files"):
        _build(DataConfig(sources=[SourceConfig(kind="files", path=str(corpus["root"] / "nope*.jsonl"))],
                          tokenizer=corpus["tokenizer"]))


def test_hub_connection_failure(corpus, monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach https://huggingface.co (timed out)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    cfg = DataConfig(sources=[SourceConfig(kind="hub", path="org/corpus", streaming=True)],
                     tokenizer=corpus["tokenizer"])
    with pytest.raises(ValueError, match=r"(?s)data.sources\[0\]: hub dataset 'org/corpus'.*connection failed"):
        _build(cfg)
