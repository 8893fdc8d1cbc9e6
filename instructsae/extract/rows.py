"""One dataset row -> one Record (a dialogue or a plain text), or the reason it cannot be used. Pure functions.

Which column holds the data is decided once per dataset (`detect_column`, from the first row's keys); each row
is then read from that column. Speakers go through one table (ROLE_TABLE) to the roles the store codes
(schemas.manifest.ROLES). A row that cannot be used is not an error: it is skipped with a reason (SKIP_REASONS)
and the reasons are counted and reported once.
"""

import re
from dataclasses import dataclass

from instructsae.errors import UserError

# Speaker names seen in the wild -> the role a chat template is given. ShareGPT V3 has human/gpt/system and a few
# user/chatgpt/bing/bard; OpenAI has developer and tool, older APIs function, Llama 3.1 ipython.
ROLE_TABLE = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "ipython": "tool",
}
# Columns tried in order when --column is not given; instruction/input/output is the Alpaca triple.
DIALOGUE_COLUMNS = ("messages", "conversations", "chosen")
TURN_COLUMNS = ("messages", "conversations")  # a list of turns or nothing (`chosen` may be an HH transcript)
ALPACA = "instruction/input/output"
TEXT_COLUMN = "text"
ROLE_KEYS = ("role", "from")
CONTENT_KEYS = ("content", "value")

SKIP_REASONS = ("empty", "unknown role", "no text", "malformed", "cut off")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str


@dataclass(frozen=True)
class Record:
    """Exactly one of `messages` (a dialogue, rendered with the chat template) or `text` (plain text)."""

    source_row: int
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    conversation: str | None = None  # rows that share it are parts of one conversation (ShareGPT's split)

    def __post_init__(self):
        if (self.messages is None) == (self.text is None):
            raise ValueError("a Record holds either messages or text")


@dataclass(frozen=True)
class Skip:
    """Why a row was not used: one of SKIP_REASONS, and for an unknown role its name (for the report)."""

    reason: str
    detail: str | None = None


@dataclass(frozen=True)
class RowFormat:
    """How to read every row of one dataset: the column, and the turn keys when they are forced."""

    column: str  # a column name, or ALPACA
    role_key: str | None = None
    content_key: str | None = None


def detect_column(keys, column: str | None, where: str) -> str:
    """The dialogue or text column of a dataset whose rows have `keys`; --column wins when it is there."""
    keys = list(keys)
    if column is not None:
        if column not in keys:
            raise UserError(f"--column {column}: {where} has no such column (columns: {', '.join(keys) or 'none'})")
        return column
    for name in DIALOGUE_COLUMNS:
        if name in keys:
            return name
    if "instruction" in keys and "output" in keys:
        return ALPACA
    if TEXT_COLUMN in keys:
        return TEXT_COLUMN
    raise UserError(f"{where} has no 'messages', 'conversations', 'chosen', 'instruction'+'output' or 'text' "
                    f"column (columns: {', '.join(map(str, keys)) or 'none'}); name one with --column")


# ---------------------------------------------------------------- turns


def content_text(value) -> str | Skip:
    """A turn's text: a string; OpenAI content parts keep their text parts; None (a tool-call turn) is empty."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        if not all(isinstance(part, dict) for part in value):
            return Skip("malformed")
        texts = [part.get("text") for part in value if part.get("type", "text") == "text"]
        if not texts and value:
            return Skip("no text")  # only images, audio...: nothing a text LM reads
        if not all(isinstance(text, str) for text in texts):
            return Skip("malformed")
        return "".join(texts)
    return Skip("malformed")


def _turn_key(turn: dict, forced: str | None, candidates: tuple[str, ...]) -> str | None:
    if forced is not None:
        return forced
    return next((key for key in candidates if turn.get(key) is not None), None)


def dialogue(turns, fmt: RowFormat) -> tuple[Message, ...] | Skip:
    """Messages from a list of turns ({role, content} or {from, value}, or the keys fmt forces)."""
    if turns is None or (isinstance(turns, list) and not turns):
        return Skip("empty")
    if not isinstance(turns, list):
        return Skip("malformed")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return Skip("malformed")
        role_key = _turn_key(turn, fmt.role_key, ROLE_KEYS)
        content_key = _turn_key(turn, fmt.content_key, CONTENT_KEYS)
        speaker = turn.get(role_key) if role_key else None
        if not isinstance(speaker, str):
            return Skip("malformed")
        role = ROLE_TABLE.get(speaker.strip().lower())
        if role is None:
            return Skip("unknown role", speaker)
        content = content_text(turn.get(content_key) if content_key else None)
        if isinstance(content, Skip):
            return content
        messages.append(Message(role, content))
    if not any(message.content.strip() for message in messages):
        return Skip("empty")
    return tuple(messages)


# Anthropic HH-RLHF keeps `chosen` as one transcript: "\n\nHuman: ...\n\nAssistant: ..."
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ")


def transcript(text: str) -> tuple[Message, ...] | None:
    """Turns of an HH-style transcript, None when the text is not one."""
    parts = _TRANSCRIPT_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return tuple(Message("user" if speaker == "Human" else "assistant", said)
                 for speaker, said in zip(parts[1::2], parts[2::2]))


def _alpaca(row: dict) -> tuple[Message, ...] | Skip:
    parts = [row.get("instruction"), row.get("input")]
    output = row.get("output")
    if not all(part is None or isinstance(part, str) for part in parts) or not isinstance(output, (str, type(None))):
        return Skip("malformed")
    prompt = "\n\n".join(part for part in parts if part and part.strip())
    if not prompt or not output or not output.strip():
        return Skip("empty")
    return Message("user", prompt), Message("assistant", output)


def sharegpt_conversation(row_id) -> str | None:
    """ShareGPT's cleaned split cuts long conversations into consecutive rows `<id>_<part>`: their `<id>`."""
    return re.sub(r"_\d+$", "", row_id) if isinstance(row_id, str) else None


# ---------------------------------------------------------------- one row


def normalize_row(row, index: int, fmt: RowFormat) -> Record | Skip:
    """A Record from row number `index`, or why it cannot be used."""
    if not isinstance(row, dict):
        return Skip("malformed")
    if fmt.column == ALPACA:
        messages = _alpaca(row)
        return messages if isinstance(messages, Skip) else Record(index, messages=messages)
    value = row.get(fmt.column)
    turns_expected = fmt.column in TURN_COLUMNS
    if value is None and isinstance(row.get(TEXT_COLUMN), str):  # plain text in a `messages` file dedup wrote
        value, turns_expected = row[TEXT_COLUMN], False
    if isinstance(value, str):  # plain text, or an HH-style transcript in a dialogue column
        messages = transcript(value) if fmt.column in DIALOGUE_COLUMNS else None
        if messages is None and turns_expected:
            # a string where turns belong (not a transcript): stored as plain text it would pass for a dialogue
            return Skip("malformed") if value.strip() else Skip("empty")
        if messages is None:
            return Record(index, text=value) if value.strip() else Skip("empty")
    else:
        messages = dialogue(value, fmt)
        if isinstance(messages, Skip):
            return messages
    conversation = row.get("conversation") if isinstance(row.get("conversation"), str) else None
    if fmt.column == "conversations":
        conversation = sharegpt_conversation(row.get("id"))
    return Record(index, messages=messages, conversation=conversation)
