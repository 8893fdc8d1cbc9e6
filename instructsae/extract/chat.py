"""A dialogue -> what its chat template is given, fitted to what that template can render. Pure functions but for
the probe renderings, which are cached per template text.

What a template can render is decided from the template itself, by rendering probe dialogues (TemplateTraits),
never from a model's name. Where it cannot render something the dialogue holds:

- a system turn (Gemma's and older Mistral's templates raise on one): `--system-prompt merge` puts its text at the
  head of the next user turn, as those families' guides advise; `drop` leaves it out; `refuse` stops, naming the row;
- an assistant turn's `tool_calls` (SmolLM2's ChatML template ignores them): each call is written as one line of
  JSON text at the end of the turn, never dropped;
- an assistant turn's `reasoning_content`: written before the answer as <think>...</think> text;
- a tool turn (Gemma's templates have no tool role and raise on one): given as a user turn, joined to the user turn
  next to it (roles must alternate there).
A template that renders reasoning is given <think>...</think> found inline in a content as `reasoning_content` (as
Qwen3's template itself splits it). A row's `tools` list goes to every template as apply_chat_template's tools=;
where the template ignores it, that is counted.

Every text the template is given is a Piece whose characters carry roles (a merged system prompt keeps 'system',
a tool result given as a user turn keeps 'tool', reasoning gets 'reasoning'), so instances.py can give each token
its role. Each adaptation is counted per dialogue (Chat.changes) for the manifest and the end-of-run report.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from instructsae.errors import UserError
from instructsae.extract.rows import Message

MERGE_SEPARATOR = "\n\n"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# reasoning at the head of a content: "<think>...</think>answer", or "...</think>answer" (the template opened it)
_INLINE_THINK = re.compile(r"^(\s*<think>)?(.*?)</think>", re.DOTALL)

# What each counted adaptation is, for the report: key -> (what happened, unit counted)
CHANGES = {
    "system merged": ("system prompt merged into the first user turn (the template has no system role)", "row"),
    "system dropped": ("system prompt dropped (the template has no system role; --system-prompt drop)", "row"),
    "tool calls as text": ("tool calls written as JSON text in the assistant turn (the template ignores "
                           "tool_calls)", "call"),
    "tools not rendered": ("tools list not stored (the template ignores tools)", "row"),
    "reasoning as text": ("reasoning_content written as <think>...</think> text before the answer (the template "
                          "ignores it)", "turn"),
    "reasoning left out": ("reasoning of earlier turns left out by the template (as Qwen3's renders only the "
                           "turns after the last user turn)", "turn"),
    "tool turns as user turns": ("tool results given to the template as user turns (it has no tool role; their "
                                 "tokens keep the tool role)", "turn"),
}


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template renders, found by rendering probes."""

    system: bool  # a system turn's text
    tool_calls: bool  # an assistant turn's tool_calls
    tools: bool  # apply_chat_template's tools=
    reasoning: bool  # an assistant turn's reasoning_content
    tool_role: bool  # a turn of role 'tool'


@dataclass(frozen=True)
class Piece:
    """A text given to the template in one place: message `message`'s field `key` (content or reasoning_content).
    Its characters have role `role`, but for `inner` (start, end, role) ranges of the text."""

    message: int
    key: str
    text: str
    role: str
    inner: tuple[tuple[int, int, str], ...] = ()


@dataclass
class Chat:
    """What apply_chat_template is given (messages, tools) and where each text of it came from."""

    messages: list[dict]
    pieces: list[Piece]
    tools: list[dict] | None = None
    changes: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------- probing the template

_PROBE = "\ue010{}\ue011"  # private-use characters no template writes
_PROBE_CALL = "instructsae_probe_call"
_PROBE_TOOL = "instructsae_probe_tool"


def _renders(tokenizer, messages: list[dict], wanted: str, **kwargs) -> bool:
    try:
        return wanted in tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception:  # a template that raises on the probe cannot render it
        return False


