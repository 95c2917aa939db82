"""Readers: one data-loading process's share of one source, read in batches of documents.

A reader is identified by (reader, readers) = (dp_rank * num_workers + worker_id,
dp_world_size * num_workers). Shares are disjoint and together cover every document once per
epoch, for map-style and streaming datasets alike.
"""

import numpy as np


class MapReader:
    """Documents reader, reader + readers, reader + 2 * readers, ... of a map-style dataset, in a
    fresh seeded order every epoch."""

    def __init__(self, dataset, column: str, *, reader: int, readers: int, batch: int, seed: int,
                 source_index: int, shuffle: bool):
        self.dataset = dataset
        self.column = column
        self.reader = reader
        self.readers = readers
        self.batch = batch
        self.seed = seed
        self.source_index = source_index
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0
        self._order = None

    @property
    def epoch_docs(self) -> int:
        return self.pos

    def _epoch_order(self) -> np.ndarray:
        order = np.arange(self.reader, len(self.dataset), self.readers, dtype=np.int64)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.source_index, self.reader, self.readers, self.epoch])
            order = rng.permutation(order)
        return order

    def read(self):
        if self._order is None:
            self._order = self._epoch_order()
        if self.pos >= len(self._order):
            return None
        picked = self._order[self.pos:self.pos + self.batch]
        self.pos += len(picked)
        return self.dataset[picked.tolist()][self.column]

    def next_epoch(self) -> None:
        self.epoch += 1
        self.pos = 0
        self._order = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.pos = state["pos"]
        self._order = None


def split_stream(dataset, reader: int, readers: int):
    """This reader's part of a streaming dataset: whole shards when there are at least as many
    shards as readers, otherwise every readers-th example."""
    from datasets.distributed import split_dataset_by_node

    strategy = "shards" if dataset.num_shards >= readers else "examples"
    return split_dataset_by_node(dataset, rank=reader, world_size=readers, strategy=strategy)


class StreamReader:
    """This reader's part of a `datasets.IterableDataset`, resumed through its own state_dict.
    With shuffle, the documents of each read are permuted (a window of `batch` documents): a
    shuffle buffer that resumes exactly, since a resume reads the same window again."""

    def __init__(self, dataset, column: str, *, reader: int, readers: int, batch: int, seed: int = 0,
                 source_index: int = 0, shuffle: bool = False):
        self.dataset = split_stream(dataset, reader, readers)
        self.column = column
        self.batch = batch
        self.key = [seed, source_index, reader, readers]
        self.shuffle = shuffle
        self.epoch = 0
        self.docs = 0
        self.hf_state = None
        self._it = None

    @property
    def epoch_docs(self) -> int:
        return self.docs

    def read(self):
        if self._it is None:
            self.dataset.set_epoch(self.epoch)
            self.dataset.load_state_dict(self.hf_state)
            # .iter() rather than iter(): the latter would split the data again among workers.
            self._it = self.dataset.iter(batch_size=self.batch)
        batch = next(self._it, None)
        if batch is None:
            return None
        self.hf_state = self.dataset.state_dict()
        docs = batch[self.column]
        if self.shuffle:
            order = np.random.default_rng(self.key + [self.epoch, self.docs]).permutation(len(docs))
            docs = [docs[i] for i in order]
        self.docs += len(docs)
        return docs

    def next_epoch(self) -> None:
        self.epoch += 1
        self.docs = 0
        self.hf_state = None
        self._it = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "docs": self.docs, "hf": self.hf_state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.docs = state["docs"]
        self.hf_state = state["hf"]
        self._it = None
