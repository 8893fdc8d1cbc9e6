"""`instructsae features`: the streaming aggregation, contexts, the files it writes, and the dashboard in Chromium."""

import json
import os
import re
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import NUMBERED_STORIES, assert_one_line_error, run_cli, write_dialogues

from instructsae.evaluate.contexts import context_windows, window_rows
from instructsae.evaluate.dashboard import render_dashboard
from instructsae.evaluate.feature_stats import FeatureStats, merge_top_n
from instructsae.extract.run import run_extract
from instructsae.store.reader import open_complete_store
from instructsae.schemas import ROLES, ExtractConfig, OptimConfig, StandardConfig, TrainConfig
from instructsae.sae.export import load_sae
from instructsae.train.run import run_training

CHROMIUM = Path("/usr/bin/chromium")
FEATURE_FIELDS = {"id", "density", "mean_activation", "role_share", "special_share", "top", "histogram", "logits"}
CONTEXT_FIELDS = {"activation", "instance", "position", "role", "tokens", "focus", "acts", "roles"}


def sparse_latents(n_tokens: int, d_sae: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n_tokens, d_sae, generator=generator) - 1.0)


# --- the aggregation, on hand-built latents -------------------------------------------------------------

def test_top_n_across_chunks_equals_top_n_at_once():
    latents_NF = sparse_latents(300, 7)
    latents_NF[:, 6] = 0  # a feature that never fires
    latents_NF[:3, 5], latents_NF[3:, 5] = torch.tensor([0.5, 2.0, 1.0]), 0  # one that fires fewer than N times
    latents_NF[[10, 250], 4] = 9.0  # a tie: the earlier row comes first
    top_acts_FN, top_rows_FN = torch.full((7, 4), -torch.inf), torch.full((7, 4), -1, dtype=torch.int64)
    for start, stop in [(0, 1), (1, 64), (64, 65), (65, 200), (200, 300)]:
        token_K, feature_K = latents_NF[start:stop].nonzero(as_tuple=True)
        top_acts_FN, top_rows_FN = merge_top_n(top_acts_FN, top_rows_FN, feature_K,
                                               latents_NF[start:stop][token_K, feature_K], token_K + start)
    expected_acts_FN, expected_rows_FN = (t[:, :4] for t in latents_NF.T.sort(dim=1, descending=True, stable=True))
    fired_FN = expected_acts_FN > 0
    assert torch.equal(top_acts_FN[fired_FN], expected_acts_FN[fired_FN])
    assert torch.equal(top_rows_FN[fired_FN], expected_rows_FN[fired_FN])
    assert top_acts_FN[~fired_FN].eq(-torch.inf).all() and top_rows_FN[~fired_FN].eq(-1).all()
    assert top_rows_FN[5, :3].tolist() == [1, 2, 0] and top_rows_FN[4, :2].tolist() == [10, 250]


def test_stats_match_a_direct_computation():
    latents_NF = sparse_latents(200, 6, seed=1)
    latents_NF[:, 2] = 0
    roles_N = torch.randint(0, len(ROLES), (200,), generator=torch.Generator().manual_seed(2))
    special_N = roles_N == 0
    special_N[::7] = True
    stats = FeatureStats.empty(6, len(ROLES), top_n=3)
    for start in range(0, 200, 64):
        batch = slice(start, start + 64)
        stats.add(latents_NF[batch], torch.arange(200)[batch], roles_N[batch], special_N[batch])

    fires_NF = latents_NF > 0
    assert stats.n_tokens == 200
    assert stats.live_F.tolist() == [True, True, False, True, True, True]
    assert torch.allclose(stats.density_F, fires_NF.double().mean(dim=0))
    for f in (0, 1, 3, 4, 5):
        assert stats.mean_activation_F[f].item() == pytest.approx(latents_NF[fires_NF[:, f], f].double().mean().item())
        mass = latents_NF[:, f].double().sum()
        for r in range(len(ROLES)):
            share = latents_NF[roles_N == r, f].double().sum() / mass
            assert stats.role_share_RF[r, f].item() == pytest.approx(share.item())
        assert stats.special_share_F[f].item() == pytest.approx((latents_NF[special_N, f].double().sum() / mass).item())
    live = stats.live_F
    assert torch.allclose(stats.role_share_RF[:, live].sum(dim=0), torch.ones(5, dtype=torch.float64))
    assert stats.mean_activation_F[2] == 0 and stats.role_share_RF[:, 2].eq(0).all()


