"""`instructsae autointerp` against a real HTTP server on loopback that answers like a chat-completions API, by
rules the tests control, so every reported score is checked against the value it must have."""

import json
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import assert_one_line_error, run_cli

from instructsae.evaluate import autointerp
from instructsae.evaluate.autointerp import parse_reply, sample_live_features
from instructsae.evaluate.autointerp_report import summarise_rubric
from instructsae.evaluate.scorers import DETECTION_SYSTEM, FUZZING_SYSTEM

FIRING_TOKENS = {3: "<|im_end|>", 7: " robot", 12: "ing"}


def judge_reply(messages: list[dict], mode: str) -> str:
    """Rubric: names the first marked token, the score follows from its length. Explainer: "fires on TOKEN" for
    the first marked token. Detection: 1 where the example holds that TOKEN; fuzzing: 1 where every marked span
    holds it ("yes" mode: 1 for every example; "no-list": no list at all)."""
    system, prompt = messages[0]["content"], messages[-1]["content"]
    if system in (DETECTION_SYSTEM, FUZZING_SYSTEM):
        examples = re.findall(r"^Example \d+: (.*)$", prompt, re.MULTILINE)
        if mode == "no-list":
            return "I am not sure."
        token = re.search(r"^Feature explanation: fires on (.*)$", prompt, re.MULTILINE).group(1)
        if mode == "yes":
            labels = [1] * len(examples)
        elif system == DETECTION_SYSTEM:
            labels = [int(token in example) for example in examples]
        else:
            labels = [int(all(token in span for span in re.findall("«(.+?)»", example))) for example in examples]
        return "Answer: " + json.dumps(labels)
    token = re.search(r"Context: .*?«(.+?)»", prompt).group(1)
    if "Score: [5/4/3/2/1]" in prompt:
        return f"Explanation: fires on {token}\nScore: {len(token) % 5 + 1}"
    return f"Explanation: fires on {token}"


