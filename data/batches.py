"""Batches of encoded examples: grouped by length, right-padded, in a seeded order."""

import random

import torch

from data.harmony import IGNORE

BUCKET_BATCHES = 50  # batches per length bucket: enough to pad little, few enough to stay random.


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
    lengths = [len(example[0]) for example in examples_encoded]
    order = list(range(len(examples_encoded)))
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
    return [_pad([examples_encoded[i] for i in batch], pad_id) for batch in batches]


def _pad(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(example[0]) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)      # (batch, seq)
    for row, (ids, example_labels, *_) in enumerate(examples):
        assert len(ids) == len(example_labels), (len(ids), len(example_labels))
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(ids)] = torch.tensor(example_labels, dtype=torch.long)
    return input_ids, labels