def test_context_windows_stay_inside_their_instance():
    instance_start_I, instance_length_I = np.array([0, 5, 6, 20]), np.array([5, 1, 14, 3])
    instance_of_row = np.repeat(np.arange(4), instance_length_I)
    rows_K = np.arange(23)
    start_K, stop_K = context_windows(rows_K, instance_of_row[rows_K], instance_start_I, instance_length_I, 3)
    all_rows, offsets = window_rows(start_K, stop_K)
    for k, row in enumerate(rows_K):
        window = all_rows[offsets[k]:offsets[k + 1]]
        assert (instance_of_row[window] == instance_of_row[row]).all()
        assert row in window and len(window) <= 7
        assert window.tolist() == list(range(window[0], window[-1] + 1))
    assert (start_K[1], stop_K[1]) == (0, 5)  # clipped at both ends of instance 0
    assert (start_K[5], stop_K[5]) == (5, 6)  # a one-token instance
    assert (start_K[12], stop_K[12]) == (9, 16)  # the full width inside instance 2


# --- end to end on the tiny model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_and_sae(tiny_model_dir, tmp_path_factory):
    """A FAST store of 12 tiny-model dialogues and a Standard SAE trained for a few steps on it."""
    folder = tmp_path_factory.mktemp("features")
    write_dialogues(folder / "dialogues.jsonl", **NUMBERED_STORIES)
    store, sae = folder / "store", folder / "sae"
    run_extract(ExtractConfig(model=str(tiny_model_dir), dataset=str(folder / "dialogues.jsonl"), layers=(1,),
                              out=str(store), chunk_tokens=64, dtype="float32"), show_progress=False)
    optim = OptimConfig(lr=3e-3, lr_warmup_steps=5, sparsity_warmup_steps=20)
    run_training(TrainConfig(store=str(store), out=str(sae), sae=StandardConfig(expansion=2), optim=optim,
                             batch_size=32, tokens=1500, buffer_tokens=256, geometric_median_tokens=64))
    return store, sae


@pytest.fixture(scope="module")
def features_out(store_and_sae, tmp_path_factory):
    store, sae = store_and_sae
    out = tmp_path_factory.mktemp("features-out") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        from instructsae.cli import main
        monkeypatch.setattr("sys.argv", ["instructsae", "features", "--sae", str(sae), "--store", str(store),
                                         "--out", str(out), "--top", "4", "--context", "3"])
        main()
    return out


def direct_latents(store, sae_dir) -> torch.Tensor:
    sae, _ = load_sae(sae_dir)
    reader = open_complete_store(store)
    with torch.no_grad():
        return sae.encode(reader.read_acts(1, 0, reader.n_tokens))