class ChatServer(ThreadingHTTPServer):
    def __init__(self, mode: str):
        self.mode, self.requests, self.lock = mode, [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.barrier = threading.Barrier(3, timeout=30)
        super().__init__(("127.0.0.1", 0), ChatHandler)


class ChatHandler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            n, server.in_flight = len(server.requests), server.in_flight + 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            self._answer(server, n, body)
        finally:
            with server.lock:
                server.in_flight -= 1

    def _answer(self, server, n: int, body: dict):
        mode = server.mode
        failing = re.fullmatch(r"500-after-(\d+)", mode)
        if mode == "500" or (failing and n > int(failing.group(1))) or (mode == "fail-first-3" and n <= 3):
            return self._send(500, b"internal error")
        if mode == "garbage":
            return self._send(200, b"<html>not json</html>")
        if mode == "barrier-3" and n <= 3:
            try:  # the first three requests are answered only once all three are in flight together
                server.barrier.wait()
            except threading.BrokenBarrierError:
                return self._send(400, b"fewer than three requests were in flight at once")
        content = judge_reply(body["messages"], mode)
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    def _send(self, status: int, payload: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # keep the test output clean
        pass


@contextmanager
def serving(mode: str = "ok"):
    chat_server = ChatServer(mode)
    thread = threading.Thread(target=chat_server.serve_forever, daemon=True)
    thread.start()
    try:
        yield chat_server
    finally:
        chat_server.shutdown()
        chat_server.server_close()


@pytest.fixture
def server(request):
    with serving(getattr(request, "param", "ok")) as chat_server:
        yield chat_server


def url(chat_server) -> str:
    return f"http://127.0.0.1:{chat_server.server_address[1]}/v1"


def context(token: str, activation: float, before: str = "Tell me a\nstory") -> dict:
    return {"activation": activation, "instance": 0, "position": 4, "role": "assistant",
            "tokens": [before, token, " now"], "focus": 1}


@pytest.fixture
def features_dir(tmp_path):
    """What `instructsae features` writes: three live features, a dead one and one without contexts."""
    features = [{"id": fid, "density": 0.01, "mean_activation": 1.5, "role_share": {"assistant": 1.0},
                 "top": [context(token, 2.0), context(token, 9.5), context("other", 0.5)]}
                for fid, token in FIRING_TOKENS.items()]
    features += [{"id": 20, "density": 0.0, "mean_activation": 0.0, "role_share": {}, "top": []},
                 {"id": 21, "density": 0.02, "mean_activation": 1.0, "role_share": {}, "top": []}]
    (tmp_path / "features.json").write_text(json.dumps(features))
    return tmp_path


def test_report_holds_each_features_explanation_and_score_and_the_mean(server, features_dir, tmp_path,
                                                                         monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    out = tmp_path / "report" / "interp.json"
    code, stdout, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir),
                                "--endpoint", url(server), "--model", "judge", "--n-features", "10",
                                "--n-contexts", "2", "--api-key-env", "JUDGE_KEY", "--out", str(out),
                                "--scorers", "rubric")
    assert code == 0, err
    assert len(server.requests) == 3, "one call per live feature, none for dead or context-less ones"
    for sent in server.requests:
        assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
        assert sent["body"]["model"] == "judge" and sent["body"]["temperature"] == 0
    prompts = [sent["body"]["messages"][-1]["content"] for sent in server.requests]
    for token in FIRING_TOKENS.values():  # requests run concurrently, in any order
        prompt = next(prompt for prompt in prompts if f"«{token}»" in prompt)
        assert f"Activation: 9.5 | Context: Tell me a\\nstory«{token}» now" in prompt
        assert prompt.index("Activation: 9.5") < prompt.index("Activation: 2"), "strongest context first"
        assert "«other»" not in prompt, "--n-contexts 2 keeps the two strongest"
        assert "5: Clear pattern with no deviating examples" in prompt and "Score: [5/4/3/2/1]" in prompt

    report = json.loads(out.read_text())
    assert [f["id"] for f in report["features"]] == list(FIRING_TOKENS)
    expected_scores = [len(token) % 5 + 1 for token in FIRING_TOKENS.values()]
    for feature, token, score in zip(report["features"], FIRING_TOKENS.values(), expected_scores):
        assert (feature["rubric"]["explanation"], feature["rubric"]["score"]) == (f"fires on {token}", score)
    rubric = report["summary"]["rubric"]
    assert rubric["mean_score"] == pytest.approx(sum(expected_scores) / 3)
    assert rubric["n_scored"] == 3 and rubric["n_unscored"] == 0 and report["complete"] is True
    assert f"rubric: mean score {rubric['mean_score']:.2f}" in stdout
    markdown = out.with_suffix(".md").read_text()
    assert f"rubric: mean score {rubric['mean_score']:.2f}" in markdown and "| 7 | " in markdown


def test_features_are_sampled_reproducibly_from_the_live_ones():
    features = [{"id": i, "density": 0.0 if i % 4 == 0 else 0.1, "top": [context("x", 1.0)]} for i in range(40)]
    first = [f["id"] for f in sample_live_features(features, 5, seed=1)]
    assert first == [f["id"] for f in sample_live_features(features, 5, seed=1)]
    assert first != [f["id"] for f in sample_live_features(features, 5, seed=2)]
    assert len(set(first)) == 5 and all(i % 4 != 0 for i in first)
    assert len(sample_live_features(features, 100, seed=0)) == 30


def test_replies_without_a_score_count_as_unscored():
    assert parse_reply("Explanation: commas in lists\nScore: 4") == ("commas in lists", 4)
    assert parse_reply("Explanation: dates\nScore: [3]") == ("dates", 3)
    assert parse_reply("Explanation: x\nScore: [5/4/3/2/1]") == ("x", None), "an echoed format is no score"
    assert parse_reply("I cannot tell.") == (None, None)
    for reply, score in [("Score: 5/5", 5), ("**Score:** 4", 4), ("Score: 4 (clear pattern)", 4), ("score - 2", 2),
                         ("Score: 3\nOn reflection,\nScore: 2", 2)]:
        assert parse_reply(f"Explanation: x\n{reply}") == ("x", score), reply
    summary = summarise_rubric([{"rubric": {"score": score}} for score in (5, 2, None)])
    assert (summary["mean_score"], summary["n_unscored"], summary["top_score_share"]) == (3.5, 1, 0.5)


def test_no_endpoint_is_one_line(features_dir, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir), "--model", "judge")
    assert_one_line_error(code, err, "no endpoint", "--endpoint")


