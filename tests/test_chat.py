"""Dialogues fitted to their chat template: system prompts on a template without a system role, tool calls and tools
through a template that renders them and one that does not, reasoning with its own role."""

import copy
import json

import numpy as np
import pytest

from chat_templates import GEMMA_TEMPLATE, QWEN3_TEMPLATE
from instructsae.errors import UserError
from instructsae.extract.chat import TemplateTraits, describe_changes, template_traits
from instructsae.extract.instances import bt_blocks, tokenize_dialogue
from instructsae.extract.rows import Message, Record
from instructsae.schemas.manifest import ROLE_CODE

SYSTEM = "Answer in French."
USER = "Tell me a story about a robot."
ANSWER = "Once upon a time there was a small robot."
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_1"}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = ({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": CITY}},)
TOOL_DIALOGUE = (Message("user", "Weather in Paris?"), Message("assistant", "", tool_calls=(CALL,)),
                 Message("tool", "18 degrees, sunny", name="get_weather", tool_call_id="call_1"),
                 Message("assistant", "It is 18 degrees and sunny."))


def with_template(tokenizer, template):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


@pytest.fixture(scope="module")
def gemma(tiny_tokenizer):
    return with_template(tiny_tokenizer, GEMMA_TEMPLATE)


@pytest.fixture(scope="module")
def qwen(tiny_tokenizer):
    return with_template(tiny_tokenizer, QWEN3_TEMPLATE)


def text_of(tokenizer, instance, role: str) -> str:
    return tokenizer.decode(instance.token_ids[instance.roles == ROLE_CODE[role]])


def rendered(tokenizer, instance) -> str:
    return tokenizer.decode(instance.token_ids)


def test_what_a_template_renders_is_found_by_rendering(tiny_tokenizer, gemma, qwen):
    assert template_traits(tiny_tokenizer) == TemplateTraits(system=True, tool_calls=False, tools=False,
                                                             reasoning=False, tool_role=True)
    assert template_traits(gemma) == TemplateTraits(system=False, tool_calls=False, tools=False, reasoning=False,
                                                    tool_role=False)
    assert template_traits(qwen) == TemplateTraits(system=True, tool_calls=True, tools=True, reasoning=True,
                                                   tool_role=True)


# ---------------------------------------------------------------- system prompts


def test_gemma_style_template_raises_on_a_system_turn_as_the_real_one_does(gemma):
    with pytest.raises(Exception, match="System role not supported"):
        gemma.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
                                  tokenize=False)


def test_merge_puts_the_system_prompt_at_the_head_of_the_first_user_turn(gemma):
    dialogue = (Message("system", SYSTEM), Message("user", USER), Message("assistant", ANSWER))
    instance = tokenize_dialogue(gemma, dialogue, None, source_row=3, system_prompt="merge")
    assert rendered(gemma, instance).startswith(f"<|im_start|><start_of_turn>user\n{SYSTEM}\n\n{USER}<end_of_turn>")
    # the stored tokens keep the system text, with the system role; the user's and the model's keep theirs
    assert text_of(gemma, instance, "system") == SYSTEM
    assert text_of(gemma, instance, "user") == USER
    assert text_of(gemma, instance, "assistant") == ANSWER
    assert dict(instance.changes) == {"system merged": 1}


def test_drop_leaves_the_system_prompt_out_and_refuse_names_the_row(gemma):
    dialogue = (Message("system", SYSTEM), Message("user", USER), Message("assistant", ANSWER))
    dropped = tokenize_dialogue(gemma, dialogue, None, system_prompt="drop")
    without = tokenize_dialogue(gemma, dialogue[1:], None, system_prompt="drop")
    assert np.array_equal(dropped.token_ids, without.token_ids) and np.array_equal(dropped.roles, without.roles)
    assert SYSTEM not in rendered(gemma, dropped) and dict(dropped.changes) == {"system dropped": 1}
    assert without.changes == ()
    with pytest.raises(UserError, match="row 7 has a system prompt and the chat template has no system role"):
        tokenize_dialogue(gemma, dialogue, None, source_row=7, system_prompt="refuse")
    # a dialogue without a system turn is untouched by any policy
    assert tokenize_dialogue(gemma, dialogue[1:], None, system_prompt="refuse").changes == ()


