"""build_dataloader: sources -> readers -> packers -> a resumable StatefulDataLoader."""

import logging
import pickle
import signal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from flame.data.config import DataConfig
from flame.data.packing import SourcePacker, collate_rows
from flame.data.readers import MapReader, StreamReader
from flame.data.sources import Source, open_source
from flame.data.tokenizer import check_separator

logger = logging.getLogger(__name__)
_STATE_VERSION = 1


def _encoder(backend):
    """texts -> int32 token arrays, without the tokenizer's own special tokens."""
    encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

    def encode_texts(texts):
        return [np.asarray(e.ids, dtype=np.int32) for e in encode(texts, add_special_tokens=False)]

    return encode_texts


def _source_names(sources: list[Source]) -> list[str]:
    """What a saved state must match: the sources it was read from, in order."""
    return [f"{s.cfg.kind}:{s.cfg.path}:{s.cfg.name}:{s.cfg.split}" for s in sources]


class PackedDataset(IterableDataset):
    """Rows of seq_len + 1 tokens drawn from weighted sources; each loader process reads its own
    share of every source. The state is taken in the process that iterates (a loader worker),
    so StatefulDataLoader saves and restores one state per worker."""

    def __init__(self, sources: list[Source], weights: list[float], tokenizer, *, seq_len: int,
                 separator: str, separator_id: int, max_doc_len: int, docs_per_read: int,
                 shuffle: bool, seed: int, dp_rank: int, dp_world_size: int, infinite: bool = True):
        self.sources = sources
        self.probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.backend = tokenizer.backend_tokenizer
        self.vocab_size = len(tokenizer)
        self.seq_len = seq_len
        self.separator = separator
        self.separator_id = separator_id
        self.max_doc_len = max_doc_len
        self.docs_per_read = docs_per_read
        self.shuffle = shuffle
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.infinite = infinite
        self._resume: dict | None = None
        self._live = None

    def _reader_id(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.dp_rank * workers + worker, self.dp_world_size * workers

    def _packers(self, reader: int, readers: int) -> list[SourcePacker]:
        encode = _encoder(self.backend)
        packers = []
        for i, src in enumerate(self.sources):
            if src.streaming:
                rd = StreamReader(src.dataset, src.column, reader=reader, readers=readers, batch=self.docs_per_read,
                                  seed=self.seed, source_index=i, shuffle=self.shuffle)
            else:
                rd = MapReader(src.dataset, src.column, reader=reader, readers=readers, batch=self.docs_per_read,
                               seed=self.seed, source_index=i, shuffle=self.shuffle)
            packers.append(SourcePacker(rd, None if src.pretokenized else encode, separator_id=self.separator_id,
                                        separator=self.separator, max_doc_len=self.max_doc_len,
                                        vocab_size=self.vocab_size, where=src.where))
        return packers

    def __iter__(self):
        if get_worker_info() is not None and any(s.streaming for s in self.sources):
            # fsspec's event-loop lock is inherited locked-or-not from the forking process; a
            # fresh one keeps remote streaming from hanging in loader workers (as datasets does).
            import fsspec.asyn

            fsspec.asyn.reset_lock()
        reader, readers = self._reader_id()
        stream = _PackedStream(self, reader, readers)
        if self._resume:
            stream.load_state_dict(self._resume)
        self._live = stream
        return stream.rows()

    def state_dict(self) -> dict:
        if self._live is not None:
            return self._live.state_dict()
        return self._resume or {}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None
        self._live = None


class _PackedStream:
    def __init__(self, ds: PackedDataset, reader: int, readers: int):
        self.ds = ds
        self.reader = reader
        self.readers = readers
        self.packers = ds._packers(reader, readers)
        self.rows_done = 0

    def _pick_source(self) -> int:
        if len(self.packers) == 1:
            return 0
        # Keyed by the row index, so the choice sequence is fixed by the seed and resumes exactly.
        rng = np.random.default_rng([self.ds.seed, self.reader, self.readers, self.rows_done, 7])
        return int(rng.choice(len(self.packers), p=self.ds.probs))

    def rows(self):
        row_len = self.ds.seq_len + 1
        while True:
            out = self.packers[self._pick_source()].next_row(row_len, self.ds.infinite)
            if out is None:
                return
            self.rows_done += 1
            yield out

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "reader": self.reader, "readers": self.readers,
                "rows": self.rows_done, "source_names": _source_names(self.ds.sources),
                "sources": [p.state_dict() for p in self.packers]}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("reader"), state.get("readers")) != (self.reader, self.readers):
            raise ValueError(f"data loader state belongs to reader {state.get('reader')} of {state.get('readers')}, "
                             f"but this process is reader {self.reader} of {self.readers} (dp ranks x "
                             "data.num_workers changed); resume with the same layout")
        if state.get("source_names") != _source_names(self.ds.sources):
            raise ValueError(f"data loader state was saved for data.sources {state.get('source_names')}, "
                             f"this run has {_source_names(self.ds.sources)}; resume with the same sources "
                             "or start the data anew")
        self.rows_done = state["rows"]
        for packer, st in zip(self.packers, state["sources"]):
            packer.load_state_dict(st)