def test_cli_writes_every_live_feature_with_the_documented_fields(features_out, store_and_sae, tiny_tokenizer):
    store, sae = store_and_sae
    assert sorted(p.name for p in features_out.iterdir()) == [
        "contexts.parquet", "dashboard.html", "features.json", "features.parquet", "special_token_features.json"]
    result = json.loads((features_out / "features.json").read_text())
    latents_NF = direct_latents(store, sae)
    live = torch.nonzero((latents_NF > 0).any(dim=0)).flatten().tolist()
    assert result["n_tokens"] == len(latents_NF) and result["layer"] == 1
    assert [f["id"] for f in result["features"]] == live and result["n_live"] == len(live) > 0

    reader = open_complete_store(store)
    token_id, instance = reader.read_column("token_id"), reader.read_column("instance")
    position, role = reader.read_column("position"), reader.read_column("role")
    for feature in result["features"]:
        assert set(feature) == FEATURE_FIELDS
        f = feature["id"]
        assert feature["density"] == pytest.approx((latents_NF[:, f] > 0).double().mean().item())
        assert sum(feature["role_share"].values()) == pytest.approx(1.0)
        activations = [c["activation"] for c in feature["top"]]
        assert activations == sorted(activations, reverse=True) and 0 < len(activations) <= 4
        assert activations[0] == pytest.approx(latents_NF[:, f].max().item())
        for context in feature["top"]:
            assert set(context) == CONTEXT_FIELDS
            row = int(np.flatnonzero((instance == context["instance"]) & (position == context["position"]))[0])
            assert latents_NF[row, f].item() == pytest.approx(context["activation"])
            assert context["role"] == ROLES[role[row]]
            window = range(row - context["focus"], row - context["focus"] + len(context["tokens"]))
            assert (instance[list(window)] == context["instance"]).all()  # never crosses into another dialogue
            assert context["tokens"] == [tiny_tokenizer.decode([int(token_id[r])]) for r in window]
            assert len(context["tokens"]) <= 7

    table = pd.read_parquet(features_out / "features.parquet")
    assert table["id"].tolist() == live
    assert {"density", "mean_activation", "special_share", *(f"role_share_{r}" for r in ROLES)} <= set(table.columns)


def test_contexts_carry_every_tokens_activation_roles_histogram_and_logits(features_out, store_and_sae,
                                                                            tiny_model_dir):
    store, sae = store_and_sae
    result = json.loads((features_out / "features.json").read_text())
    latents_NF = direct_latents(store, sae)
    reader = open_complete_store(store)
    instance, position = reader.read_column("instance"), reader.read_column("position")
    role = reader.read_column("role")
    sae_module, _ = load_sae(sae)
    from instructsae.lm.models import load_model

    lm = load_model(str(tiny_model_dir))
    # the tiny Llama's final RMSNorm: its weight is the gain; no centring
    logits_FV = (sae_module.W_dec.detach() * lm.model.model.norm.weight.detach()) @ lm.model.lm_head.weight.detach().T
    table = pd.read_parquet(features_out / "contexts.parquet")
    assert len(table) == sum(len(f["top"]) for f in result["features"])
    assert "RMSNorm" in result["logits"]
    for feature in result["features"]:
        f = feature["id"]
        for rank, context in enumerate(feature["top"]):
            row = int(np.flatnonzero((instance == context["instance"]) & (position == context["position"]))[0])
            window = np.arange(row - context["focus"], row - context["focus"] + len(context["tokens"]))
            np.testing.assert_allclose(context["acts"], latents_NF[window, f].numpy(), rtol=1e-3, atol=1e-6)
            assert context["acts"][context["focus"]] == pytest.approx(context["activation"], rel=1e-3)
            expanded = [name for name, count in context["roles"] for _ in range(count)]
            assert expanded == [ROLES[code] for code in role[window]]
            saved = table[(table["feature"] == f) & (table["rank"] == rank)].iloc[0]
            assert list(saved["tokens"]) == context["tokens"] and list(saved["roles"]) == expanded
            np.testing.assert_allclose(saved["acts"], context["acts"], rtol=1e-6)
        nonzero = latents_NF[:, f][latents_NF[:, f] > 0].double().numpy()
        counts, width = feature["histogram"]["counts"], feature["histogram"]["width"]
        assert sum(counts) == len(nonzero) and counts[-1] > 0
        expected, _ = np.histogram(nonzero, bins=len(counts), range=(0, width * len(counts)))
        assert counts == expected.tolist()
        promoted = logits_FV[f].topk(10)
        assert [token for token, _ in feature["logits"]["promoted"]] == [
            tiny_tokenizer_decode(lm.tokenizer, i) for i in promoted.indices.tolist()]
        np.testing.assert_allclose([v for _, v in feature["logits"]["promoted"]], promoted.values.numpy(), rtol=1e-3)
        suppressed = logits_FV[f].topk(10, largest=False)
        np.testing.assert_allclose([v for _, v in feature["logits"]["suppressed"]], suppressed.values.numpy(),
                                   rtol=1e-3)


