"""A dialogue -> what its chat template is given, fitted to what that template can render. Pure functions but for
the probe renderings, which are cached per template text.

What a template can render is decided from the template itself, by rendering probe dialogues (TemplateTraits),
never from a model's name. Where it cannot render something the dialogue holds:

- a system turn (Gemma's and older Mistral's templates raise on one): `--system-prompt merge` puts its text at the
  head of the next user turn, as those families' guides advise; `drop` leaves it out; `refuse` stops, naming the row;
- an assistant turn's `tool_calls` (SmolLM2's ChatML template ignores them): each call is written as one line of
  JSON text at the end of the turn, never dropped;
- an assistant turn's `reasoning_content`: written before the answer as <think>...</think> text.
A template that renders reasoning is given <think>...</think> found inline in a content as `reasoning_content` (as
Qwen3's template itself splits it). A row's `tools` list goes to every template as apply_chat_template's tools=;
where the template ignores it, that is counted.

Every text the template is given is a Piece whose characters carry roles (a merged system prompt keeps 'system',
reasoning gets 'reasoning'), so instances.py can give each token its role. Each adaptation is counted per dialogue
(Chat.changes) for the manifest and the end-of-run report.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from instructsae.errors import UserError
from instructsae.extract.rows import Message

SYSTEM_POLICIES = ("merge", "drop", "refuse")
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
}


@dataclass(frozen=True)
class TemplateTraits:
    """What a chat template renders, found by rendering probes."""

    system: bool  # a system turn's text
    tool_calls: bool  # an assistant turn's tool_calls
    tools: bool  # apply_chat_template's tools=
    reasoning: bool  # an assistant turn's reasoning_content


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
    )


def template_traits(tokenizer) -> TemplateTraits:
    """What the tokenizer's chat template renders (computed once per template text)."""
    return _traits(tokenizer, tokenizer.chat_template)


def system_policy_applies(tokenizer) -> bool:
    """Whether --system-prompt changes anything for this tokenizer: its template has no system role."""
    return bool(getattr(tokenizer, "chat_template", None)) and not template_traits(tokenizer).system


# ---------------------------------------------------------------- fitting a dialogue to it


def _merge_systems(messages: list[Message], policy: str, source_row: int, changes: Counter) -> list[tuple]:
    """(message, system text merged at its head) per turn, system turns removed by the policy."""
    if not any(message.role == "system" for message in messages):
        return [(message, "") for message in messages]
    if policy == "refuse":
        raise UserError(f"row {source_row} has a system prompt and the chat template has no system role: "
                        "--system-prompt merge puts it at the head of the first user turn, drop leaves it out")
    changes["system merged" if policy == "merge" else "system dropped"] += 1
    kept = [(message, "") for message in messages if message.role != "system"]
    if policy == "drop":
        return kept
    out, pending = [], []
    for message in messages:
        if message.role == "system":
            pending.append(message.content.strip())
        elif message.role == "user" and pending:
            out.append((message, MERGE_SEPARATOR.join(pending)))
            pending = []
        else:
            out.append((message, ""))
    if pending:  # no user turn after it: the last user turn before takes it, or a user turn of its own
        users = [index for index, (message, _) in enumerate(out) if message.role == "user"]
        if users:
            message, head = out[users[-1]]
            out[users[-1]] = (message, MERGE_SEPARATOR.join(filter(None, [head, *pending])))
        else:
            out.insert(0, (Message("user", ""), MERGE_SEPARATOR.join(pending)))
    return out


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
    turns = [(message, "") for message in messages] if traits.system else \
        _merge_systems(list(messages), policy, source_row, changes)
    chat, pieces = [], []
    for index, (message, system_head) in enumerate(turns):
        turn, inner = {"role": message.role}, ()
        content = message.content
        if system_head:
            content = f"{system_head}{MERGE_SEPARATOR}{content}" if content else system_head
            # the separator is ours, neither the system prompt nor the user's
            inner = ((0, len(system_head), "system"),
                     (len(system_head), len(system_head) + len(MERGE_SEPARATOR), "template"))
        if message.role == "assistant":
            extra, reasoning, content, inner = _assistant(message, traits, changes)
            turn.update(extra)
            if reasoning is not None:
                turn["reasoning_content"] = reasoning
                pieces.append(Piece(index, "reasoning_content", reasoning, "reasoning"))
        turn["content"] = content
        pieces.append(Piece(index, "content", content, message.role, inner))
        turn.update({key: getattr(message, key) for key in ("name", "tool_call_id") if getattr(message, key)})
        chat.append(turn)
    if tools and not traits.tools:
        changes["tools not rendered"] += 1
    return Chat(chat, pieces, list(tools) if tools else None, changes)


def describe_changes(changes: dict[str, int]) -> str | None:
    """One line saying what was adapted to the template, and how often (None when nothing was)."""
    counts = [(key, changes.get(key, 0)) for key in CHANGES]  # in CHANGES' order, whatever the dict's
    said = [f"{CHANGES[key][0]}: {count:,} {CHANGES[key][1]}{'s' if count != 1 else ''}" for key, count in counts
            if count]
    return "; ".join(said) if said else None
