"""Scoring prompts with the model: P(jailbreak) from one forward pass, or a greedy answer to parse.

Both read the model's next-token logits at each row's last real position. Rows are RIGHT-padded
and the model is causal with no attention mask, so that position sees only its own prompt: a
score depends on the prompt alone, never on the padding or on the other rows of the batch.
Scoring may also pack prompts end to end into rows (as training packs examples), each attending
only to itself, and read each prompt's last position: the same scores, in far fewer forwards.
"""

import contextlib

import torch
from tqdm import tqdm

from data import (LABELS, MAX_LEN, encode_text, label_token_ids, pack, packed_rows, render_prompt, render_prompts,
                  special_id)
from model.loss import IGNORE


def _batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, so padding is small): at most batch_size
    prompts, and with max_tokens at most that many tokens padding included (a longer prompt alone)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    batches = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):   # ascending: i is the batch's longest
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (max_tokens is None or (len(last) + 1) * lengths[i] <= max_tokens):
            last.append(i)
        else:
            batches.append([i])
    return batches


@contextlib.contextmanager
def inference_mode(model):
    """model.eval() and torch.no_grad() inside the block; the model's training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def last_token_logits(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token logits (batch, vocab), float32, after the last id of each row; one forward pass.

    The lm_head is applied at those positions only: the (batch, seq, vocab) logits are never formed.
    """
    lengths = torch.tensor([len(row) for row in rows])
    input_ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)  # (batch, seq)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    h = model.hidden_states(input_ids)                                   # (batch, seq, hidden)
    rows_index = torch.arange(len(rows), device=h.device)
    h_last = h[rows_index, (lengths - 1).to(h.device)]                   # (batch, hidden)
    return model.lm_head(h_last).float()                                 # (batch, vocab)


def packed_last_token_logits(model, prompts: list[list[int]], pad_id: int, row_len: int,
                             rows_per_forward: int = 8):
    """`last_token_logits` of the prompts, the prompts packed into rows of row_len: for each forward,
    (the indices of its prompts, their logits (prompts in it, vocab)).

    data.pack places the prompts (first-fit decreasing); each forward takes rows_per_forward rows
    and reads each document's last position. A prompt longer than row_len gets a row as long as it.
    A forward's logits at a time, never the whole split's: 2,000 prompts' would be 1.5 GiB.
    """
    row_len = max([row_len, *map(len, prompts)])
    rows = pack([(ids,) for ids in prompts], row_len)
    for start in range(0, len(rows), rows_per_forward):
        group = rows[start:start + rows_per_forward]
        packed = [packed_rows([(prompts[i], [IGNORE] * len(prompts[i])) for i in row], row_len, pad_id)
                  for row in group]
        ids, doc_ids, positions = (torch.cat(t) for t in zip(*((p.input_ids, p.doc_ids, p.positions)
                                                                for p in packed)))   # (rows, row_len)
        h = model.hidden_states(ids, doc_ids, positions)                 # (rows, row_len, hidden)
        at, ends = [], []
        for r, row in enumerate(group):
            end = 0
            for i in row:
                end += len(prompts[i])
                at.append(i)
                ends.append((r, end - 1))                               # the prompt's last position
        r_index, t_index = (torch.tensor(x, device=h.device) for x in zip(*ends))
        yield at, model.lm_head(h[r_index, t_index]).float()            # (prompts in the forward, vocab)


def score_examples(model, tokenizer, prompts: list[str], batch_size: int = 8,
                   max_len: int | None = MAX_LEN, progress: bool = False,
                   return_raw: bool = False):
    """P(jailbreak) per prompt, normalised over the two label words: P(yes) / (P(yes) + P(no)).

    With return_raw, also returns [(P(no), P(yes))] under the full-vocabulary softmax, which shows
    how much of the next-token mass the two words get. Scores come back in the order of `prompts`.
    max_len cuts a prompt exactly as training cut it (train.py's --max-seq-len).
    """
    encoded, _ = render_prompts(tokenizer, prompts, max_len)
    return score_rendered(model, tokenizer, encoded, batch_size, progress, return_raw)


def classify(model, tokenizer, prompts: list[str], threshold: float = 0.5, batch_size: int = 8,
             max_len: int | None = MAX_LEN, progress: bool = False) -> list[dict]:
    """[{"prompt", "p_jailbreak", "jailbreak"}] per prompt, in order: the score, and whether it reaches
    the threshold. Use the training run's --max-seq-len as max_len, so prompts are cut as in training."""
    scores = score_examples(model, tokenizer, prompts, batch_size, max_len, progress)
    return [{"prompt": prompt, "p_jailbreak": score, "jailbreak": score >= threshold}
            for prompt, score in zip(prompts, scores)]


