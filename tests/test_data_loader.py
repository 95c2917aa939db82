"""Packing, sharding, mixtures and exact resume of flame.data.build_dataloader (CPU, no network)."""

import pickle

import pytest
import torch

from flame.data import DataConfig, SourceConfig, build_dataloader, build_tokenizer
from tests.test_data_helpers import MARKERS, doc_ids, make_docs, make_tokenizer, write_jsonl

EOS, BOS = 0, 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("data")
    datasets.config.HF_DATASETS_CACHE = str(root / "hf_cache")
    docs = make_docs(150, seed=1)
    write_jsonl(root / "four", docs, files=4)  # file f holds documents f, f + 4, ...
    return {
        "root": root,
        "docs": docs,
        "tokenizer": make_tokenizer(root / "tok"),
        "one_file": write_jsonl(root / "one", docs)[0],
        "four_files": str(root / "four" / "*.jsonl"),
    }


def _loader(corpus, sources, *, seq_len=16, batch=4, rank=0, world=1, workers=0, seed=0, infinite=True, **kw):
    cfg = DataConfig(sources=sources, tokenizer=corpus["tokenizer"], num_workers=workers, **kw)
    tok = build_tokenizer(cfg)
    return build_dataloader(cfg, tok, seq_len=seq_len, local_batch_size=batch, dp_rank=rank,
                            dp_world_size=world, seed=seed, infinite=infinite)


def _rows(batch):
    """Full rows (inputs plus the last label) of a batch."""
    return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)


def _check_batch_structure(batch, separator):
    ids, labels, pos, cu = batch["input_ids"], batch["labels"], batch["position_ids"], batch["cu_seqlens"]
    B, T = ids.shape
    assert ids.dtype == labels.dtype == pos.dtype == torch.int64 and cu.dtype == torch.int32
    assert torch.equal(ids[:, 1:], labels[:, :-1])
    c = cu.tolist()
    assert c[0] == 0 and c[-1] == B * T and all(a < b for a, b in zip(c, c[1:]))
    assert set(range(0, B * T, T)) <= set(c)  # every row start is a boundary
    flat_pos = pos.flatten().tolist()
    for a, b in zip(c, c[1:]):
        assert flat_pos[a:b] == list(range(b - a))
    flat = ids.flatten().tolist()
    inner = set(c[:-1]) - set(range(0, B * T, T))
    if separator == "eos":
        after_eos = {p + 1 for p, t in enumerate(flat) if t == EOS and (p + 1) % T}
        assert inner == after_eos
    else:
        at_bos = {p for p, t in enumerate(flat) if t == BOS and p % T}
        assert inner == at_bos


def _expected_stream(docs, separator="eos"):
    out = []
    for d in docs:
        out += doc_ids(d) + [EOS] if separator == "eos" else [BOS] + doc_ids(d)
    return out