@pytest.mark.parametrize("server, expected", [("500", "HTTP 500"), ("garbage", "malformed reply")],
                         indirect=["server"])
def test_failing_server_is_one_line_naming_the_url(server, expected, features_dir, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir),
                           "--endpoint", url(server), "--model", "judge", "--retries", "1", "--scorers", "rubric",
                           "--concurrency", "1")
    assert_one_line_error(code, err, expected, f"{url(server)}/chat/completions")
    assert len(server.requests) == (2 if expected == "HTTP 500" else 1), "5xx is retried, a bad reply is not"
    assert not (features_dir / "autointerp.json").exists()


def test_unreachable_endpoint_is_one_line(features_dir, monkeypatch, capsys):
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir),
                           "--endpoint", f"http://127.0.0.1:{port}/v1", "--model", "judge", "--retries", "0",
                           "--scorers", "rubric")
    assert_one_line_error(code, err, "unreachable", f"http://127.0.0.1:{port}/v1/chat/completions")


def test_endpoint_settings_from_a_yaml_config(server, features_dir, tmp_path, monkeypatch, capsys):
    config = tmp_path / "judge.yaml"
    config.write_text(f"endpoint: {url(server)}\nmodel: judge-from-yaml\nn_features: 1\ntimeout_s: 5\n"
                      "scorers: [rubric]\n")
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--config", str(config), "--features", str(features_dir))
    assert code == 0, err
    assert [sent["body"]["model"] for sent in server.requests] == ["judge-from-yaml"]
    assert json.loads((features_dir / "autointerp.json").read_text())["summary"]["rubric"]["n_scored"] == 1


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ('[{"id": 1, "top": ["a string, not a context"]}]', "each with an 'id' and a 'top' list"),
    ('[{"id": 0, "top": [{"activation": 1.0, "tokens": ["a"], "focus": 0}]}, '
     '{"id": 1, "top": [{"activation": 1.0, "tokens": ["a"], "focus": 3}]}]', "feature 1 in features.json"),
])
def test_malformed_features_file_is_one_line(content, expected, server, tmp_path, monkeypatch, capsys):
    (tmp_path / "features.json").write_text(content)
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(tmp_path),
                           "--endpoint", url(server), "--model", "judge")
    assert_one_line_error(code, err, expected)
    assert server.requests == [], "a bad file is caught before any request"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8000/v1", "http://[::1", "ftp://host/v1"])
def test_an_endpoint_that_is_no_http_url_is_one_line(endpoint, features_dir, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir),
                           "--endpoint", endpoint, "--model", "judge")
    assert_one_line_error(code, err, "endpoint")


def test_an_out_that_is_a_folder_is_refused_before_any_request(server, features_dir, tmp_path, monkeypatch,
                                                               capsys):
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir),
                           "--endpoint", url(server), "--model", "judge", "--out", str(tmp_path))
    assert_one_line_error(code, err, "is a folder")
    assert server.requests == []


# --- detection and fuzzing: the scoring maths against a judge that answers by a known rule ------------------

FILLER = ["The", " cat", " sat", " here"]


def store_context(token: str | None, instance: int, fires: bool) -> dict:
    """A context as the store sampler returns it: FILLER with `token` (if any) at index 2, firing there or
    nowhere."""
    tokens = FILLER[:2] + ([token] if token else []) + FILLER[2:]
    acts = [0.0] * len(tokens)
    if fires:
        acts[2] = 3.0
    return {"tokens": tokens, "acts": acts, "focus": 2, "activation": acts[2], "instance": instance, "position": 2,
            "role": "assistant", **({"quantile": 1 + instance % 5} if fires else {})}


def fake_store_contexts(cfg, summary, features):
    """Per feature: 2 contexts for the explainer, then 10 held out: 7 firing on the feature's token, 3 firing on
    ' dog'; 10 non-activating ones, 2 of them holding the token."""
    contexts = []
    for feature in features:
        token = FIRING_TOKENS[feature["id"]]
        activating = [store_context(token, i, True) for i in range(9)] + [store_context(" dog", i, True)
                                                                           for i in range(9, 12)]
        quiet = [store_context(token, 20 + i, False) for i in range(2)] + [store_context(None, 22 + i, False)
                                                                           for i in range(8)]
        contexts.append({"activating": activating, "non_activating": quiet})
    return contexts


