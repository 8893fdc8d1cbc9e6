"""Chat templates in the style of families the tests need, written after the real ones (the parts that matter)."""

# Gemma 2's template: no system role (it raises on one, as the real template does), 'model' for the assistant,
# contents trimmed: the family matrix's own (tests/families.py).
from families import GEMMA2_TEMPLATE as GEMMA_TEMPLATE

# Qwen3's template, shortened: tools listed in the system turn, tool calls as <tool_call> JSON (a newline before
# one only after a content or another call), tool results as <tool_response> in one user turn, reasoning as
# <think>...</think> (from reasoning_content, or split out of an inline <think>...</think>) rendered only for the
# assistant turns after the last user turn, as the real template does.
QWEN3_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\n<tools>' }}{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% set ns = namespace(last_query=-1) %}"
    "{% for message in messages %}{% if message.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{% elif message.role == 'assistant' %}"
    "{% set content = message.content %}{% set reasoning_content = '' %}"
    "{% if message.reasoning_content is string %}{% set reasoning_content = message.reasoning_content %}"
    "{% elif '</think>' in content %}"
    "{% set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% if reasoning_content and loop.index0 > ns.last_query %}"
    "{{ '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' }}{% endif %}"
    "{{ content }}"
    "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "{% if (loop.first and content) or not loop.first %}{{ '\n' }}{% endif %}"
    "{% if tool_call.function %}{% set tool_call = tool_call.function %}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + (tool_call.arguments | tojson)"
    " + '}\n</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