@lru_cache(maxsize=16)
def _traits(tokenizer, template: str) -> TemplateTraits:
    user = {"role": "user", "content": _PROBE.format("user")}
    call = {"type": "function", "function": {"name": _PROBE_CALL, "arguments": {"x": 1}}}
    tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    return TemplateTraits(
        system=_renders(tokenizer, [{"role": "system", "content": _PROBE.format("system")}, user],
                        _PROBE.format("system")),
        tool_calls=_renders(tokenizer, [user, {"role": "assistant", "content": "A", "tool_calls": [call]}],
                            _PROBE_CALL),
        tools=_renders(tokenizer, [user], _PROBE_TOOL, tools=[tool]),
        reasoning=_renders(tokenizer, [user, {"role": "assistant", "content": "A",
                                              "reasoning_content": _PROBE.format("reasoning")}],
                           _PROBE.format("reasoning")),
        tool_role=_renders(tokenizer, [user, {"role": "assistant", "content": "A"},
                                       {"role": "tool", "content": _PROBE.format("tool")}], _PROBE.format("tool")),
    )


def template_traits(tokenizer) -> TemplateTraits:
    """What the tokenizer's chat template renders (computed once per template text)."""
    return _traits(tokenizer, tokenizer.chat_template)


def system_policy_applies(tokenizer) -> bool:
    """Whether --system-prompt changes anything for this tokenizer: its template has no system role."""
    return bool(getattr(tokenizer, "chat_template", None)) and not template_traits(tokenizer).system


# ---------------------------------------------------------------- fitting a dialogue to it


@dataclass
class _Turn:
    """A turn as the template gets it: its role, and its text as (role of the characters, text) segments that are
    joined by MERGE_SEPARATOR (a merged system prompt, the turn's own text); `message` holds its other fields."""

    role: str
    segments: list[tuple[str, str]]
    message: Message
    folded: bool = False  # a tool result given as a user turn


def _turns(messages) -> list[_Turn]:
    return [_Turn(message.role, [(message.role, message.content)], message) for message in messages]


def _merge_systems(turns: list[_Turn], policy: str, source_row: int, changes: Counter) -> list[_Turn]:
    """System turns (on a template without a system role) merged into the next user turn, or dropped, or refused."""
    if not any(turn.role == "system" for turn in turns):
        return turns
    if policy == "refuse":
        raise UserError(f"row {source_row} has a system prompt and the chat template has no system role: "
                        "--system-prompt merge puts it at the head of the first user turn, drop leaves it out")
    changes["system merged" if policy == "merge" else "system dropped"] += 1
    if policy == "drop":
        return [turn for turn in turns if turn.role != "system"]
    out, pending = [], []
    for turn in turns:
        if turn.role == "system":
            pending.append(("system", turn.message.content.strip()))
        elif turn.role == "user" and pending:
            out.append(_Turn("user", pending + turn.segments, turn.message))
            pending = []
        else:
            out.append(turn)
    if pending:  # no user turn after it: the last user turn before takes it, or a user turn of its own
        users = [index for index, turn in enumerate(out) if turn.role == "user"]
        if users:
            out[users[-1]].segments[:0] = pending
        else:
            out.insert(0, _Turn("user", pending, Message("user", "")))
    return out


def _fold_tools(turns: list[_Turn], changes: Counter) -> list[_Turn]:
    """Tool turns (on a template without a tool role) given as user turns, joined to an adjacent user turn."""
    out: list[_Turn] = []
    for turn in turns:
        if turn.role == "tool":
            changes["tool turns as user turns"] += 1
            turn = _Turn("user", turn.segments, Message("user", turn.message.content), folded=True)
        if turn.role == "user" and out and out[-1].role == "user" and (turn.folded or out[-1].folded):
            out[-1] = _Turn("user", out[-1].segments + turn.segments, turn.message, folded=True)
        else:
            out.append(turn)
    return out


