"""Records -> tokens: exact roles per token, FAST truncation, BT blocks cut from one EOS-joined stream."""

import copy
import itertools

import numpy as np
import pytest

from instructsae.errors import UserError
from instructsae.extract.data import Message, Record
from instructsae.extract.instances import bt_blocks, fast_instances, tokenize_dialogue, tokenize_record, tokenize_text
from instructsae.schemas.manifest import ROLE_CODE

USER = "Tell me a story about a robot."
ASSISTANT = "Once upon a time there was a small robot."
DIALOGUE = (Message("user", USER), Message("assistant", ASSISTANT))


def decode_role(tokenizer, instance, role: str) -> str:
    return tokenizer.decode(instance.token_ids[instance.roles == ROLE_CODE[role]])


def with_template(tokenizer, template):
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def test_dialogue_roles_are_exact(tiny_tokenizer):
    instance = tokenize_dialogue(tiny_tokenizer, DIALOGUE, max_len=1000, source_row=5)
    assert instance.token_ids.dtype == np.int32 and instance.roles.dtype == np.uint8
    assert len(instance.token_ids) == len(instance.roles) and instance.source_row == 5
    assert decode_role(tiny_tokenizer, instance, "user") == USER
    assert decode_role(tiny_tokenizer, instance, "assistant") == ASSISTANT
    # the template's default system prompt is labelled 'system', its markup 'template'
    assert decode_role(tiny_tokenizer, instance, "system") == "You are a tiny test assistant."
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (instance.roles[instance.token_ids == im_start] == ROLE_CODE["template"]).all()
    assert (instance.token_ids == im_start).sum() == 3
    assert instance.roles[0] == ROLE_CODE["template"] and ROLE_CODE["text"] not in instance.roles
    # the tokens are those the template renders
    rendered = tiny_tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in DIALOGUE],
                                                  tokenize=False)
    assert tiny_tokenizer.decode(instance.token_ids) == rendered