def test_the_policy_changes_nothing_on_a_template_with_a_system_role(tiny_tokenizer):
    dialogue = (Message("system", SYSTEM), Message("user", USER), Message("assistant", ANSWER))
    instances = [tokenize_dialogue(tiny_tokenizer, dialogue, None, system_prompt=policy)
                 for policy in ("merge", "drop", "refuse")]
    assert all(np.array_equal(i.token_ids, instances[0].token_ids) and i.changes == () for i in instances)
    assert text_of(tiny_tokenizer, instances[0], "system") == SYSTEM


def test_a_later_system_turn_merges_into_the_next_user_turn(gemma):
    dialogue = (Message("user", "Hello there."), Message("assistant", "Hi."), Message("system", "Be short now."),
                Message("user", USER), Message("assistant", ANSWER))
    instance = tokenize_dialogue(gemma, dialogue, None)
    assert f"<start_of_turn>user\nBe short now.\n\n{USER}<end_of_turn>" in rendered(gemma, instance)
    assert text_of(gemma, instance, "system") == "Be short now."


# ---------------------------------------------------------------- tool calls and tools


def test_tool_calls_and_tools_go_to_a_template_that_renders_them(qwen):
    instance = tokenize_dialogue(qwen, TOOL_DIALOGUE, None, tools=TOOLS)
    text = rendered(qwen, instance)
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
        '</tool_call><|im_end|>' in text
    assert '"description": "Weather of a city"' in text  # the tools list, in the system turn
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in text
    assert instance.changes == ()
    # the calls the model writes are assistant tokens (markup included), the tool's answer tool tokens
    assert text_of(qwen, instance, "assistant") == \
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        "It is 18 degrees and sunny."
    assert text_of(qwen, instance, "tool") == "18 degrees, sunny"
    assert "get_weather" not in text_of(qwen, instance, "system")


def test_tool_calls_a_template_ignores_are_written_as_json_in_the_assistant_turn(tiny_tokenizer):
    instance = tokenize_dialogue(tiny_tokenizer, TOOL_DIALOGUE, None, tools=TOOLS)
    calls = [json.loads(line) for line in text_of(tiny_tokenizer, instance, "assistant").split("It is")[0]
             .strip().splitlines()]
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]
    assert "<|im_start|>tool\n18 degrees, sunny<|im_end|>" in rendered(tiny_tokenizer, instance)
    assert dict(instance.changes) == {"tool calls as text": 1, "tools not rendered": 1}
    assert describe_changes(dict(instance.changes)) == (
        "tool calls written as JSON text in the assistant turn (the template ignores tool_calls): 1 call; "
        "tools list not stored (the template ignores tools): 1 row")


def test_tool_turns_on_a_template_without_a_tool_role_become_user_turns(gemma):
    with pytest.raises(Exception, match="Conversation roles must alternate"):  # as given, the template refuses
        gemma.apply_chat_template([{"role": m.role, "content": m.content} for m in TOOL_DIALOGUE], tokenize=False)
    second_result = Message("tool", "no rain", name="get_rain", tool_call_id="call_2")
    dialogue = TOOL_DIALOGUE[:3] + (second_result, Message("user", "And tomorrow?"), TOOL_DIALOGUE[3])
    instance = tokenize_dialogue(gemma, (Message("system", SYSTEM),) + dialogue, None)
    text = rendered(gemma, instance)
    # both results and the next user turn in one user turn; the call as JSON text in the model's turn
    assert "<start_of_turn>user\n18 degrees, sunny\n\nno rain\n\nAnd tomorrow?<end_of_turn>" in text
    assert '<start_of_turn>model\n{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}' in text
    assert text_of(gemma, instance, "tool") == "18 degrees, sunnyno rain"
    assert text_of(gemma, instance, "user") == "Weather in Paris?And tomorrow?"
    assert text_of(gemma, instance, "system") == SYSTEM
    assert dict(instance.changes) == {"system merged": 1, "tool calls as text": 1, "tool turns as user turns": 2}