def tiny_tokenizer_decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def test_special_token_features_are_those_over_the_threshold(features_out, store_and_sae):
    store, sae = store_and_sae
    reader = open_complete_store(store)
    special_N = torch.from_numpy(reader.read_column("role") == 0)  # the tiny tokenizer's specials are all template
    latents_NF = direct_latents(store, sae)
    special_share_F = latents_NF[special_N].double().sum(dim=0) / latents_NF.double().sum(dim=0)
    listed = json.loads((features_out / "special_token_features.json").read_text())
    assert listed["special_threshold"] == 0.5
    assert set(listed["special_tokens"]) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    expected = torch.nonzero(special_share_F >= 0.5).flatten().tolist()
    assert sorted(f["id"] for f in listed["features"]) == expected
    for feature in listed["features"]:
        assert feature["special_share"] == pytest.approx(special_share_F[feature["id"]].item())
        assert sum(feature["fires_on"].values()) > 0


def test_bad_sae_path_is_one_line(store_and_sae, tmp_path, monkeypatch, capsys):
    store, _ = store_and_sae
    code, _, err = run_cli(monkeypatch, capsys, "features", "--sae", str(tmp_path / "no-sae"), "--store", str(store),
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "not an SAE folder", "no-sae")
    assert not (tmp_path / "out").exists()


def test_a_missing_model_is_one_line_naming_logits_0(store_and_sae, tmp_path, monkeypatch, capsys):
    """The logit effects need the store's model; where it cannot be loaded, the error says how to go without."""
    from instructsae.lm.models import load_model

    store, sae = store_and_sae
    monkeypatch.setattr("instructsae.evaluate.features.load_model",
                        lambda spec, dtype, device: load_model(str(tmp_path / "moved-model"), dtype, device))
    code, _, err = run_cli(monkeypatch, capsys, "features", "--sae", str(sae), "--store", str(store),
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "moved-model", "--logits 0")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(monkeypatch, capsys, "features", "--sae", str(sae), "--store", str(store),
                           "--out", str(tmp_path / "out"), "--logits", "0", "--top", "2")
    assert code == 0, err
    records = json.loads((tmp_path / "out" / "features.json").read_text())
    assert records["logits"] is None and all(f["logits"] is None for f in records["features"])