# detection: TPR 7/10, TNR 8/10; fuzzing: right marks hold the token in 7 of 10, random marks never: TNR 1
EXPECTED = {"detection": (0.7, 0.8, 0.75), "fuzzing": (0.7, 1.0, 0.85)}
REQUESTS_PER_FEATURE = 1 + 1 + 4 + 4  # rubric, explanation, 20 detection and 20 fuzzing examples in fives


def run_scored(monkeypatch, capsys, features_dir, server, *extra: str):
    monkeypatch.setattr(autointerp, "read_store_contexts", fake_store_contexts)
    monkeypatch.setattr("instructsae.evaluate.chat_client.BACKOFF_S", 0.001)
    return run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir), "--endpoint", url(server),
                   "--model", "judge", "--explain-sampled", "2", "--n-test", "10", "--batch-size", "5", *extra)


def assert_expected_scores(report: dict) -> None:
    assert [f["id"] for f in report["features"]] == list(FIRING_TOKENS)
    for feature in report["features"]:
        assert feature["explanation"] == f"fires on {FIRING_TOKENS[feature['id']]}"
        for scorer, (tpr, tnr, balanced) in EXPECTED.items():
            result = feature[scorer]
            assert (result["n_positive"], result["n_negative"], result["n_unanswered"]) == (10, 10, 0)
            assert result["true_positive_rate"] == pytest.approx(tpr)
            assert result["true_negative_rate"] == pytest.approx(tnr)
            assert result["balanced_accuracy"] == pytest.approx(balanced)
    for scorer, (_, _, balanced) in EXPECTED.items():
        summary = report["summary"][scorer]
        assert summary["mean_balanced_accuracy"] == pytest.approx(balanced) and summary["n_features"] == 3


def test_detection_and_fuzzing_give_the_balanced_accuracy_the_judges_rule_implies(server, features_dir,
                                                                                    monkeypatch, capsys):
    code, stdout, err = run_scored(monkeypatch, capsys, features_dir, server)
    assert code == 0, err
    assert len(server.requests) == 3 * REQUESTS_PER_FEATURE
    report = json.loads((features_dir / "autointerp.json").read_text())
    assert_expected_scores(report)
    assert report["complete"] is True and report["summary"]["rubric"]["n_scored"] == 3
    assert "detection: mean balanced accuracy 0.750" in stdout and "fuzzing: mean balanced accuracy 0.850" in stdout
    prompts = [sent["body"]["messages"][-1]["content"] for sent in server.requests]
    explainer = [p for p in prompts if p.endswith("Explanation: [your brief explanation]\n")]
    assert len(explainer) == 3
    for token in FIRING_TOKENS.values():
        prompt = next(prompt for prompt in explainer if f"«{token}»" in prompt)
        assert "Its strongest contexts:" in prompt and "sampled across the range of its activations" in prompt
        assert prompt.count(f"The cat«{token}» sat here") == 2, "the two contexts sampled for the explainer"
    scoring = [p for p in prompts if p.startswith("Feature explanation: ")]
    assert all(p.count("\nExample ") == 5 for p in scoring), "batches of --batch-size examples"
    held_out = [s for f in report["features"] for s in f["detection"]["samples"] if s["truth"]]
    assert sorted({s["instance"] for s in held_out}) == list(range(2, 12)), "none shown to the explainer is scored"
    assert "| 7 | 2 | 0.75 | 0.85 | fires on  robot |" in (features_dir / "autointerp.md").read_text()


def test_unparseable_judge_replies_are_counted_unanswered(features_dir, monkeypatch, capsys):
    with serving("no-list") as server:
        code, stdout, err = run_scored(monkeypatch, capsys, features_dir, server, "--scorers", "detection")
    assert code == 0, err
    for feature in json.loads((features_dir / "autointerp.json").read_text())["features"]:
        detection = feature["detection"]
        assert detection["balanced_accuracy"] is None and detection["n_unanswered"] == 20
        assert detection["unparsed_replies"] == ["I am not sure."] * 4
    assert "mean balanced accuracy n/a" in stdout and "60 examples unanswered" in stdout


