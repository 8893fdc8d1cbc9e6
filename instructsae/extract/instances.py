"""Records -> token sequences the model runs: FAST (one dialogue each) and BT (fixed blocks). Pure functions.

Every token carries a role code (schemas.manifest.ROLE_CODE): the role of the message whose content it
lies in ('reasoning' for an assistant turn's reasoning, 'system' for a system prompt merged into a user turn:
chat.py), 'assistant' for the tool calls a template writes (markup included: the model writes them), 'system'
for a default system prompt the chat template injects, 'text' for plain text, and 'template' for everything
else the template adds (role headers, <|im_start|>, <|im_end|>, newlines, BOS/EOS, tool definitions).
"""

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from instructsae.errors import UserError, first_line
from instructsae.extract.chat import Chat, Piece, build_chat, template_traits
from instructsae.extract.rows import Message, Record
from instructsae.schemas.manifest import ROLE_CODE

TEMPLATE = ROLE_CODE["template"]
# Private-use characters: stand-ins for message contents that no template or dataset produces.
PLACEHOLDER = "\ue000{}\ue001"
PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class TokenizedInstance:
    token_ids: np.ndarray  # int32 [n]
    roles: np.ndarray  # uint8 [n], codes from ROLE_CODE
    source_row: int
    truncated_tokens: int = 0  # tokens cut off at max_len
    changes: tuple[tuple[str, int], ...] = ()  # what was adapted to the chat template, counted (chat.CHANGES)


Span = tuple[int, int, int]  # (start, end, role code): characters of the rendered chat