@pytest.mark.parametrize("kind", ["map", "stream_shards", "stream_examples"])
def test_epoch_over_2_ranks_x_2_workers_has_every_token_once(corpus, kind, caplog):
    """Each reader (rank x worker) sees exactly its share of the documents, in order, with nothing
    lost or repeated; epochs follow each other seamlessly in the token stream."""
    if kind == "map":
        src = SourceConfig(kind="files", path=corpus["one_file"])
    elif kind == "stream_shards":
        src = SourceConfig(kind="files", path=corpus["four_files"], streaming=True)
    else:
        src = SourceConfig(kind="files", path=corpus["one_file"], streaming=True)
    seq_len, batch, n_batches = 16, 6, 20
    docs = corpus["docs"]
    seen_docs = []
    with caplog.at_level("WARNING"):
        for rank in range(2):
            loader = _loader(corpus, [src], seq_len=seq_len, batch=batch, rank=rank, world=2, workers=2,
                             shuffle=False)
            it = iter(loader)
            streams = {0: [], 1: []}
            for step in range(n_batches):
                b = next(it)
                _check_batch_structure(b, "eos")
                streams[step % 2] += _rows(b).flatten().tolist()  # workers take turns
            for worker, got in streams.items():
                reader = rank * 2 + worker
                share = docs[reader::4]
                expected = _expected_stream(share)
                epoch = len(expected)
                assert len(got) > epoch  # the test covers more than one epoch per reader
                reps = -(-len(got) // epoch)
                assert got == (expected * reps)[:len(got)]
                seen_docs += share
    assert sorted(seen_docs) == sorted(docs) and len(set(seen_docs)) == len(docs)
    fallback = [r for r in caplog.records if "example-level sharding" in r.getMessage()]
    assert len(fallback) == (1 if kind == "stream_examples" else 0)  # said once, by rank 0


@pytest.mark.parametrize("streaming", [False, True])
def test_shuffled_epochs_cover_each_share_once(corpus, streaming):
    src = SourceConfig(kind="files", path=corpus["one_file"], streaming=streaming)
    loader = _loader(corpus, [src], seq_len=8, batch=8, world=2, rank=1, infinite=False, shuffle=True)
    got = torch.cat([_rows(b).flatten() for b in loader]).tolist()
    share = corpus["docs"][1::2]
    # One finite pass: the share's documents, each once, in a shuffled order; only the tail that
    # does not fill a last row is left out.
    stream = _expected_stream(share)
    assert len(stream) - len(got) < 9
    starts = [i for i, t in enumerate(got) if 2 <= t < 2 + MARKERS]
    markers = [got[i] for i in starts]
    assert len(set(markers)) == len(markers)
    assert markers != sorted(markers)
    by_marker = {doc_ids(d)[0]: doc_ids(d) + [EOS] for d in share}
    for a, b in zip(starts, starts[1:] + [len(got)]):
        piece = got[a:b]
        assert piece == by_marker[piece[0]][:len(piece)]


def test_bos_separator_and_max_doc_len(corpus):
    src = SourceConfig(kind="files", path=corpus["one_file"])
    seq_len, batch, max_doc_len = 32, 2, 7
    loader = _loader(corpus, [src], seq_len=seq_len, batch=batch, separator="bos", max_doc_len=max_doc_len,
                     shuffle=False)
    # Expected: each [BOS] + document cut into pieces of at most 7 tokens, no tokens added.
    stream, piece_starts = [], set()
    for d in corpus["docs"]:
        doc = [BOS] + doc_ids(d)
        for a in range(0, len(doc), max_doc_len):
            piece_starts.add(len(stream) + a)
        stream += doc
    row_len = seq_len + 1
    it = iter(loader)
    for step in range(6):
        b = next(it)
        expected_cu = []
        for r in range(batch):
            row0 = (step * batch + r) * row_len
            expected_cu += [r * seq_len] + [p - row0 + r * seq_len for p in sorted(piece_starts)
                                            if row0 < p < row0 + seq_len]
        assert b["cu_seqlens"].tolist() == expected_cu + [batch * seq_len]
        got = _rows(b).flatten().tolist()
        assert got == stream[step * batch * row_len:(step + 1) * batch * row_len]


def test_mixture_follows_weights_and_seed(corpus):
    root = corpus["root"]
    other = write_jsonl(root / "other", make_docs(60, seed=5, marker_offset=200), files=1)[0]
    srcs = [SourceConfig(kind="files", path=corpus["one_file"], weight=3.0),
            SourceConfig(kind="files", path=other, weight=1.0)]

    def source_of_rows(seed, n_batches=40):
        loader = _loader(corpus, srcs, seq_len=8, batch=50, seed=seed)
        it = iter(loader)
        out = []
        for _ in range(n_batches):
            rows = _rows(next(it))
            for r in rows.tolist():
                marks = [t - 2 for t in r if 2 <= t < 2 + MARKERS]
                # rows are never mixed within: a row comes from one source
                assert all(m < 150 for m in marks) or all(m >= 200 for m in marks)
                out.append(1 if marks and marks[0] >= 200 else 0 if marks else -1)
        return out

    a = source_of_rows(seed=3)
    # rows with no document start cannot be attributed; they are rare at seq_len 8
    known = [s for s in a if s >= 0]
    frac = sum(known) / len(known)
    n = len(known)
    sigma = (0.25 * 0.75 / n) ** 0.5
    assert abs(frac - 0.25) < 4 * sigma, (frac, n)
    assert source_of_rows(seed=3) == a
    assert source_of_rows(seed=4) != a


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind,workers", [("map", 2), ("map", 0), ("stream", 2), ("stream_examples", 2),
                                          ("mixture", 2)])
