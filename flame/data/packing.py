"""Document packing: token streams -> rows of seq_len + 1 tokens with document boundaries.

A row holds whole documents and pieces of documents back to back, each ended (eos) or started
(bos) by the separator, with no padding. input = row[:-1], labels = row[1:]. A document cut
by a row end continues at the start of the next row; row starts are always boundaries, so the
position ids and the mixers' states restart there.
"""

import numpy as np
import torch


class SourcePacker:
    """Turns one reader's documents into rows; its pending tokens are part of the resume state."""

    def __init__(self, reader, encode, *, separator_id: int, separator: str, max_doc_len: int,
                 vocab_size: int, where: str):
        self.reader = reader
        self.encode = encode  # list of texts -> list of int32 arrays; None for pre-tokenized data
        self.separator_id = separator_id
        self.separator = separator
        self.max_doc_len = max_doc_len
        self.vocab_size = vocab_size
        self.where = where
        self.tokens = np.empty(0, dtype=np.int32)
        self.lengths: list[int] = []  # pending segment lengths; they sum to len(self.tokens)
        # The resume state names no tokens: it is the reader's state before the oldest read whose
        # tokens are still pending, plus how many of that read's tokens are already used; a
        # resume reads and tokenizes that batch again. Entries: [reader state before, tokens].
        self.reads: list[list] = []
        self.used_of_first = 0

    def _documents(self, batch) -> list[np.ndarray]:
        if self.encode is not None:
            return self.encode(["" if t is None else t for t in batch])
        docs = [np.asarray(ids if ids is not None else [], dtype=np.int64) for ids in batch]
        top = max((int(d.max()) for d in docs if d.size), default=-1)
        if top >= self.vocab_size or min((int(d.min()) for d in docs if d.size), default=0) < 0:
            raise ValueError(f"{self.where}: pre-tokenized ids reach {top}, outside the tokenizer's "
                             f"vocabulary of {self.vocab_size}; tokenize with the same data.tokenizer")
        return [d.astype(np.int32) for d in docs]

    def _fill(self) -> bool:
        before = self.reader.state_dict()
        batch = self.reader.read()
        if batch is None:
            return False
        added = 0
        sep = np.array([self.separator_id], dtype=np.int32)
        pieces = [self.tokens]
        for doc in self._documents(batch):
            doc = np.concatenate([doc, sep] if self.separator == "eos" else [sep, doc])
            step = self.max_doc_len or len(doc)
            for start in range(0, len(doc), step):
                piece = doc[start:start + step]
                pieces.append(piece)
                self.lengths.append(len(piece))
                added += len(piece)
        self.tokens = np.concatenate(pieces)
        self.reads.append([before, added])
        return True

    def _consume(self, n: int) -> None:
        """Marks n more pending tokens as used, for the resume bookkeeping."""
        self.used_of_first += n
        while self.reads and self.used_of_first >= self.reads[0][1]:
            self.used_of_first -= self.reads.pop(0)[1]

    def next_row(self, row_len: int, infinite: bool):
        """Returns (tokens [row_len] int32, document starts within the inputs) or None at the end
        of a finite pass."""
        while len(self.tokens) < row_len:
            if self._fill():
                continue
            if not infinite:
                return None
            had = self.reader.epoch_docs
            self.reader.next_epoch()
            if had == 0:
                raise ValueError(f"{self.where}: this reader's share of the dataset is empty; the dataset "
                                 "has fewer documents than data-parallel ranks x data.num_workers")
        row = self.tokens[:row_len]
        self.tokens = self.tokens[row_len:]
        starts = [0]
        used = 0
        i = 0
        while used < row_len:
            n = self.lengths[i]
            if used + n > row_len:
                self.lengths[i] = n - (row_len - used)
                break
            used += n
            i += 1
            # The last token of a row is a label only, so a document starting there is no input boundary.
            if used < row_len - 1:
                starts.append(used)
        del self.lengths[:i]
        self._consume(row_len)
        return row, np.asarray(starts, dtype=np.int32)

    def state_dict(self) -> dict:
        if self.reads:
            return {"reader": self.reads[0][0], "skip": self.used_of_first}
        return {"reader": self.reader.state_dict(), "skip": 0}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.tokens = np.empty(0, dtype=np.int32)
        self.lengths = []
        self.reads = []
        self.used_of_first = 0
        skip = state["skip"]
        if skip == 0:
            return
        if not self._fill():
            raise ValueError(f"{self.where}: cannot resume, the data changed since the checkpoint "
                             "(the batch of documents it points into is gone)")
        if self.reads[0][1] <= skip:
            raise ValueError(f"{self.where}: cannot resume, the data or tokenizer changed since the checkpoint "
                             "(the documents it points into now tokenize shorter)")
        self.tokens = self.tokens[skip:]
        self.used_of_first = skip
        i = 0
        while skip >= self.lengths[i]:
            skip -= self.lengths[i]
            i += 1
        self.lengths[i] -= skip
        del self.lengths[:i]


def collate_rows(items):
    """Stacks packed rows into the batch dict the trainer consumes."""
    rows = torch.from_numpy(np.stack([row for row, _ in items]).astype(np.int64))
    batch, row_len = rows.shape
    seq_len = row_len - 1
    cu = np.concatenate([starts + b * seq_len for b, (_, starts) in enumerate(items)]
                        + [np.array([batch * seq_len])]).astype(np.int32)
    position_ids = np.arange(batch * seq_len) - np.repeat(cu[:-1], np.diff(cu))
    return {
        "input_ids": rows[:, :-1].contiguous(),
        "labels": rows[:, 1:].contiguous(),
        "position_ids": torch.from_numpy(position_ids.reshape(batch, seq_len)),
        "cu_seqlens": torch.from_numpy(cu),
    }


def longest_document(cu_seqlens: torch.Tensor | None) -> int | None:
    """Tokens of a batch's longest packed document, from the host's copy of its boundaries."""
    if cu_seqlens is None or cu_seqlens.numel() < 2:
        return None
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