def test_explicit_system_message_and_header_like_contents(tiny_tokenizer):
    # a content equal to a role name must not be found inside the role header that precedes it
    messages = (Message("system", "Be brief."), Message("user", "user"), Message("assistant", "assistant"))
    instance = tokenize_dialogue(tiny_tokenizer, messages, max_len=1000)
    assert decode_role(tiny_tokenizer, instance, "system") == "Be brief."
    assert decode_role(tiny_tokenizer, instance, "user") == "user"
    assert decode_role(tiny_tokenizer, instance, "assistant") == "assistant"
    headers = np.flatnonzero(instance.token_ids == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")) + 1
    assert (instance.roles[headers] == ROLE_CODE["template"]).all()  # "user" / "assistant" after <|im_start|>


def test_template_that_strips_contents(tiny_tokenizer):
    stripping = with_template(tiny_tokenizer, tiny_tokenizer.chat_template.replace(
        "message['content']", "message['content'] | trim"))
    instance = tokenize_dialogue(stripping, (Message("user", "  padded words \n"), DIALOGUE[1]), max_len=1000)
    assert decode_role(stripping, instance, "user") == "padded words"
    assert decode_role(stripping, instance, "assistant") == ASSISTANT


def test_template_that_rewrites_a_content_leaves_it_template(tiny_tokenizer):
    rewriting = with_template(tiny_tokenizer, tiny_tokenizer.chat_template.replace(
        "message['content']", "message['content'] | replace('robot', 'ROBOT')"))
    messages = (Message("user", USER), Message("assistant", "Hello, how are you?"))
    instance = tokenize_dialogue(rewriting, messages, max_len=1000)
    assert ROLE_CODE["user"] not in instance.roles
    assert decode_role(rewriting, instance, "assistant") == "Hello, how are you?"


def test_chat_template_errors_are_user_errors(tiny_tokenizer):
    with pytest.raises(UserError, match="no chat template"):
        tokenize_dialogue(with_template(tiny_tokenizer, None), DIALOGUE, max_len=100)
    refusing = with_template(tiny_tokenizer, "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(UserError, match="row 12: Conversation roles must alternate"):
        tokenize_dialogue(refusing, DIALOGUE, max_len=100, source_row=12)


def test_truncation_keeps_the_prefix(tiny_tokenizer):
    full = tokenize_dialogue(tiny_tokenizer, DIALOGUE, max_len=10_000)
    cut = tokenize_dialogue(tiny_tokenizer, DIALOGUE, max_len=17)
    assert len(cut.token_ids) == len(cut.roles) == 17 < len(full.token_ids)
    assert (cut.token_ids == full.token_ids[:17]).all() and (cut.roles == full.roles[:17]).all()
    assert len(tokenize_text(tiny_tokenizer, ASSISTANT * 3, max_len=9).token_ids) == 9


def test_text_roles(tiny_tokenizer):
    instance = tokenize_text(tiny_tokenizer, ASSISTANT, max_len=None, source_row=3)
    assert (instance.roles == ROLE_CODE["text"]).all() and instance.source_row == 3
    assert tiny_tokenizer.decode(instance.token_ids) == ASSISTANT
    # a tokenizer that adds a BOS (as Llama's do) gets it, labelled 'template'
    from tokenizers.processors import TemplateProcessing

    with_bos = copy.deepcopy(tiny_tokenizer)
    bos = with_bos.convert_tokens_to_ids("<|im_start|>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    instance = tokenize_text(with_bos, ASSISTANT, max_len=None)
    assert instance.token_ids[0] == bos and instance.roles[0] == ROLE_CODE["template"]
    assert (instance.roles[1:] == ROLE_CODE["text"]).all()


RECORDS = [
    Record(0, messages=DIALOGUE),
    Record(2, text="The quick brown fox jumps over the lazy dog."),
    Record(3, messages=(Message("user", "Hello"), Message("assistant", "Hi, what is your name?"))),
    Record(7, text="Numbers: 0 1 2 3 4 5 6 7 8 9."),
    Record(8, messages=(Message("system", "Tell a story."), Message("user", "robot"))),
]


def test_fast_instances_are_one_per_record(tiny_tokenizer):
    instances = list(fast_instances(RECORDS, tiny_tokenizer, max_len=20))
    assert [instance.source_row for instance in instances] == [0, 2, 3, 7, 8]
    for record, instance in zip(RECORDS, instances):
        alone = tokenize_record(tiny_tokenizer, record, max_len=20)
        assert (instance.token_ids == alone.token_ids).all() and (instance.roles == alone.roles).all()
        assert len(instance.token_ids) <= 20
    assert (instances[1].roles == ROLE_CODE["text"]).all()


@pytest.mark.parametrize("block_len", [7, 32, 64])
def test_bt_blocks_cut_the_eos_joined_stream(tiny_tokenizer, block_len):
    eos = tiny_tokenizer.eos_token_id
    documents = [tokenize_record(tiny_tokenizer, record, None) for record in RECORDS]
    stream_ids = np.concatenate([np.append(d.token_ids, eos) for d in documents])
    stream_roles = np.concatenate([np.append(d.roles, ROLE_CODE["template"]) for d in documents])
    stream_rows = np.concatenate([np.full(len(d.token_ids) + 1, d.source_row) for d in documents])

    blocks = list(bt_blocks(RECORDS, tiny_tokenizer, block_len))
    assert len(blocks) == len(stream_ids) // block_len > 0
    assert all(len(b.token_ids) == len(b.roles) == block_len for b in blocks)
    n = len(blocks) * block_len
    assert (np.concatenate([b.token_ids for b in blocks]) == stream_ids[:n]).all()
    assert (np.concatenate([b.roles for b in blocks]) == stream_roles[:n]).all()
    assert [b.source_row for b in blocks] == list(stream_rows[:n:block_len])
    # each document ends with an EOS separator labelled 'template'
    ends = np.cumsum([len(d.token_ids) + 1 for d in documents]) - 1
    assert (stream_ids[ends] == eos).all()
    joined = np.concatenate([b.token_ids for b in blocks])
    assert (joined == eos).sum() >= sum(end < n for end in ends)


def test_bt_blocks_stream(tiny_tokenizer):
    endless = (Record(i, text=f"Once upon a time {i}.") for i in itertools.count())
    blocks = list(itertools.islice(bt_blocks(endless, tiny_tokenizer, block_len=16), 5))
    assert len(blocks) == 5 and blocks[0].source_row == 0 and blocks[4].source_row > 0