class FlameDataLoader(StatefulDataLoader):
    """StatefulDataLoader whose state is keyed by data-parallel rank, as torchtitan's
    checkpointing expects, and refuses to resume under a different layout."""

    def __init__(self, dataset, *, dp_rank: int, dp_world_size: int, **kwargs):
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self._rank_key = f"dp_rank_{dp_rank}"
        super().__init__(dataset, **kwargs)

    def state_dict(self) -> dict:
        # Pickled, as torchtitan's loader does: DCP stores the bytes whatever the nesting inside.
        payload = {"loader": super().state_dict(), "sources": _source_names(self.dataset.sources)}
        return {self._rank_key: pickle.dumps(payload), "world_size": self.dp_world_size,
                "num_workers": self.num_workers}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        saved = state_dict.get("world_size")
        if saved != self.dp_world_size:
            raise ValueError(
                f"data loader state was saved with {saved} data-parallel ranks, this run has "
                f"{self.dp_world_size}: each rank's packed stream depends on that number, so resuming would "
                "repeat or skip documents. Resume with the same data-parallel degree, or set "
                "checkpoint.exclude_from_loading = [\"dataloader\"] to restart the data from the beginning")
        if state_dict.get("num_workers", self.num_workers) != self.num_workers:
            raise ValueError(f"data loader state was saved with data.num_workers = {state_dict['num_workers']}, "
                             f"this run has {self.num_workers}; resume with the same data.num_workers, or set "
                             "checkpoint.exclude_from_loading = [\"dataloader\"] to restart the data")
        if self._rank_key not in state_dict:
            raise ValueError(f"data loader state has no entry {self._rank_key!r} (keys: {sorted(state_dict)})")
        payload = pickle.loads(state_dict[self._rank_key])
        if payload["sources"] != _source_names(self.dataset.sources):
            raise ValueError(f"data loader state was saved for data.sources {payload['sources']}, this run has "
                             f"{_source_names(self.dataset.sources)}; resume with the same sources, or set "
                             "checkpoint.exclude_from_loading = [\"dataloader\"] to restart the data")
        super().load_state_dict(payload["loader"])


def build_dataloader(data_cfg: DataConfig, tokenizer, *, seq_len: int, local_batch_size: int, dp_rank: int,
                     dp_world_size: int, seed: int, infinite: bool = True) -> FlameDataLoader:
    """Batches: input_ids, labels, position_ids int64 [B, T]; cu_seqlens int32 [num_docs + 1] over
    the flattened B * T tokens. infinite=False stops after one pass over the first source to run out
    (its last partial row is dropped)."""
    data_cfg.validate()
    if seq_len < 1:
        raise ValueError(f"seq_len = {seq_len}: must be >= 1")
    if local_batch_size < 1:
        raise ValueError(f"local_batch_size = {local_batch_size}: must be >= 1")
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank = {dp_rank} is outside [0, dp_world_size = {dp_world_size})")
    separator_id = check_separator(tokenizer, data_cfg.separator, getattr(tokenizer, "name_or_path", ""))
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("the tokenizer must be a transformers PreTrainedTokenizerFast (from build_tokenizer)")

    readers = dp_world_size * max(1, data_cfg.num_workers)
    sources, weights = [], []
    for i, cfg in enumerate(data_cfg.sources):
        if cfg.weight == 0:
            continue
        src = open_source(cfg, f"data.sources[{i}]")
        _check_source(src, tokenizer, readers, dp_rank)
        sources.append(src)
        weights.append(float(cfg.weight))

    dataset = PackedDataset(sources, weights, tokenizer, seq_len=seq_len, separator=data_cfg.separator,
                            separator_id=separator_id, max_doc_len=data_cfg.max_doc_len,
                            docs_per_read=data_cfg.docs_per_read, shuffle=data_cfg.shuffle, seed=seed,
                            dp_rank=dp_rank, dp_world_size=dp_world_size, infinite=infinite)
    kwargs = {"pin_memory": data_cfg.pin_memory and torch.cuda.is_available()}
    if data_cfg.num_workers > 0:
        kwargs |= {"prefetch_factor": data_cfg.prefetch_factor, "persistent_workers": True,
                   "worker_init_fn": _leave_stop_signals_to_the_trainer}
    return FlameDataLoader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size,
                           collate_fn=collate_rows, num_workers=data_cfg.num_workers, **kwargs)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGUSR1: a scheduler (or torchrun) signals the whole
    process group, and the training process stops between steps (checkpoint.save_on_signal), which
    may still need a batch from its workers. They exit with it, as they do at the end of a run."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _check_source(src: Source, tokenizer, readers: int, dp_rank: int) -> None:
    if src.streaming:
        shards = src.dataset.num_shards
        if shards < readers and dp_rank == 0:
            logger.warning(
                "%s has %d shard(s) for %d readers (data-parallel ranks x data.num_workers): falling back to "
                "example-level sharding, where every reader streams the whole source and keeps every %d-th "
                "document. Use a dataset with at least %d shards (files) to read each only once.",
                src.where, shards, readers, readers, readers)
    elif len(src.dataset) < readers:
        raise ValueError(f"{src.where} has {len(src.dataset)} documents, fewer than the {readers} readers "
                         "(data-parallel ranks x data.num_workers); lower data.num_workers or add data")
    meta = src.tokenizer_meta
    if meta is not None and meta.get("vocab_size") != len(tokenizer):
        raise ValueError(f"{src.where} was tokenized with {meta.get('tokenizer')!r} "
                         f"(vocabulary {meta.get('vocab_size')}) "
                         f"but data.tokenizer has a vocabulary of {len(tokenizer)}; re-tokenize it or use the same "
                         "tokenizer")