@pytest.mark.parametrize("server", ["barrier-3"], indirect=True)
def test_features_are_scored_concurrently(server, features_dir, monkeypatch, capsys):
    # the server holds its first three requests until all three are in flight: one at a time would fail
    code, _, err = run_scored(monkeypatch, capsys, features_dir, server, "--concurrency", "3", "--retries", "0")
    assert code == 0, err
    assert server.max_in_flight == 3
    assert_expected_scores(json.loads((features_dir / "autointerp.json").read_text()))


@pytest.mark.parametrize("server", ["fail-first-3"], indirect=True)
def test_a_judge_failing_three_times_is_retried_to_the_same_scores(server, features_dir, monkeypatch, capsys):
    code, _, err = run_scored(monkeypatch, capsys, features_dir, server, "--concurrency", "3", "--retries", "3")
    assert code == 0, err
    assert len(server.requests) == 3 * REQUESTS_PER_FEATURE + 3
    assert_expected_scores(json.loads((features_dir / "autointerp.json").read_text()))


@pytest.mark.parametrize("server", [f"500-after-{REQUESTS_PER_FEATURE + 5}"], indirect=True)
def test_a_judge_dying_midway_leaves_a_partial_report_that_a_rerun_completes(server, features_dir, monkeypatch,
                                                                               capsys):
    code, _, err = run_scored(monkeypatch, capsys, features_dir, server, "--concurrency", "1", "--retries", "0")
    assert_one_line_error(code, err, "HTTP 500", "stopped at feature 7", "the 1 features scored", "rerun")
    partial = json.loads((features_dir / "autointerp.json").read_text())
    assert partial["complete"] is False and "HTTP 500" in partial["stopped_early"]
    assert [f["id"] for f in partial["features"]] == [3]
    assert partial["summary"]["detection"]["mean_balanced_accuracy"] == pytest.approx(0.75)
    assert "Partial report" in (features_dir / "autointerp.md").read_text()

    server.mode, sent_before = "ok", len(server.requests)
    code, _, err = run_scored(monkeypatch, capsys, features_dir, server, "--concurrency", "1")
    assert code == 0, err
    assert len(server.requests) - sent_before == 2 * REQUESTS_PER_FEATURE, "feature 3 is not asked again"
    report = json.loads((features_dir / "autointerp.json").read_text())
    assert report["complete"] is True and report["stopped_early"] is None
    assert_expected_scores(report)

    sent_before = len(server.requests)  # a complete report is not resumed: a rerun asks again
    code, _, err = run_scored(monkeypatch, capsys, features_dir, server, "--concurrency", "1")
    assert code == 0 and len(server.requests) - sent_before == 3 * REQUESTS_PER_FEATURE


@pytest.mark.parametrize("server", [f"500-after-{REQUESTS_PER_FEATURE}"], indirect=True)
def test_a_partial_report_with_other_settings_is_not_resumed(server, features_dir, monkeypatch, capsys):
    code, _, _ = run_scored(monkeypatch, capsys, features_dir, server, "--concurrency", "1", "--retries", "0")
    assert code == 2 and json.loads((features_dir / "autointerp.json").read_text())["complete"] is False
    server.mode, sent_before = "ok", len(server.requests)
    code, _, err = run_scored(monkeypatch, capsys, features_dir, server, "--concurrency", "1", "--fuzz-threshold",
                              "0.5")
    assert code == 0, err
    assert len(server.requests) - sent_before == 3 * REQUESTS_PER_FEATURE


def test_detection_without_a_store_is_one_line(server, features_dir, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir),
                           "--endpoint", url(server), "--model", "judge", "--scorers", "rubric,detection")
    assert_one_line_error(code, err, "--sae and --store", "--scorers rubric")
    assert server.requests == []


@pytest.mark.parametrize("scorers", ["rubric,rubric", "detection,recall"])
def test_unknown_or_repeated_scorers_are_one_line(scorers, features_dir, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "autointerp", "--features", str(features_dir),
                           "--endpoint", "http://127.0.0.1:9/v1", "--model", "judge", "--scorers", scorers)
    assert_one_line_error(code, err, "scorers")
