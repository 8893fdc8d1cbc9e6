"""Tiny random models of the chat model families researchers bring, each with a tokenizer and a chat template in
its family's style (written here to mimic the real ones: their special tokens, role headers, system-role rules).

Sizes are tiny (2 layers, d_model 64, a 300-token BPE) so the whole family matrix runs in seconds. Sliding windows
are set to a few tokens so they bite inside the test dialogues; Gemma 2's soft-caps are set low enough to bite.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from conftest import TRAINING_TEXT

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen 2.5: ChatML with a default system prompt when the dialogue has none
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen 3: ChatML, no default system prompt; an empty think block opens a reply when thinking is off
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
# Gemma 2: no system role at all; the assistant is 'model'; roles must alternate
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Gemma 3: the same turns; a system message is folded into the head of the first user turn
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Mistral (v0.1 style): [INST] ... [/INST] answer</s>; only user and assistant, alternating
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
OLMO2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)
WINDOW = 4  # tokens: the test dialogues run to 30-60 tokens, so a window this small changes every later token


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # in transformers
    config: dict
    template: str
    special: dict  # bos / eos / pad / unk token texts (None: the family has none)
    extra_special: tuple[str, ...] = ()
    system_role: bool = True  # does the template accept a system message


FAMILIES = [
    Family("llama3", "LlamaConfig", dict(rope_theta=500000.0), LLAMA3_TEMPLATE,
           dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None),
           ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>")),
    Family("qwen2", "Qwen2Config", dict(tie_word_embeddings=True), QWEN2_TEMPLATE,
           dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>"), ("<|im_start|>",)),
    Family("qwen3", "Qwen3Config", dict(head_dim=16), QWEN3_TEMPLATE,
           dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>"), ("<|im_start|>", "<think>", "</think>")),
    Family("gemma2", "Gemma2Config",
           dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"],
                initializer_range=0.1),  # weights large enough for scores and logits to reach the caps
           GEMMA2_TEMPLATE, dict(bos="<bos>", eos="<eos>", pad="<pad>"), ("<start_of_turn>", "<end_of_turn>"),
           system_role=False),
    Family("gemma3", "Gemma3TextConfig",
           dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention"]),
           GEMMA3_TEMPLATE, dict(bos="<bos>", eos="<eos>", pad="<pad>"), ("<start_of_turn>", "<end_of_turn>")),
    Family("mistral", "MistralConfig", dict(sliding_window=WINDOW), MISTRAL_TEMPLATE,
           dict(bos="<s>", eos="</s>", pad=None), ("[INST]", "[/INST]"), system_role=False),
    Family("phi3", "Phi3Config", dict(sliding_window=WINDOW), PHI3_TEMPLATE,
           dict(bos=None, eos="<|endoftext|>", pad="<|endoftext|>"),
           ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    Family("olmo2", "Olmo2Config", dict(), OLMO2_TEMPLATE,
           dict(bos="<|endoftext|>", eos="<|endoftext|>", pad="<|pad|>"), ("<|system|>", "<|user|>", "<|assistant|>")),
]
FAMILY = {family.name: family for family in FAMILIES}


def build_family_tokenizer(family: Family):
    """A byte-level BPE trained in milliseconds, with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([text for text in family.special.values() if text] + ["<unk>"]
                                  + list(family.extra_special)))
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    named = {f"{key}_token": value for key, value in family.special.items() if value}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **named,
                                        additional_special_tokens=list(family.extra_special))
    tokenizer.chat_template = family.template
    return tokenizer


def build_family_model(family: Family, tokenizer):
    import transformers

    ids = {f"{key}_token_id": tokenizer.convert_tokens_to_ids(value) if value else None
           for key, value in family.special.items()}
    config = getattr(transformers, family.config_class)(vocab_size=len(tokenizer), **{**SMALL, **ids,
                                                                                     **family.config})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_family(family: Family, folder: Path) -> Path:
    """The family's tiny model and tokenizer in a local folder, as `--model PATH` loads any HF checkpoint."""
    tokenizer = build_family_tokenizer(family)
    build_family_model(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
