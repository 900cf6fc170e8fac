"""Batches of encoded examples in a seeded order: right-padded, or packed end to end into rows."""

import random
from typing import NamedTuple

import torch

from data.harmony import IGNORE

BUCKET_BATCHES = 50  # batches per length bucket: enough to pad little, few enough to stay random.
# The document number of a packed row's padding: above any real document's (a row of n tokens has at
# most n), so document numbers still never decrease along a row. The model reads a number this high as
# padding and skips it where it can (model.gpt_oss.PADDING_DOC, the same value; tests/test_data.py ties them).
PADDING_DOC = 2 ** 31


def make_batches(examples_encoded, batch_size: int, seed: int, epoch: int, pad_id: int,
                 shuffle: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (input_ids, labels) LongTensor pairs, each (batch, longest in batch).

    examples_encoded: (input_ids, labels, ...) per example, as encode_example/encode_split give.
    Rows are RIGHT-padded with pad_id, labels -100 on pads. The model is causal and takes no
    attention mask: a token attends to itself and the positions before it, and in a right-padded
    row those are all real tokens of the same example, so no real token ever sees padding or another
    example (each row holds one). Pads see real tokens, but their labels are -100, so they never
    reach the loss.
    With shuffle, examples are shuffled, sorted by length within buckets of BUCKET_BATCHES batches
    (little padding), and the batches shuffled; the order depends only on (seed, epoch), so a run
    resumes by rebuilding the epoch and skipping the batches done. Without shuffle (eval), batches
    follow length order. The last batch may be smaller; no example is dropped.
    """
    batches = batch_order([len(example[0]) for example in examples_encoded], batch_size, seed, epoch, shuffle)
    return [_pad([examples_encoded[i] for i in batch], pad_id) for batch in batches]


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """The example indices of each of make_batches' batches, in order: a pure function of the arguments."""
    order = list(range(len(lengths)))
    if shuffle:
        rng = random.Random(f"{seed}/{epoch}")  # a string seed hashes stably, unlike a tuple
        rng.shuffle(order)
        bucket = batch_size * BUCKET_BATCHES
        order = [i for start in range(0, len(order), bucket)
                 for i in sorted(order[start:start + bucket], key=lengths.__getitem__)]
    else:
        order.sort(key=lengths.__getitem__)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def _pad(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(example[0]) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)      # (batch, seq)
    for row, (ids, example_labels, *_) in enumerate(examples):
        assert len(ids) == len(example_labels), (len(ids), len(example_labels))
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(ids)] = torch.tensor(example_labels, dtype=torch.long)
    return input_ids, labels


class PackedRows(NamedTuple):
    """Rows of documents laid end to end, each (rows, row_len) LongTensor.

    doc_ids number the documents of a row from 0 in order; the padding at a row's end is a document
    of its own, numbered PADDING_DOC, which no real token sees. positions restart at 0 with each document.
    """
    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor


def pack(examples, row_len: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `examples` in each row of at most row_len tokens, every example whole.

    Longest first (ties in the given order), each into the first row with room; in a row, documents
    keep that order. Deterministic: the same examples give the same rows.
    """
    lengths = [len(example[0]) for example in examples]
    too_long = [n for n in lengths if n > row_len]
    if too_long:
        raise ValueError(f"an example of {max(too_long)} tokens does not fit a packed row of {row_len}; "
                         "cut examples to the row length (train.py cuts them to --max-seq-len)")
    rows, room = [], []
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):   # sorted() is stable
        fits = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fits is None:
            rows.append([])
            room.append(row_len)
            fits = len(rows) - 1
        rows[fits].append(i)
        room[fits] -= lengths[i]
    return rows


def packed_rows(examples, row_len: int, pad_id: int) -> PackedRows:
    """The examples laid end to end, in the order given, into one row of row_len tokens: (1, row_len) each.

    Exact, given the causal model attends within documents only: a document's last position would
    predict the next document's first token, whose label must therefore be -100 (a prompt's first is).
    """
    input_ids = torch.full((1, row_len), pad_id, dtype=torch.long)
    labels = torch.full((1, row_len), IGNORE, dtype=torch.long)
    doc_ids = torch.full((1, row_len), PADDING_DOC, dtype=torch.long)   # the padding's own document
    positions = torch.zeros((1, row_len), dtype=torch.long)
    at = 0
    for doc, (ids, example_labels, *_) in enumerate(examples):
        n = len(ids)
        assert n == len(example_labels) and at + n <= row_len, (n, len(example_labels), at, row_len)
        assert example_labels[0] == IGNORE, "a packed document's first label must be -100 (see the docstring)"
        input_ids[0, at:at + n] = torch.tensor(ids, dtype=torch.long)
        labels[0, at:at + n] = torch.tensor(example_labels, dtype=torch.long)
        doc_ids[0, at:at + n] = doc
        positions[0, at:at + n] = torch.arange(n)
        at += n
    positions[0, at:] = torch.arange(row_len - at)
    return PackedRows(input_ids, labels, doc_ids, positions)


def pack_rows(examples, row_len: int, pad_id: int) -> list[PackedRows]:
    """The examples packed (`pack`) into rows of row_len tokens: one PackedRows of shape (1, row_len) per row."""
    return [packed_rows([examples[i] for i in row], row_len, pad_id) for row in pack(examples, row_len)]


def padding_share(lengths: list[int], batch_size: int, grad_accum: int, row_len: int, seed: int = 0) -> tuple[float, float]:
    """The share of pad tokens in an epoch of make_batches' micro-batches of batch_size, and in the
    packed rows of row_len that train.py makes of each step's batch_size x grad_accum examples."""
    batches = batch_order(lengths, batch_size, seed, 0)
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    examples = [([0] * n,) for n in lengths]
    rows = sum(len(pack([examples[i] for b in batches[s:s + grad_accum] for i in b], row_len))
               for s in range(0, len(batches), grad_accum))
    return 1 - real / padded, 1 - real / (rows * row_len)
