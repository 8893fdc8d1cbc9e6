"""One dataset row -> one Record (a dialogue or a plain text), or the reason it cannot be used. Pure functions.

Which column holds the data is decided once per dataset (`detect_column`, from the first row's keys, or
--prompt-column/--response-column for pairs; --system-column adds a system turn); each row is then read from those
columns. Speakers go through one table (ROLE_TABLE) to the roles the store codes (schemas.manifest.ROLES). A turn
keeps what a chat template may render besides its text: reasoning, tool calls, a tool turn's name and call id; a
row keeps its tools list (what becomes of them is chat.py's business). A row that cannot be used is not an error:
it is skipped with a reason (SKIP_REASONS) and the reasons are counted and reported once.
"""

import json
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
PAIR = "prompt/response"  # --prompt-column and --response-column
TEXT_COLUMN = "text"
# A string in one of these is tried as an HH-style transcript ("\n\nHuman: ... \n\nAssistant: ...") first.
TRANSCRIPT_COLUMNS = DIALOGUE_COLUMNS + ("rejected",)
TOOLS_COLUMN = "tools"  # a row's tool definitions, given to the chat template as apply_chat_template's tools=
# Columns that look like dialogue content: those a dataset has but the reading leaves unused are named in the report.
CONTENT_LIKE_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt", "response", "completion",
                        "system", "system_prompt", "instruction", "input", "output", "question", "answer", "query",
                        "text", "tools", "reasoning")
ROLE_KEYS = ("role", "from")
CONTENT_KEYS = ("content", "value")

SKIP_REASONS = ("empty", "unknown role", "no text", "malformed", "cut off")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    reasoning: str | None = None  # an assistant turn's `reasoning_content`
    tool_calls: tuple[dict, ...] | None = None  # an assistant turn's calls: {"type": "function", "function": {...}}
    name: str | None = None  # a tool turn: the tool that answered
    tool_call_id: str | None = None  # a tool turn: the call it answers


@dataclass(frozen=True)
class Record:
    """Exactly one of `messages` (a dialogue, rendered with the chat template) or `text` (plain text)."""

    source_row: int
    messages: tuple[Message, ...] | None = None
    text: str | None = None
    conversation: str | None = None  # rows that share it are parts of one conversation (ShareGPT's split)
    tools: tuple[dict, ...] | None = None  # the row's tool definitions (a dialogue only)

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

    column: str  # a column name, or ALPACA, or PAIR
    role_key: str | None = None
    content_key: str | None = None
    system_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None

    def used_columns(self, keys) -> set[str]:
        """The columns of `keys` this reading takes anything from."""
        used = {self.column, self.system_column, self.prompt_column, self.response_column, TOOLS_COLUMN,
                "conversation", "id"}
        if self.column == ALPACA:
            used |= {"instruction", "input", "output"}
        if self.column in DIALOGUE_COLUMNS:
            used.add(TEXT_COLUMN)  # plain-text rows in a file dedup wrote
        return used & set(keys)

    def unused_columns(self, keys) -> list[str]:
        """Columns that look like dialogue content (CONTENT_LIKE_COLUMNS) and that this reading leaves unused."""
        used = self.used_columns(keys)
        return [key for key in keys if key in CONTENT_LIKE_COLUMNS and key not in used]


def check_columns(keys, named: dict[str, str | None], where: str) -> None:
    """Every column named by an option ({"--system-column": "sys", ...}) is one the dataset has."""
    keys = list(keys)
    for option, column in named.items():
        if column is not None and column not in keys:
            raise UserError(f"{option} {column}: {where} has no such column (columns: {', '.join(keys) or 'none'})")


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
        extras = turn_extras(turn, role)
        if isinstance(extras, Skip):
            return extras
        messages.append(Message(role, content, **extras))
    if not any(message.content.strip() or message.tool_calls or message.reasoning for message in messages):
        return Skip("empty")
    return tuple(messages)


def _json_value(value):
    """A JSON string (how many datasets keep tool arguments and tool lists) parsed; anything else as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def tool_call(call) -> dict | None:
    """One call in the shape chat templates read ({"type": "function", "function": {"name", "arguments"}}, plus
    its "id"), from OpenAI's (arguments as a JSON string) or a bare {"name", "arguments"}; None if malformed."""
    if not isinstance(call, dict):
        return None
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    shaped = {"type": "function", "function": {"name": function["name"],
                                               "arguments": _json_value(function.get("arguments", {}))}}
    if isinstance(call.get("id"), str):
        shaped["id"] = call["id"]
    return shaped