def _render(tokenizer, chat: list[dict], source_row: int, tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(chat, tools=tools, tokenize=False)
    except Exception as error:  # templates raise on what they refuse (roles that do not alternate, ...)
        raise UserError(f"the chat template cannot render row {source_row}: {first_line(error)}") from None


def _piece_spans(piece: Piece, start: int, stripped: bool) -> list[Span]:
    """The spans of a piece inserted at `start` (stripped of outer whitespace when the template strips it)."""
    shift = len(piece.text) - len(piece.text.lstrip()) if stripped else 0
    length = len(piece.text.strip()) if stripped else len(piece.text)
    spans = [(start, start + length, ROLE_CODE[piece.role])]
    for inner_start, inner_end, role in piece.inner:
        inner_start, inner_end = max(inner_start - shift, 0), min(inner_end - shift, length)
        if inner_end > inner_start:
            spans.append((start + inner_start, start + inner_end, ROLE_CODE[role]))
    return spans


def _skeleton(tokenizer, chat: Chat, source_row: int) -> tuple[list[dict], str]:
    """The chat with a placeholder for each piece of text, and its rendering. Empty texts stay empty: templates
    test a content's truth (Qwen3 writes a newline before a call only after a content)."""
    skeleton_chat = [dict(turn) for turn in chat.messages]
    for index, piece in enumerate(chat.pieces):
        if piece.text:
            skeleton_chat[piece.message][piece.key] = PLACEHOLDER.format(index)
    return skeleton_chat, _render(tokenizer, skeleton_chat, source_row, chat.tools)


def _left_out(chat: Chat, skeleton: str) -> int:
    """Reasoning the template does not render (Qwen3's renders it only after the last user turn)."""
    return sum(1 for index, piece in enumerate(chat.pieces)
               if piece.role == "reasoning" and piece.text and PLACEHOLDER.format(index) not in skeleton)


def _exact_spans(tokenizer, chat: Chat, skeleton_chat: list[dict], skeleton: str, rendered: str,
                 source_row: int) -> list[Span] | None:
    """Spans found by rendering a placeholder per piece of text (_skeleton) and putting the texts back in their
    place.

    Exact whenever the template inserts each text verbatim (or stripped, as Llama 3's does): the
    rebuilt string must equal the real rendering, else None. Text search alone could match a short content
    ("user") inside a role header.
    """
    parts = PLACEHOLDER_RE.split(skeleton)  # [template, index, template, index, ..., template]
    indices = [int(index) for index in parts[1::2]]
    if indices != sorted(set(indices)):  # a template that repeats or reorders texts
        return None
    for stripped in (False, True):
        spans, out, length = [], [], 0
        shifts = []  # (start in the skeleton, start in the rendering) of each template part
        in_skeleton = 0
        for part_at, part in enumerate(parts):
            if part_at % 2:
                piece = chat.pieces[int(part)]
                spans += _piece_spans(piece, length, stripped)
                in_skeleton += len(PLACEHOLDER.format(part))
                part = piece.text.strip() if stripped else piece.text
            else:
                shifts.append((in_skeleton, length))
                in_skeleton += len(part)
            out.append(part)
            length += len(part)
        if "".join(out) == rendered:
            return spans + _call_spans(tokenizer, skeleton_chat, skeleton, shifts, source_row, chat.tools)
    return None


def _call_spans(tokenizer, skeleton_chat: list[dict], skeleton: str, shifts: list[tuple[int, int]],
                source_row: int, tools) -> list[Span]:
    """The text a template writes for an assistant turn's tool calls (its own markup included: the model writes
    it), as 'assistant' spans: what changes in the rendering when that turn's calls are taken away."""
    spans = []
    for index, turn in enumerate(skeleton_chat):
        if turn["role"] != "assistant" or not turn.get("tool_calls"):
            continue
        without = [dict(other) for other in skeleton_chat]
        del without[index]["tool_calls"]
        plain = _render(tokenizer, without, source_row, tools)
        prefix = len(os.path.commonprefix([skeleton, plain]))
        suffix = len(os.path.commonprefix([skeleton[prefix:][::-1], plain[prefix:][::-1]]))
        start, end = prefix, len(skeleton) - suffix
        if end <= start or plain != skeleton[:start] + skeleton[end:] or \
                any(mark in skeleton[start:end] for mark in "\ue000\ue001"):
            continue  # the calls are not one stretch of template text: left 'template'
        # an insertion can slide where its ends repeat: take the leftmost ("<tool_call>...", not "tool_call>...<")
        while start > 0 and skeleton[start - 1] == skeleton[end - 1]:
            start, end = start - 1, end - 1
        at_skeleton, at_rendered = max((shift for shift in shifts if shift[0] <= start), default=(0, 0))
        spans.append((at_rendered + start - at_skeleton, at_rendered + end - at_skeleton, ROLE_CODE["assistant"]))
    return spans


def _searched_spans(pieces: Sequence[Piece], rendered: str, cursor: int) -> list[Span]:
    """Fallback for templates that rewrite texts: find each piece left to right after `cursor`.

    A text the template changed is not found and its tokens stay 'template'.
    """
    spans = []
    for piece in pieces:
        for stripped in (False, True):
            content = piece.text.strip() if stripped else piece.text
            start = rendered.find(content, cursor) if content else -1
            if start >= 0:
                spans += _piece_spans(piece, start, stripped)
                cursor = start + len(content)
                break
    return spans


def _injected_system_span(tokenizer, messages: Sequence[dict], rendered: str) -> Span | None:
    """A default system prompt the template adds when the dialogue has none (SmolLM2 and Qwen do).

    Rendering a lone system message shows what surrounds a system prompt (head, tail); when the real
    rendering starts with that head although the dialogue has no system message, what lies between head
    and tail is the injected prompt. Templates without injection (or that refuse a lone system
    message) give None and those tokens stay 'template'.
    """
    if not messages or messages[0]["role"] == "system":
        return None
    probe = PLACEHOLDER.format("system")
    try:
        alone = tokenizer.apply_chat_template([{"role": "system", "content": probe}], tokenize=False)
    except Exception:
        return None
    if alone.count(probe) != 1:
        return None
    head, tail = alone.split(probe)
    end = rendered.find(tail, len(head)) if head and tail and rendered.startswith(head) else -1
    return (len(head), end, ROLE_CODE["system"]) if end > len(head) else None


def _roles_from_offsets(offsets: Sequence[tuple[int, int]], spans: list[Span]) -> np.ndarray:
    roles = np.full(len(offsets), TEMPLATE, dtype=np.uint8)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    for span_start, span_end, code in spans:
        # a token takes a message's role only when it lies wholly inside its content; zero-width tokens
        # and tokens that straddle a content boundary stay 'template'
        inside = (starts >= span_start) & (ends <= span_end) & (ends > starts)
        roles[inside] = code
    return roles


def tokenize_dialogue(tokenizer, messages: Sequence[Message], max_len: int | None, source_row: int = 0,
                      tools: Sequence[dict] | None = None, system_prompt: str = "merge") -> TokenizedInstance:
    """A dialogue rendered with the tokenizer's chat template (fitted to it: chat.py), with a role per token, cut at
    max_len."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template: dialogues need one (use a plain-text dataset)")
    chat = build_chat(tokenizer, messages, tools, system_prompt, source_row)
    rendered = _render(tokenizer, chat.messages, source_row, chat.tools)
    # the template writes BOS itself where the model wants one, so add no special tokens here
    encoding = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    # a tools list the template renders sits where a default system prompt would: not taken for one
    injected = None if chat.tools and template_traits(tokenizer).tools else \
        _injected_system_span(tokenizer, chat.messages, rendered)
    skeleton_chat, skeleton = _skeleton(tokenizer, chat, source_row)
    chat.changes["reasoning left out"] += _left_out(chat, skeleton)
    spans = _exact_spans(tokenizer, chat, skeleton_chat, skeleton, rendered, source_row)
    if spans is None:
        spans = _searched_spans(chat.pieces, rendered, injected[1] if injected else 0)
    roles = _roles_from_offsets(encoding["offset_mapping"], spans + ([injected] if injected else []))
    token_ids = np.asarray(encoding["input_ids"], dtype=np.int32)
    cut = 0 if max_len is None else max(len(token_ids) - max_len, 0)
    return TokenizedInstance(token_ids[:max_len], roles[:max_len], source_row, cut,
                             tuple(sorted((key, n) for key, n in chat.changes.items() if n)))


def tokenize_text(tokenizer, text: str, max_len: int | None, source_row: int = 0) -> TokenizedInstance:
    """Plain text encoded as the tokenizer does by default: a BOS only where it adds one (Llama yes, GPT-2 and
    SmolLM2 no). Such added special tokens get role 'template', the text's own tokens 'text'."""
    encoding = tokenizer(text, return_special_tokens_mask=True, verbose=False)
    all_ids = encoding["input_ids"]
    token_ids = np.asarray(all_ids, dtype=np.int32)[:max_len]
    special = np.asarray(encoding["special_tokens_mask"], dtype=bool)[:max_len]
    roles = np.where(special, TEMPLATE, ROLE_CODE["text"]).astype(np.uint8)
    return TokenizedInstance(token_ids, roles, source_row, len(all_ids) - len(token_ids))


def tokenize_record(tokenizer, record: Record, max_len: int | None, system_prompt: str = "merge") -> TokenizedInstance:
    if record.messages is not None:
        return tokenize_dialogue(tokenizer, record.messages, max_len, record.source_row, record.tools, system_prompt)
    return tokenize_text(tokenizer, record.text, max_len, record.source_row)


def fast_instances(records: Iterable[Record], tokenizer, max_len: int,
                   system_prompt: str = "merge") -> Iterator[TokenizedInstance]:
    """FAST: one sequence per record, truncated at max_len; no token of one record is in another's."""
    for record in records:
        yield tokenize_record(tokenizer, record, max_len, system_prompt)


def bt_blocks(records: Iterable[Record], tokenizer, block_len: int,
              system_prompt: str = "merge") -> Iterator[TokenizedInstance]:
    """Block training: documents joined by EOS into one stream, cut into consecutive blocks of block_len.

    Dialogues are rendered with the chat template (BT(F)), texts encoded plainly (BT(P)). The EOS after
    each document has role 'template'. The final partial block is dropped, as block training does. A
    block's source_row is the row of its first token; what was adapted to the template in a document is counted
    with the first block that holds its tokens. Only the tokens of one unfinished block and the current document
    are held in memory.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token to separate documents in BT mode")
    separator_ids = np.array([eos], dtype=np.int32)
    separator_roles = np.array([TEMPLATE], dtype=np.uint8)
    ids: list[np.ndarray] = []
    roles: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    buffered = 0
    changes: Counter = Counter()
    for record in records:
        document = tokenize_record(tokenizer, record, None, system_prompt)
        changes.update(dict(document.changes))
        ids += [document.token_ids, separator_ids]
        roles += [document.roles, separator_roles]
        rows.append(np.full(len(document.token_ids) + 1, record.source_row, dtype=np.int64))
        buffered += len(document.token_ids) + 1
        if buffered < block_len:
            continue
        stream_ids, stream_roles, stream_rows = np.concatenate(ids), np.concatenate(roles), np.concatenate(rows)
        n_full = len(stream_ids) // block_len * block_len
        for start in range(0, n_full, block_len):
            block = slice(start, start + block_len)
            yield TokenizedInstance(stream_ids[block], stream_roles[block], int(stream_rows[start]),
                                    changes=tuple(sorted(changes.items())))
            changes = Counter()
        ids, roles, rows = [stream_ids[n_full:]], [stream_roles[n_full:]], [stream_rows[n_full:]]
        buffered = len(stream_ids) - n_full