def _joined(segments: list[tuple[str, str]]) -> tuple[str, tuple[tuple[int, int, str], ...]]:
    """The text of a turn's segments and the role of each stretch of it (separators are ours: 'template')."""
    text, inner = "", []
    for role, part in ((role, part) for role, part in segments if part):
        if text:
            inner.append((len(text), len(text) + len(MERGE_SEPARATOR), "template"))
            text += MERGE_SEPARATOR
        inner.append((len(text), len(text) + len(part), role))
        text += part
    return text, tuple(inner)


def _inline_reasoning(content: str) -> tuple[str, str] | None:
    """(reasoning, answer) of a content that opens with <think>...</think>, as Qwen3's template splits it."""
    match = _INLINE_THINK.match(content)
    if match is None or (match.group(1) is None and THINK_OPEN in match.group(2)):
        return None
    return match.group(2).strip("\n"), content[match.end():].lstrip("\n")


def _call_text(call: dict) -> str:
    function = call["function"]
    written = {"name": function["name"], "arguments": function["arguments"]}
    if "id" in call:
        written["id"] = call["id"]
    return json.dumps(written, ensure_ascii=False)


def _assistant(message: Message, traits: TemplateTraits, changes: Counter) -> tuple[dict, str, str, tuple]:
    """The fields an assistant turn is given: (extra fields, reasoning, content, inner roles of the content)."""
    extra, reasoning, content, inner = {}, message.reasoning, message.content, ()
    if reasoning is None and THINK_CLOSE in content:
        split = _inline_reasoning(content) if traits.reasoning else None
        if split is not None:
            reasoning, content = split
        else:  # kept as it is; the think part of it is reasoning
            match = _INLINE_THINK.match(content)
            if match is not None:
                inner = ((len(content) - len(content.lstrip()), match.end(), "reasoning"),)
    if reasoning is not None and not traits.reasoning:
        head = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}"
        inner = ((0, len(head), "reasoning"), (len(head), len(head) + len(MERGE_SEPARATOR), "template"))
        content, reasoning = f"{head}{MERGE_SEPARATOR}{content}" if content else head, None
        changes["reasoning as text"] += 1
    if message.tool_calls:
        if traits.tool_calls:
            extra["tool_calls"] = [dict(call) for call in message.tool_calls]
        else:
            calls = "\n".join(_call_text(call) for call in message.tool_calls)
            content = f"{content}\n{calls}" if content.strip() else calls
            changes["tool calls as text"] += len(message.tool_calls)
    return extra, reasoning, content, inner


def build_chat(tokenizer, messages, tools, policy: str, source_row: int) -> Chat:
    """The dialogue as its template is to be given it (see the module's docstring)."""
    traits = template_traits(tokenizer)
    changes: Counter = Counter()
    turns = _turns(messages)
    if not traits.system:
        turns = _merge_systems(turns, policy, source_row, changes)
    if not traits.tool_role:
        turns = _fold_tools(turns, changes)
    chat, pieces = [], []
    for index, turn in enumerate(turns):
        given = {"role": turn.role}
        content, inner = _joined(turn.segments)
        if turn.role == "assistant":
            extra, reasoning, content, inner = _assistant(turn.message, traits, changes)
            given.update(extra)
            if reasoning is not None:
                given["reasoning_content"] = reasoning
                pieces.append(Piece(index, "reasoning_content", reasoning, "reasoning"))
        given["content"] = content
        pieces.append(Piece(index, "content", content, turn.role, inner))
        if turn.role == "tool":
            given.update({key: getattr(turn.message, key) for key in ("name", "tool_call_id")
                          if getattr(turn.message, key)})
        chat.append(given)
    if tools and not traits.tools:
        changes["tools not rendered"] += 1
    return Chat(chat, pieces, list(tools) if tools else None, changes)


def describe_changes(changes: dict[str, int]) -> str | None:
    """One line saying what was adapted to the template, and how often (None when nothing was)."""
    counts = [(key, changes.get(key, 0)) for key in CHANGES]  # in CHANGES' order, whatever the dict's
    said = [f"{CHANGES[key][0]}: {count:,} {CHANGES[key][1]}{'s' if count != 1 else ''}" for key, count in counts
            if count]
    return "; ".join(said) if said else None