# ---------------------------------------------------------------- reasoning


@pytest.mark.parametrize("shape", ["reasoning_content", "inline <think>"])
def test_reasoning_has_its_own_role_through_a_template_that_renders_it(qwen, shape):
    assistant = Message("assistant", ANSWER, reasoning="The user wants a story.") if shape == "reasoning_content" \
        else Message("assistant", f"<think>\nThe user wants a story.\n</think>\n\n{ANSWER}")
    instance = tokenize_dialogue(qwen, (Message("user", USER), assistant), None)
    assert f"<think>\nThe user wants a story.\n</think>\n\n{ANSWER}<|im_end|>" in rendered(qwen, instance)
    assert text_of(qwen, instance, "reasoning") == "The user wants a story."
    assert text_of(qwen, instance, "assistant") == ANSWER
    assert instance.changes == ()


def test_reasoning_a_template_leaves_out_is_counted(qwen):
    earlier = Message("assistant", "Hello.", reasoning="Greet back.")
    dialogue = (Message("user", "Hi"), earlier, Message("user", USER), Message("assistant", ANSWER, reasoning="Go."))
    instance = tokenize_dialogue(qwen, dialogue, None)
    assert "Greet back." not in rendered(qwen, instance)  # the template renders only the last turns' reasoning
    assert text_of(qwen, instance, "reasoning") == "Go." and text_of(qwen, instance, "assistant") == "Hello." + ANSWER
    assert dict(instance.changes) == {"reasoning left out": 1}


def test_reasoning_on_a_template_that_ignores_it(tiny_tokenizer):
    field = tokenize_dialogue(tiny_tokenizer, (Message("user", USER), Message("assistant", ANSWER,
                                                                              reasoning="Think first.")), None)
    assert f"<|im_start|>assistant\n<think>\nThink first.\n</think>\n\n{ANSWER}<|im_end|>" in \
        rendered(tiny_tokenizer, field)
    assert text_of(tiny_tokenizer, field, "reasoning") == "<think>\nThink first.\n</think>"
    assert text_of(tiny_tokenizer, field, "assistant") == ANSWER
    assert dict(field.changes) == {"reasoning as text": 1}
    # inline reasoning stays as the dataset wrote it; its part of the turn is reasoning
    inline = tokenize_dialogue(tiny_tokenizer, (Message("user", USER),
                                                Message("assistant", f"<think>Think first.</think>{ANSWER}")), None)
    assert f"<think>Think first.</think>{ANSWER}<|im_end|>" in rendered(tiny_tokenizer, inline)
    assert text_of(tiny_tokenizer, inline, "reasoning") == "<think>Think first.</think>"
    assert text_of(tiny_tokenizer, inline, "assistant") == ANSWER and inline.changes == ()


# ---------------------------------------------------------------- counts


def test_truncation_counts_the_tokens_lost(tiny_tokenizer):
    dialogue = (Message("user", USER), Message("assistant", ANSWER))
    full = tokenize_dialogue(tiny_tokenizer, dialogue, None)
    cut = tokenize_dialogue(tiny_tokenizer, dialogue, 10)
    assert full.truncated_tokens == 0 and len(cut.token_ids) == 10
    assert cut.truncated_tokens == len(full.token_ids) - 10
    assert tokenize_dialogue(tiny_tokenizer, dialogue, len(full.token_ids)).truncated_tokens == 0


def test_bt_blocks_count_each_documents_changes_once(gemma):
    dialogue = (Message("system", SYSTEM), Message("user", USER), Message("assistant", ANSWER))
    records = [Record(row, messages=dialogue) for row in range(6)]
    blocks = list(bt_blocks(records, gemma, block_len=8))
    merged = sum(dict(block.changes).get("system merged", 0) for block in blocks)
    # every document starts in a stored block, but the last ones may lie in the dropped partial block
    per_document = len(tokenize_dialogue(gemma, dialogue, None).token_ids) + 1
    assert merged == sum(1 for row in range(6) if row * per_document < len(blocks) * 8)
