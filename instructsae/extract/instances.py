"""Records -> token sequences the model runs: FAST (one dialogue each) and BT (fixed blocks). Pure functions."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from instructsae.errors import UserError
from instructsae.extract.data import Message, Record
from instructsae.schemas.manifest import ROLE_CODE

TEMPLATE = ROLE_CODE["template"]


@dataclass(frozen=True)
class TokenizedInstance:
    token_ids: np.ndarray  # int32 [n]
    roles: np.ndarray  # uint8 [n], codes from ROLE_CODE
    source_row: int


def _content_spans(rendered: str, messages: tuple[Message, ...]) -> list[tuple[int, int, int]]:
    """(start, end, role code) of each message's content in the rendered chat, found left to right."""
    spans, cursor = [], 0
    for message in messages:
        if not message.content:
            continue
        start = rendered.find(message.content, cursor)
        if start < 0:  # a template that rewrites content (strips, escapes): leave those tokens 'template'
            continue
        spans.append((start, start + len(message.content), ROLE_CODE[message.role]))
        cursor = start + len(message.content)
    return spans


def _injected_system_span(tokenizer, rendered: str, messages: tuple[Message, ...]) -> tuple[int, int, int] | None:
    """A default system prompt the template adds when the dialogue has none (SmolLM2, Qwen do)."""
    if not messages or messages[0].role == "system":
        return None
    probe = "\x00probe\x00"
    with_system = tokenizer.apply_chat_template([{"role": "system", "content": probe}], tokenize=False)
    head = with_system[: with_system.find(probe)]
    if not head or not rendered.startswith(head):
        return None
    tail = with_system[with_system.find(probe) + len(probe):]
    end = rendered.find(tail, len(head)) if tail else -1
    return (len(head), end, ROLE_CODE["system"]) if end > len(head) else None


def _roles_from_offsets(offsets, spans) -> np.ndarray:
    roles = np.full(len(offsets), TEMPLATE, dtype=np.uint8)
    starts = np.array([start for start, _ in offsets])
    ends = np.array([end for _, end in offsets])
    for span_start, span_end, code in spans:
        # a token belongs to a message when it lies inside the content (offsets of special tokens are empty)
        inside = (starts >= span_start) & (ends <= span_end) & (ends > starts)
        roles[inside] = code
    return roles


def tokenize_dialogue(tokenizer, record: Record, max_len: int) -> TokenizedInstance:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template: dialogues need one (use a plain-text dataset or BT)")
    chat = [{"role": message.role, "content": message.content} for message in record.messages]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    spans = _content_spans(rendered, record.messages)
    injected = _injected_system_span(tokenizer, rendered, record.messages)
    roles = _roles_from_offsets(encoding["offset_mapping"], spans + ([injected] if injected else []))
    token_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    return TokenizedInstance(token_ids[:max_len], roles[:max_len], record.source_row)


def tokenize_text(tokenizer, record: Record, max_len: int | None) -> TokenizedInstance:
    """Plain text as the tokenizer encodes it by default (BOS added only where the tokenizer adds one)."""
    token_ids = np.asarray(tokenizer(record.text)["input_ids"], dtype=np.int32)[:max_len]
    return TokenizedInstance(token_ids, np.full(len(token_ids), ROLE_CODE["text"], dtype=np.uint8), record.source_row)


def tokenize_record(tokenizer, record: Record, max_len: int | None) -> TokenizedInstance:
    if record.messages is not None:
        return tokenize_dialogue(tokenizer, record, max_len)
    return tokenize_text(tokenizer, record, max_len)


def fast_instances(records: Iterable[Record], tokenizer, max_len: int) -> Iterator[TokenizedInstance]:
    """FAST: one sequence per record, truncated at max_len."""
    for record in records:
        yield tokenize_record(tokenizer, record, max_len)


def bt_blocks(records: Iterable[Record], tokenizer, block_len: int) -> Iterator[TokenizedInstance]:
    """Block training: documents joined by EOS into one stream, cut into full blocks of block_len.

    The final partial block is dropped, as block training does. A block's source_row is the row of its
    first token's document.
    """
    eos = tokenizer.eos_token_id
    ids: list[np.ndarray] = []
    roles: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    buffered = 0
    for record in records:
        document = tokenize_record(tokenizer, record, None)
        separator = [] if eos is None else [eos]
        ids.append(np.concatenate([document.token_ids, np.asarray(separator, dtype=np.int32)]))
        roles.append(np.concatenate([document.roles, np.full(len(separator), TEMPLATE, dtype=np.uint8)]))
        rows.append(np.full(len(ids[-1]), record.source_row, dtype=np.int64))
        buffered += len(ids[-1])
        if buffered >= block_len:
            stream_ids, stream_roles, stream_rows = np.concatenate(ids), np.concatenate(roles), np.concatenate(rows)
            n_full = len(stream_ids) // block_len * block_len
            for start in range(0, n_full, block_len):
                yield TokenizedInstance(stream_ids[start:start + block_len], stream_roles[start:start + block_len],
                                        int(stream_rows[start]))
            ids, roles, rows = [stream_ids[n_full:]], [stream_roles[n_full:]], [stream_rows[n_full:]]
            buffered = len(ids[0])