def score_rendered(model, tokenizer, encoded: list[list[int]], batch_size: int = 8, progress: bool = False,
                   return_raw: bool = False, pack_len: int | None = None, max_tokens: int | None = None):
    """`score_examples` of prompts already rendered (`data.render_prompts`). max_tokens: padded batches
    hold at most that many tokens, padding included (what the GPU was planned for).

    With pack_len, the prompts are packed into rows of pack_len tokens, batch_size rows a forward
    (`packed_last_token_logits`); the scores are those of the padded batches, up to rounding.
    """
    benign_id, jailbreak_id = label_token_ids(tokenizer)
    pad_id = special_id(tokenizer, "<|endoftext|>")
    scores, raw = [0.0] * len(encoded), [(0.0, 0.0)] * len(encoded)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    with inference_mode(model), tqdm(total=len(encoded), desc="scoring", unit="prompt",
                                     disable=not progress) as bar:
        # padded: batches of similar length; packed: rows of many prompts each, batch_size rows a forward
        if pack_len is None:
            forwards = ((batch, last_token_logits(model, [encoded[i] for i in batch], pad_id))
                        for batch in _batches([len(ids) for ids in encoded], batch_size, max_tokens))
        else:
            forwards = packed_last_token_logits(model, encoded, pad_id, pack_len, batch_size) if encoded else []
        for batch, logits in forwards:                                               # logits (batch, vocab)
            pair = logits[:, [benign_id, jailbreak_id]]                              # (batch, 2)
            p_jailbreak = pair.softmax(dim=-1)[:, 1].tolist()
            p_full = logits.softmax(dim=-1)[:, [benign_id, jailbreak_id]].tolist()
            for k, i in enumerate(batch):
                scores[i] = p_jailbreak[k]
                raw[i] = tuple(p_full[k])
            bar.update(len(batch))
    return (scores, raw) if return_raw else scores


def _find(ids: list[int], pattern: list[int], start: int = 0) -> int:
    """Index of the first occurrence of pattern in ids at or after start, or -1."""
    for i in range(start, len(ids) - len(pattern) + 1):
        if ids[i:i + len(pattern)] == pattern:
            return i
    return -1


def _final_header(tokenizer) -> list[int]:
    return ([special_id(tokenizer, "<|channel|>")] + encode_text(tokenizer, "final")
            + [special_id(tokenizer, "<|message|>")])


def parse_final(tokenizer, generated: list[int]) -> str | None:
    """The text of the final channel (after <|channel|>final<|message|>, up to <|return|> or <|end|>).

    None when the answer has no final channel or never closes it (cut off by max_new_tokens).
    """
    header = _final_header(tokenizer)
    at = _find(generated, header)
    if at < 0:
        return None
    body = generated[at + len(header):]
    closers = {special_id(tokenizer, "<|return|>"), special_id(tokenizer, "<|end|>")}
    end = next((i for i, token in enumerate(body) if token in closers), None)
    if end is None:
        return None
    return tokenizer.decode(body[:end], skip_special_tokens=False)


def answer_label(text: str | None) -> bool | None:
    """The label an answer names (True = jailbreak), or None if it is not one of the label words."""
    if text is None:
        return None
    word = text.strip().strip(".!\"'").strip().lower()
    matches = [label for label, label_word in LABELS.items() if word == label_word.lower()]
    return matches[0] if matches else None


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 8,
                     max_len: int | None = MAX_LEN, progress: bool = False) -> list[str | None]:
    """Greedy answers, each prompt ending at <|start|>assistant; the final channel's text, or None.

    There is no KV cache: every step runs the forward over the whole sequence again, which is fine
    for answers of a few tokens. A row stops at <|return|>, <|call|> or <|endoftext|>, or at <|end|>
    once it is inside the final channel (an <|end|> after analysis is followed by more messages).
    """
    pad_id = special_id(tokenizer, "<|endoftext|>")
    final_header = _final_header(tokenizer)
    stops = {special_id(tokenizer, t) for t in ("<|return|>", "<|call|>", "<|endoftext|>")}
    end_id = special_id(tokenizer, "<|end|>")
    encoded = []
    for prompt in prompts:
        ids = render_prompt(tokenizer, prompt, max_len)
        # render_prompt forces the final channel; here the model must choose its channel itself.
        assert ids[-len(final_header):] == final_header, "render_prompt no longer ends in the final header"
        encoded.append(ids[:-len(final_header)])
    generated: list[list[int]] = [[] for _ in prompts]
    with inference_mode(model), tqdm(total=len(prompts), desc="generating", unit="prompt",
                                     disable=not progress) as bar:
        for batch in _batches([len(ids) for ids in encoded], batch_size):
            running = list(batch)
            for _ in range(max_new_tokens):
                logits = last_token_logits(model, [encoded[i] + generated[i] for i in running], pad_id)
                next_ids = logits.argmax(dim=-1).tolist()
                still = []
                for i, token in zip(running, next_ids):
                    generated[i].append(token)
                    # (the answer so far is searched for the final header only when it may be over)
                    done = token in stops or (token == end_id and _find(generated[i], final_header) >= 0)
                    if not done:
                        still.append(i)
                running = still
                if not running:
                    break
            bar.update(len(batch))
    return [parse_final(tokenizer, ids) for ids in generated]
