"""SFT data as it really is, end to end on the tiny model: system prompts on a Gemma-style template under each
policy, tool calls and reasoning in a store, truncation counted, and which of these settings define a store."""

import json
import shutil

import pytest

from chat_templates import GEMMA_TEMPLATE
from conftest import build_tokenizer
from helpers import assert_one_line_error, run_cli
from instructsae.errors import UserError
from instructsae.extract.inspect import describe_store, store_summary
from instructsae.extract.run import run_extract
from instructsae.lm.models import load_tokenizer
from instructsae.schemas import ExtractConfig
from instructsae.schemas.manifest import MANIFEST_KEY
from instructsae.store.reader import read_manifest

SYSTEM = "Answer in French."


@pytest.fixture(scope="module")
def gemma_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a Gemma-2-style chat template (no system role)."""
    folder = tmp_path_factory.mktemp("tiny-gemma-template") / "model"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = GEMMA_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def system_dataset(tmp_path) -> str:
    """Six dialogues, four of them with a system prompt."""
    rows = []
    for i in range(6):
        turns = [{"role": "user", "content": f"Tell me story {i} about a robot."},
                 {"role": "assistant", "content": "Once upon a time there was a small robot."}]
        rows.append({"messages": ([{"role": "system", "content": SYSTEM}] if i < 4 else []) + turns})
    return write_jsonl(tmp_path / "system.jsonl", rows)


def extract_args(model_dir, dataset, out, *more) -> list[str]:
    return ["extract", "--model", str(model_dir), "--dataset", dataset, "--out", str(out), "--layers", "0",
            "--dtype", "float32", "--model-dtype", "float32", "--chunk-tokens", "32", "--shard-mb", "0.02", *more]


def notes(out: str, line_start: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"note: {line_start}")]


@pytest.mark.parametrize("policy", ["merge", "drop"])
def test_system_prompts_on_a_template_without_a_system_role(gemma_model_dir, system_dataset, tmp_path, monkeypatch,
                                                            capsys, policy):
    store = tmp_path / "store"
    code, out, err = run_cli(monkeypatch, capsys, *extract_args(gemma_model_dir, system_dataset, store,
                                                                "--system-prompt", policy))
    assert code == 0, err
    manifest = read_manifest(str(store))
    assert manifest.identity.system_prompt == policy
    assert manifest.rendering_changes == {f"system {'merged' if policy == 'merge' else 'dropped'}": 4}
    system_tokens = store_summary(str(store))["counts"]["tokens_by_role"]["system"]
    system_per_row = len(load_tokenizer(str(gemma_model_dir))(SYSTEM, add_special_tokens=False)["input_ids"])
    assert system_tokens == (4 * system_per_row if policy == "merge" else 0)
    what = "merged into the first user turn" if policy == "merge" else "dropped"
    said = notes(out + err, f"system prompt {what}")
    assert len(said) == 1 and said[0].endswith(": 4 rows")
    described = describe_store(str(store), as_json=False)
    assert f"template    no system role: --system-prompt {policy}\ntemplate    system prompt {what}" in described
    # the policy changes the stored bytes: a rerun with another one is refused, not resumed
    other = "drop" if policy == "merge" else "merge"
    code, _, err = run_cli(monkeypatch, capsys, *extract_args(gemma_model_dir, system_dataset, store,
                                                              "--system-prompt", other))
    assert_one_line_error(code, err, "made with another config", f"system_prompt: {policy} -> {other}")


def test_refuse_stops_before_anything_is_written(gemma_model_dir, system_dataset, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, *extract_args(gemma_model_dir, system_dataset, store,
                                                              "--system-prompt", "refuse"))
    assert_one_line_error(code, err, "row 0 has a system prompt and the chat template has no system role")
    assert not store.exists()


def test_the_policy_is_not_part_of_a_store_whose_template_has_a_system_role(tiny_model_dir, system_dataset, tmp_path,
                                                                            monkeypatch, capsys):
    store = tmp_path / "store"
    assert run_cli(monkeypatch, capsys, *extract_args(tiny_model_dir, system_dataset, store))[0] == 0
    assert read_manifest(str(store)).identity.system_prompt is None
    code, out, err = run_cli(monkeypatch, capsys, *extract_args(tiny_model_dir, system_dataset, store,
                                                                "--system-prompt", "drop"))
    assert code == 0 and "already complete" in out + err


def test_tool_calls_and_reasoning_in_a_store(tiny_model_dir, tmp_path, monkeypatch, capsys):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    rows = [{"tools": [{"type": "function", "function": {"name": "get_weather"}}],
             "messages": [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
                           "tool_calls": [call, call]},
                          {"role": "tool", "content": "18 degrees", "tool_call_id": "c1", "name": "get_weather"},
                          {"role": "assistant", "content": "<think>Say it.</think>It is 18 degrees."}]}] * 3
    store = tmp_path / "store"
    code, out, err = run_cli(monkeypatch, capsys, *extract_args(tiny_model_dir, write_jsonl(tmp_path / "t.jsonl", rows),
                                                                store))
    assert code == 0, err
    manifest = read_manifest(str(store))
    assert manifest.rendering_changes == {"tool calls as text": 6, "reasoning as text": 3, "tools not rendered": 3}
    roles = store_summary(str(store))["counts"]["tokens_by_role"]
    assert roles["reasoning"] > 0 and roles["tool"] > 0 and roles["assistant"] > 0
    import zarr  # the role array names its codes for any zarr reader

    assert zarr.open_array(str(store / "role"), mode="r").attrs["codes"]["6"] == "reasoning"
    said = notes(out + err, "tool calls written as JSON text")
    assert len(said) == 1 and ": 6 calls;" in said[0] and "reasoning_content written as <think>" in said[0]


def test_truncation_is_counted_and_shown(tiny_model_dir, dialogues_jsonl, tmp_path, monkeypatch, capsys):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rendered = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
                for line in dialogues_jsonl.read_text().splitlines()]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered]
    max_len = sorted(lengths)[len(lengths) // 2]
    expected_cut = [n - max_len for n in lengths if n > max_len]
    assert expected_cut and len(expected_cut) < len(lengths)
    store = tmp_path / "store"
    code, out, err = run_cli(monkeypatch, capsys, *extract_args(tiny_model_dir, str(dialogues_jsonl), store,
                                                                "--max-len", str(max_len)))
    assert code == 0, err
    manifest = read_manifest(str(store))
    assert (manifest.n_truncated, manifest.tokens_truncated) == (len(expected_cut), sum(expected_cut))
    said = notes(out + err, f"{len(expected_cut)} of 12 instances were cut at --max-len {max_len}")
    assert len(said) == 1 and f"losing {sum(expected_cut)} tokens" in said[0]
    summary = json.loads(describe_store(str(store), as_json=True))["manifest"]
    assert (summary["n_truncated"], summary["tokens_truncated"]) == (len(expected_cut), sum(expected_cut))
    assert f"truncated   {len(expected_cut)} instances cut at max_len={max_len}, {sum(expected_cut)} tokens lost" \
        in describe_store(str(store), as_json=False)


def test_a_store_from_before_the_counts_still_opens(tiny_model_dir, dialogues_jsonl, tmp_path):
    import zarr

    store = str(tmp_path / "store")
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(dialogues_jsonl), out=store, layers=(0,),
                              dtype="float32", model_dtype="float32", chunk_tokens=32, max_instances=3),
                show_progress=False)
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    old = dict(group.attrs[MANIFEST_KEY])
    for name in ("n_truncated", "tokens_truncated", "rendering_changes"):
        del old[name]
    for name in ("system_prompt", "system_column", "prompt_column", "response_column"):
        del old["identity"][name]
    group.attrs[MANIFEST_KEY] = old
    manifest = read_manifest(store)
    assert manifest.n_truncated is None and manifest.rendering_changes == {}
    assert manifest.identity.fingerprint() == manifest.fingerprint  # the new fields leave an old fingerprint alone
    assert "truncated   not counted" in describe_store(store, as_json=False)


def test_columns_define_the_store(tiny_model_dir, tmp_path):
    rows = [{"system": f"Be brief {i}.", "question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(4)]
    dataset = write_jsonl(tmp_path / "qa.jsonl", rows)
    base = dict(model=str(tiny_model_dir), dataset=dataset, out=str(tmp_path / "store"), layers=(0,),
                dtype="float32", model_dtype="float32", chunk_tokens=32, prompt_column="question",
                response_column="answer")
    manifest = run_extract(ExtractConfig(**base, system_column="system"), show_progress=False)
    assert (manifest.identity.prompt_column, manifest.identity.system_column) == ("question", "system")
    assert store_summary(base["out"])["counts"]["tokens_by_role"]["system"] > 0
    assert "columns     --system-column system  --prompt-column question  --response-column answer" in \
        describe_store(base["out"], as_json=False)
    with pytest.raises(UserError, match="system_column: system -> None"):
        run_extract(ExtractConfig(**base), show_progress=False)
    # runtime knobs are not part of it
    again = run_extract(ExtractConfig(**base, system_column="system", batch_tokens=64), show_progress=False)
    assert again.fingerprint == manifest.fingerprint


def test_every_stored_role_has_a_colour_in_the_feature_dashboard():
    from importlib.resources import files

    from instructsae.schemas.manifest import ROLES

    page = files("instructsae.evaluate").joinpath("dashboard_template.html").read_text()
    colours = page[page.index("const ROLE_COLORS"):].split("};")[0]
    assert all(f"{role}: " in colours for role in ROLES)


def test_evaluate_shows_reasoning_apart_and_replays_the_policy(gemma_model_dir, tmp_path, monkeypatch, capsys):
    """The LM view replays the store's dataset to put back dropped first tokens: with the store's --system-prompt
    (here drop, not the default merge), else the replayed tokens would differ and evaluate would stop."""
    from instructsae.schemas import OptimConfig, StandardConfig, TrainConfig
    from instructsae.train.run import run_training

    rows = [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"Tell me story {i}."},
                          {"role": "assistant", "content": "<think>A short one.</think>Once upon a time."}]}
            for i in range(8)]
    dataset = write_jsonl(tmp_path / "r.jsonl", rows)
    store, sae = tmp_path / "store", tmp_path / "sae"
    run_extract(ExtractConfig(model=str(gemma_model_dir), dataset=dataset, layers=(1,), chunk_tokens=64,
                              dtype="float32", out=str(store), system_prompt="drop"), show_progress=False)
    run_training(TrainConfig(store=str(store), out=str(sae), sae=StandardConfig(expansion=2), batch_size=32,
                             tokens=500, buffer_tokens=128, optim=OptimConfig(lr=3e-3, lr_warmup_steps=2)))
    capsys.readouterr()  # training's own lines
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "--sae", str(sae), "--store", str(store),
                             "--lm-tokens", "200", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"reasoning", "assistant", "user"} <= set(result["per_role"]) and "system" not in result["per_role"]
    assert result["per_role"]["reasoning"]["n_tokens"] > 0 and "reasoning" in result["lm"]["per_role"]