def turn_extras(turn: dict, role: str) -> dict | Skip:
    """A turn's fields beyond role and content: reasoning, tool calls, a tool turn's name and call id."""
    extras = {}
    reasoning = next((turn[key] for key in ("reasoning_content", "reasoning") if turn.get(key) is not None), None)
    if reasoning is not None:
        if not isinstance(reasoning, str):
            return Skip("malformed")
        extras["reasoning"] = reasoning
    calls = _json_value(turn.get("tool_calls"))
    if calls:
        shaped = [tool_call(call) for call in calls] if isinstance(calls, list) else [None]
        if None in shaped:
            return Skip("malformed")
        extras["tool_calls"] = tuple(shaped)
    for key in ("name", "tool_call_id") if role == "tool" else ():
        if isinstance(turn.get(key), str):
            extras[key] = turn[key]
    return extras


def row_tools(row: dict) -> tuple[dict, ...] | None:
    """The row's `tools` list (JSON text or a list of definitions), None when it has none or it is not a list."""
    tools = _json_value(row.get(TOOLS_COLUMN))
    if isinstance(tools, list) and tools and all(isinstance(tool, dict) for tool in tools):
        return tuple(tools)
    return None


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


def _side(value, role: str, fmt: RowFormat) -> tuple[Message, ...] | Skip:
    """One side of a prompt/response pair: a string is one turn of `role`, a list of turns is read as a dialogue."""
    if isinstance(value, str):
        return (Message(role, value),) if value.strip() else Skip("empty")
    if value is None:
        return Skip("empty")
    return dialogue(value, fmt)


def _pair(row: dict, fmt: RowFormat) -> tuple[Message, ...] | Skip:
    prompt = _side(row.get(fmt.prompt_column), "user", fmt)
    if isinstance(prompt, Skip):
        return prompt
    response = _side(row.get(fmt.response_column), "assistant", fmt)
    return response if isinstance(response, Skip) else prompt + response


def _with_system(messages: tuple[Message, ...], row: dict, fmt: RowFormat) -> tuple[Message, ...] | Skip:
    """--system-column: the row's system prompt becomes the first turn, in place of one the dialogue has. An empty
    value leaves the dialogue as it is."""
    value = row.get(fmt.system_column)
    if value is None or (isinstance(value, str) and not value.strip()):
        return messages
    if not isinstance(value, str):
        return Skip("malformed")
    return (Message("system", value),) + (messages[1:] if messages[0].role == "system" else messages)


def _messages(row: dict, fmt: RowFormat) -> tuple[Message, ...] | str | Skip:
    """The row's dialogue, or its plain text (a str), or why neither."""
    if fmt.column == ALPACA:
        return _alpaca(row)
    if fmt.column == PAIR:
        return _pair(row, fmt)
    value = row.get(fmt.column)
    turns_expected = fmt.column in TURN_COLUMNS
    if value is None and isinstance(row.get(TEXT_COLUMN), str):  # plain text in a `messages` file dedup wrote
        value, turns_expected = row[TEXT_COLUMN], False
    if isinstance(value, str):  # plain text, or an HH-style transcript in a dialogue column
        messages = transcript(value) if fmt.column in TRANSCRIPT_COLUMNS else None
        if messages is None and turns_expected:
            # a string where turns belong (not a transcript): stored as plain text it would pass for a dialogue
            return Skip("malformed") if value.strip() else Skip("empty")
        if messages is None:
            return value if value.strip() else Skip("empty")
        return messages
    return dialogue(value, fmt)


def normalize_row(row, index: int, fmt: RowFormat) -> Record | Skip:
    """A Record from row number `index`, or why it cannot be used."""
    if not isinstance(row, dict):
        return Skip("malformed")
    messages = _messages(row, fmt)
    if isinstance(messages, str):
        return Record(index, text=messages)
    if isinstance(messages, Skip):
        return messages
    if fmt.system_column is not None:
        messages = _with_system(messages, row, fmt)
        if isinstance(messages, Skip):
            return messages
    conversation = row.get("conversation") if isinstance(row.get("conversation"), str) else None
    if fmt.column == "conversations":
        conversation = sharegpt_conversation(row.get("id"))
    return Record(index, messages=messages, conversation=conversation, tools=row_tools(row))
