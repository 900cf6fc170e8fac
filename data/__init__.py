"""The data set, the harmony chat format, tokenising with loss masks, and batching."""

from data.batches import PADDING_DOC, PackedRows, batch_order, make_batches, pack, pack_rows, packed_rows, padding_share
from data.harmony import (CUT_MARKER, DEFAULT_DATE, DEFAULT_POLICY, DEFAULT_REASONING, HARMONY_SPECIAL_TOKENS,
                          IGNORE, LABELS, MAX_LEN, encode_example, encode_split, encode_text, label_token_ids,
                          render_prompt, render_prompts, shortest_max_len, special_id, system_text)
from data.prepare import prepare, read_source, read_split, write_splits
from data.synthetic import write_synthetic
from data.tokenizer import load_tokenizer, tiny_tokenizer