def test_resume_gives_the_next_batch(corpus, kind, workers):
    root = corpus["root"]
    if kind == "map":
        srcs = [SourceConfig(kind="files", path=corpus["one_file"])]
    elif kind == "stream":
        srcs = [SourceConfig(kind="files", path=corpus["four_files"], streaming=True)]
    elif kind == "stream_examples":
        srcs = [SourceConfig(kind="files", path=corpus["one_file"], streaming=True)]
    else:
        other = write_jsonl(root / "mix", make_docs(40, seed=9, marker_offset=200))[0]
        srcs = [SourceConfig(kind="files", path=corpus["four_files"], streaming=True, weight=1.0),
                SourceConfig(kind="files", path=other, weight=2.0)]
    # 2 ranks; reads cross epoch boundaries (150 documents, ~2.4k tokens a rank a pass).
    for rank in range(2):
        kw = dict(seq_len=24, batch=4, rank=rank, world=2, workers=workers, seed=11, docs_per_read=5)
        loader = _loader(corpus, srcs, **kw)
        it = iter(loader)
        _take(it, 13)
        state = pickle.loads(pickle.dumps(loader.state_dict()))  # as a checkpoint would
        expected = _take(it, 20)
        resumed = _loader(corpus, srcs, **kw)
        resumed.load_state_dict(state)
        _assert_same(_take(iter(resumed), 20), expected)


def test_resume_at_start_and_state_keys(corpus):
    srcs = [SourceConfig(kind="files", path=corpus["one_file"])]
    loader = _loader(corpus, srcs, rank=1, world=2, workers=2)
    state = loader.state_dict()
    assert set(state) == {"dp_rank_1", "world_size", "num_workers"} and state["world_size"] == 2
    fresh = _take(iter(loader), 3)
    resumed = _loader(corpus, srcs, rank=1, world=2, workers=2)
    resumed.load_state_dict(state)
    _assert_same(_take(iter(resumed), 3), fresh)


def test_resume_with_other_layout_is_refused(corpus):
    srcs = [SourceConfig(kind="files", path=corpus["one_file"])]
    loader = _loader(corpus, srcs, rank=0, world=2)
    it = iter(loader)
    _take(it, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="data-parallel"):
        _loader(corpus, srcs, rank=0, world=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        _loader(corpus, srcs, rank=0, world=2, workers=2).load_state_dict(state)
    other = write_jsonl(corpus["root"] / "changed", corpus["docs"][:50])[0]
    with pytest.raises(ValueError, match="data.sources"):
        _loader(corpus, [SourceConfig(kind="files", path=other)], rank=0, world=2).load_state_dict(state)
        _take(iter(_loader), 1)


def test_state_round_trips_through_distributed_checkpoint(corpus, tmp_path):
    """The trainer's checkpoints go through torch.distributed.checkpoint (DCP)."""
    import torch.distributed.checkpoint as dcp

    srcs = [SourceConfig(kind="files", path=corpus["four_files"], streaming=True)]
    kw = dict(seq_len=12, batch=2, workers=2, seed=3)
    loader = _loader(corpus, srcs, **kw)
    it = iter(loader)
    _take(it, 5)
    dcp.save({"dataloader": loader}, checkpoint_id=str(tmp_path / "step-5"), no_dist=True)
    expected = _take(it, 6)
    resumed = _loader(corpus, srcs, **kw)
    dcp.load({"dataloader": resumed}, checkpoint_id=str(tmp_path / "step-5"), no_dist=True)
    _assert_same(_take(iter(resumed), 6), expected)