def test_refuses_an_out_folder_with_other_files(store_and_sae, tmp_path, monkeypatch, capsys):
    store, sae = store_and_sae
    (tmp_path / "notes.txt").write_text("precious")
    code, _, err = run_cli(monkeypatch, capsys, "features", "--sae", str(sae), "--store", str(store),
                           "--out", str(tmp_path))
    assert_one_line_error(code, err, "notes.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- the dashboard -----------------------------------------------------------------------------------------

def hand_built_records() -> list[dict]:
    def context(tokens, focus, activation, acts=None):
        acts = acts or [activation if k == focus else 0.0 for k in range(len(tokens))]
        return {"activation": activation, "instance": 0, "position": focus, "role": "assistant", "tokens": tokens,
                "focus": focus, "acts": acts, "roles": [["assistant", len(tokens)]]}

    def feature(id_, special_share, top, density=0.01, logits=None):
        shares = {"template": special_share, "system": 0.0, "user": 0.0, "assistant": 1 - special_share, "text": 0.0}
        return {"id": id_, "density": density, "mean_activation": 1.5, "role_share": shares,
                "special_share": special_share, "top": top, "histogram": {"counts": [5, 0, 2, 1], "width": 1.0},
                "logits": logits}

    robot_logits = {"promoted": [[" robot", 0.52], [" Robot", 0.31]], "suppressed": [[" sea", -0.4], ["!", -0.2]]}
    return [
        feature(3, 0.9, [context(["<|im_end|>", "\n", "<|im_start|>", "assistant"], 2, 4.0)], density=0.2),
        feature(7, 0.1, [context(["a", " small", " robot", "."], 2, 3.0, acts=[0.0, 1.5, 3.0, 0.75]),
                         context([" the", " Robot"], 1, 2.0)], logits=robot_logits),
        feature(12, 0.0, [context(["</script><!--", " x"], 0, 1.0)], density=0.0005),
        feature(40, 0.6, [context(["<|im_start|>", "user"], 1, 2.5)]),
        feature(50, 0.0, [context(["user", "\n", "Hi"], 1, 1.2)]),
        feature(60, 0.0, [context([" in", " 2024"], 1, 1.1)]),
    ]


def test_dashboard_is_one_offline_file_that_escapes_token_text():
    records = hand_built_records()
    special = [{"id": 3}, {"id": 40}]
    summary = {"sae": "sae", "store": "store", "layer": 1, "d_sae": 64, "n_tokens": 100, "special_threshold": 0.5,
               "special_tokens": ["<|im_start|>"]}
    html = render_dashboard(summary, records, special, max_features=3, max_contexts=1)
    assert html.count("</script>") == 1 and "<!--" not in html  # the token "</script><!--" cannot end the script
    assert not re.search(r"https?://|<link|<script src|@import|url\(", html)
    data = json.loads(re.search(r"const DATA = (.*);\n", html).group(1))
    assert [f["id"] for f in data["features"]] == [3, 7, 40]  # capped at 3: special-token features kept first
    assert all(len(f["top"]) == 1 for f in data["features"]) and data["n_live"] == 6


def chromium_or_skip() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("INSTRUCTSAE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"INSTRUCTSAE_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
    pytest.skip(f"headless Chromium ({CHROMIUM}) is not installed")


def test_a_missing_browser_skips_unless_required(monkeypatch, tmp_path):
    monkeypatch.setattr(f"{__name__}.CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("INSTRUCTSAE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception):
        chromium_or_skip()
    monkeypatch.setenv("INSTRUCTSAE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="no-chromium"):
        chromium_or_skip()


def run_chromium(tmp_path: Path, *args: str) -> str:
    profile = Path(tmp_path) / f"profile-{len(list(Path(tmp_path).glob('profile-*')))}"  # fresh for every run
    command = [str(chromium_or_skip()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def shown_features(tmp_path: Path, page: Path, fragment: str) -> list[int]:
    dom = run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", f"{page.as_uri()}#{fragment}")
    assert "</main>" in dom, dom[-2000:]
    return [int(id_) for id_ in re.findall(r'<section class="feature" data-feature="(\d+)"', dom)]


@pytest.fixture
def hand_built_page(tmp_path) -> Path:
    summary = {"sae": "sae", "store": "store", "layer": 1, "d_sae": 64, "n_tokens": 100, "special_threshold": 0.5,
               "special_tokens": ["<|im_start|>"]}
    page = tmp_path / "dashboard.html"
    page.write_text(render_dashboard(summary, hand_built_records(), [{"id": 3}, {"id": 40}], 100, 5))
    return page


def test_dashboard_search_in_headless_chromium(hand_built_page, tmp_path):
    assert shown_features(tmp_path, hand_built_page, "") == [3, 7, 12, 40, 50, 60]
    # the firing token counts, not the context: feature 40 fires on "user" after an <|im_start|>
    assert shown_features(tmp_path, hand_built_page, "q=im_start") == [3]
    assert shown_features(tmp_path, hand_built_page, "q=user") == [40]
    assert shown_features(tmp_path, hand_built_page, "q=ROBOT") == [7]
    assert shown_features(tmp_path, hand_built_page, "feature=12") == [12]
    assert shown_features(tmp_path, hand_built_page, "q=7") == [7]
    assert shown_features(tmp_path, hand_built_page, "special=1") == [3, 40]
    # a newline token is found by the symbol the page shows for it; digits are an id unless token: says otherwise
    assert shown_features(tmp_path, hand_built_page, "q=%E2%86%B5") == [50]
    assert shown_features(tmp_path, hand_built_page, "q=2024") == []
    assert shown_features(tmp_path, hand_built_page, "q=token:2024") == [60]
    assert "is not one of the 6 this page embeds" in run_chromium(
        tmp_path, "--virtual-time-budget=5000", "--dump-dom", f"{hand_built_page.as_uri()}#q=2024")


def test_dashboard_shades_tokens_and_draws_histograms_and_logits_in_chromium(hand_built_page, tmp_path):
    dom = run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", f"{hand_built_page.as_uri()}#q=7")
    card = dom[dom.index('data-feature="7"'):]
    first_context = card[card.index('<span class="ctx">'):card.index("</li>")]
    tags = re.findall(r'<span [^>]*data-act[^>]*>', first_context)
    shading = [(re.search(r'data-act="([^"]*)"', tag).group(1),
                (re.search(r'background: (rgba?\([^)]*\))', tag) or re.match("()", "")).group(1)) for tag in tags]
    # the top activation is 3.0: each token's shade is its share of it, none where the feature is 0
    assert shading == [("0", ""), ("1.5", "rgba(255, 120, 0, 0.5)"), ("3", "rgb(255, 120, 0)"),
                       ("0.75", "rgba(255, 120, 0, 0.25)")]
    bars = re.findall(r'<rect class="bar" [^>]*data-count="(\d+)"', card[:card.index('<figcaption')])
    assert bars == ["5", "0", "2", "1"]
    logits = card[card.index('<table class="logits"'):card.index("</table>")]
    assert re.findall(r'<span class="tok">([^<]*)</span>', logits) == [" robot", " sea", " Robot", "!"]
    assert re.findall(r'<td class="val">([^<]*)</td>', logits) == ["+0.52", "-0.4", "+0.31", "-0.2"]
    # all 6 live features by log10(density) in quarter decades from 1/n_tokens = 1e-2 to 1: four at 0.01 and
    # feature 12's 5e-4 (below what 100 tokens can show, so counted in the lowest bin), feature 3's 0.2 in bin 5
    header = dom[:dom.index('<main id="features">')]
    assert [int(n) for n in re.findall(r'data-count="(\d+)"', header)] == [5, 0, 0, 0, 0, 1, 0, 0]
    assert "58 dead" in header
    density_chart = card[card.index("</figure>"):card.index('<table class="logits"')]
    assert re.findall(r'<rect class="bar( here)?"', density_chart) == [" here"] + [""] * 7  # feature 7's bin


def test_dashboard_screenshot_in_headless_chromium(hand_built_page, tmp_path):
    shot = tmp_path / "dashboard.png"
    run_chromium(tmp_path, "--window-size=1000,700", "--virtual-time-budget=5000", f"--screenshot={shot}",
                 f"{hand_built_page.as_uri()}#q=robot")
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape == (700, 1000, 3)
    assert pixels.std() > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # not blank or uniform
    def painted(rgb) -> int:
        return int((np.abs(pixels - np.array(rgb) / 255).max(axis=-1) < 0.02).sum())

    assert painted([255, 120, 0]) > 50  # the top token, at full shade
    assert painted([255, 187.5, 127.5]) > 50  # " small", at half the feature's largest activation over white
    assert painted([0x4C, 0x78, 0xA8]) > 50  # histogram bars


def test_real_dashboard_filters_like_its_json(features_out, tmp_path):
    records = json.loads((features_out / "features.json").read_text())["features"]
    expected = [r["id"] for r in records if any("robot" in c["tokens"][c["focus"]].lower() for c in r["top"])]
    assert 0 < len(expected) < len(records)
    assert shown_features(tmp_path, features_out / "dashboard.html", "q=Robot") == expected[:50]
