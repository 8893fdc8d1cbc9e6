"""`instructsae export neuronpedia`: the bulk-import layout SAEDashboard's exporter writes, checked field by field.

No package on PyPI reads this layout: neuronpedia-utils (whose dataclasses are the database rows) is not published,
and the `neuronpedia` client reads the web API's JSON, not these files. So the expected fields below are copied
from the dataclasses SAEDashboard's exporter serialises row by row (`orjson.dumps(row.__dict__)`), in their
order: sae_dashboard/neuronpedia/neuronpedia_export.py at jbloomAus/SAEDashboard db4839a (Activation, Feature,
Model, Source, SourceRelease, SourceSet), and neuronpedia-utils' db_models/explanation.py (Explanation, the rows
SAEDashboard's scripts/rename_neuronpedia_export_model.py rewrites under explanations/).
"""

import gzip
import json
from datetime import datetime
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli
from test_features import store_and_sae  # noqa: F401 - the module's store and SAE fixture

ACTIVATION_FIELDS = [
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values", "creatorId",
    "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "createdAt", "lossValues",
    "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex", "zIndices", "zValues"]
FEATURE_FIELDS = [
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector", "vectorLabel",
    "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices",
    "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson",
    "correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist", "sourceSetName"]
MODEL_FIELDS = [
    "id", "instruct", "creatorId", "displayNameShort", "displayName", "tlensId", "dimension", "visibility",
    "defaultSourceSetName", "defaultSourceId", "inferenceEnabled", "layers", "neuronsPerLayer", "createdAt", "owner",
    "updatedAt", "website"]
SOURCE_FIELDS = [
    "id", "modelId", "setName", "creatorId", "hasDashboards", "inferenceEnabled", "inferenceHosts", "saelensConfig",
    "saelensRelease", "saelensSaeId", "hfRepoId", "hfFolderId", "visibility", "defaultOfModelId", "hasUmap",
    "hasUmapLogSparsity", "hasUmapClusters", "num_prompts", "num_tokens_in_prompt", "dataset", "notes", "createdAt"]
RELEASE_FIELDS = [
    "name", "description", "creatorName", "creatorId", "visibility", "isNewUi", "featured", "descriptionShort", "urls",
    "creatorEmail", "creatorNameShort", "defaultSourceSetName", "defaultSourceId", "defaultUmapSourceIds",
    "createdAt"]
SOURCESET_FIELDS = [
    "modelId", "name", "creatorId", "hasDashboards", "visibility", "description", "type", "creatorName", "urls",
    "creatorEmail", "releaseName", "defaultOfModelId", "defaultRange", "defaultShowBreaks", "showDfa",
    "showCorrelated", "showHeadAttribution", "showUmap", "createdAt"]
EXPLANATION_FIELDS = [
    "id", "modelId", "layer", "index", "description", "authorId", "embedding", "triggeredById", "typeName",
    "explanationModelName", "notes", "createdAt"]
OURS = ["roles"]  # added to each activation record: the chat role of every token

MODEL_ID, SOURCE_ID = "tiny-llama", "1-instructsae-standard-128"


def read_rows(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode().splitlines()]


def batch_rows(source: Path, kind: str) -> list[dict]:
    files = sorted((source / kind).iterdir(), key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    return [row for path in files for row in read_rows(path)]


@pytest.fixture(scope="module")
def exported(store_and_sae, tmp_path_factory):  # noqa: F811
    """`features` and `export neuronpedia` on the same SAE and store (same top and context), and an autointerp
    report explaining two features."""
    store, sae = store_and_sae
    folder = tmp_path_factory.mktemp("neuronpedia")
    report = folder / "autointerp.json"
    features_out, out = folder / "features", folder / "exports"
    with pytest.MonkeyPatch.context() as monkeypatch:
        from instructsae.cli import main

        monkeypatch.setattr("sys.argv", ["instructsae", "features", "--sae", str(sae), "--store", str(store),
                                         "--out", str(features_out), "--top", "3", "--context", "2"])
        main()
        live = [f["id"] for f in json.loads((features_out / "features.json").read_text())["features"]]
        # autointerp's report: settings, and per feature its explanation (or, from a rubric-only run, the rubric's)
        report.write_text(json.dumps({"settings": {"model": "judge-x", "scorers": ["detection", "rubric"]},
                                      "features": [
            {"id": live[0], "explanation": "robots", "detection": {"balanced_accuracy": 0.75}},
            {"id": live[2], "rubric": {"explanation": "the end", "score": 2}},
            {"id": live[1], "explanation": None}]}))
        monkeypatch.setattr("sys.argv", [
            "instructsae", "export", "neuronpedia", "--sae", str(sae), "--store", str(store), "--out", str(out),
            "--model-id", MODEL_ID, "--top", "3", "--context", "2", "--features-per-batch", "5",
            "--explanations", str(report), "--creator-id", "cme0test"])
        main()
    return json.loads((features_out / "features.json").read_text()), out / MODEL_ID / SOURCE_ID, live


def test_layout_is_saedashboards(exported):
    features, source, live = exported
    assert sorted(p.name for p in source.parent.parent.iterdir()) == [MODEL_ID]
    assert sorted(p.name for p in source.parent.iterdir()) == [SOURCE_ID]  # no lock or partial folder left
    n_batches = -(-len(live) // 5)
    assert sorted(p.name for p in source.iterdir()) == [
        "activations", "explanations", "features", "model.jsonl", "release.jsonl", "source.jsonl", "sourceset.jsonl"]
    for kind in ("features", "activations"):
        expected = sorted(f"batch-{n}.jsonl.gz" for n in range(n_batches))
        assert sorted(p.name for p in (source / kind).iterdir()) == expected
    for name, fields in [("model.jsonl", MODEL_FIELDS), ("source.jsonl", SOURCE_FIELDS),
                         ("release.jsonl", RELEASE_FIELDS), ("sourceset.jsonl", SOURCESET_FIELDS)]:
        rows = read_rows(source / name)
        assert len(rows) == 1 and list(rows[0]) == fields, name
        datetime.fromisoformat(rows[0]["createdAt"])
    for row in batch_rows(source, "features"):
        assert list(row) == FEATURE_FIELDS
    for row in batch_rows(source, "activations"):
        assert list(row) == ACTIVATION_FIELDS + OURS
    for row in batch_rows(source, "explanations"):
        assert list(row) == EXPLANATION_FIELDS
    model, source_row = read_rows(source / "model.jsonl")[0], read_rows(source / "source.jsonl")[0]
    assert model["id"] == MODEL_ID and model["dimension"] == 64
    assert (source_row["id"], source_row["modelId"], source_row["setName"]) == (
        SOURCE_ID, MODEL_ID, "instructsae-standard-128")
    assert read_rows(source / "sourceset.jsonl")[0]["releaseName"] == "instructsae-standard-128"


def test_rows_carry_what_features_measured(exported):
    features, source, live = exported
    by_id = {f["id"]: f for f in features["features"]}
    rows = batch_rows(source, "features")
    assert [row["index"] for row in rows] == live  # every live feature, in id order, batch after batch
    for row in rows:
        feature = by_id[row["index"]]
        assert (row["modelId"], row["layer"], row["creatorId"]) == (MODEL_ID, SOURCE_ID, "cme0test")
        assert row["frac_nonzero"] == feature["density"]
        assert row["maxActApprox"] == feature["top"][0]["activation"]
        assert row["pos_str"] == [t for t, _ in feature["logits"]["promoted"]]
        assert row["pos_values"] == [v for _, v in feature["logits"]["promoted"]]
        assert row["neg_str"] == [t for t, _ in feature["logits"]["suppressed"]]
        assert row["neg_values"] == sorted(row["neg_values"]) and row["neg_values"][0] < 0
        width = feature["histogram"]["width"]
        assert row["freq_hist_data_bar_heights"] == feature["histogram"]["counts"]
        assert row["freq_hist_data_bar_values"] == pytest.approx(
            [(b + 0.5) * width for b in range(len(feature["histogram"]["counts"]))], abs=5e-6)  # bin centres, 5 places
        logit_hist = feature["logits"]["histogram"]
        assert row["logits_hist_data_bar_heights"] == logit_hist["counts"] and sum(logit_hist["counts"]) == 300
        assert row["logits_hist_data_bar_values"][0] == pytest.approx(logit_hist["low"] + logit_hist["width"] / 2,
                                                                     abs=5e-6)
    activations = batch_rows(source, "activations")
    expected = [(f["id"], c) for f in features["features"] for c in f["top"]]
    assert len(activations) == len(expected) and len({row["id"] for row in activations}) == len(activations)
    for row, (feature_id, context) in zip(activations, expected):
        assert row["id"].startswith("c") and len(row["id"]) == 25
        assert (row["index"], row["layer"], row["modelId"]) == (feature_id, SOURCE_ID, MODEL_ID)
        assert row["tokens"] == context["tokens"] and row["values"] == context["acts"]
        assert row["roles"] == [role for role, count in context["roles"] for _ in range(count)]
        assert len(row["roles"]) == len(row["tokens"]) == len(row["values"])
        assert row["qualifyingTokenIndex"] == context["focus"] and row["dataIndex"] == str(context["instance"])
        assert row["maxValue"] == max(row["values"]) == row["values"][row["maxValueTokenIndex"]]
        assert row["minValue"] == min(row["values"])
        assert (row["binMin"], row["binContains"]) == (-1, -1)  # SAEDashboard's marks of a top-activations record
        assert row["binMax"] == by_id[feature_id]["top"][0]["activation"]
    assert {"user", "assistant", "template"} <= {role for row in activations for role in row["roles"]}


def test_explanations_are_the_reports(exported):
    _, source, live = exported
    rows = batch_rows(source, "explanations")
    assert [(row["index"], row["description"]) for row in rows] == [(live[0], "robots"), (live[2], "the end")]
    for row in rows:
        assert (row["modelId"], row["layer"], row["authorId"]) == (MODEL_ID, SOURCE_ID, "cme0test")
        assert row["explanationModelName"] == "judge-x" and row["typeName"] == "instructsae-autointerp"


def test_a_rerun_replaces_the_source_folder_whole(exported, store_and_sae, monkeypatch, capsys):  # noqa: F811
    _, source, live = exported
    store, sae = store_and_sae
    out = source.parent.parent
    code, printed, err = run_cli(monkeypatch, capsys, "export", "neuronpedia", "--sae", str(sae), "--store",
                                 str(store), "--out", str(out), "--model-id", MODEL_ID, "--features-per-batch", "1000",
                                 "--logits", "0")
    assert code == 0, err
    assert f"{len(live):,} features" in printed and "in 1 batches" in printed
    assert sorted(p.name for p in source.iterdir()) == [
        "activations", "features", "model.jsonl", "release.jsonl", "source.jsonl", "sourceset.jsonl"]
    assert [p.name for p in (source / "features").iterdir()] == ["batch-0.jsonl.gz"]
    assert all(row["pos_str"] == [] for row in batch_rows(source, "features"))  # --logits 0: no model loaded
    assert sorted(p.name for p in out.iterdir()) == [MODEL_ID]


def test_refuses_a_source_folder_with_other_files(store_and_sae, tmp_path, monkeypatch, capsys):  # noqa: F811
    store, sae = store_and_sae
    source = tmp_path / MODEL_ID / SOURCE_ID
    source.mkdir(parents=True)
    (source / "notes.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "export", "neuronpedia", "--sae", str(sae), "--store", str(store),
                           "--out", str(tmp_path), "--model-id", MODEL_ID, "--logits", "0")
    assert_one_line_error(code, err, "notes.txt", SOURCE_ID)
    assert [p.name for p in source.iterdir()] == ["notes.txt"]


def test_a_bad_explanations_file_is_one_line_and_writes_nothing(store_and_sae, tmp_path, monkeypatch,  # noqa: F811
                                                               capsys):
    store, sae = store_and_sae
    (tmp_path / "report.json").write_text(json.dumps({"features": [{"explanation": "no id"}]}))
    for report, expected in [(tmp_path / "report.json", "not an autointerp report"),
                             (tmp_path / "missing.json", "does not exist")]:
        code, _, err = run_cli(monkeypatch, capsys, "export", "neuronpedia", "--sae", str(sae), "--store", str(store),
                               "--out", str(tmp_path / "out"), "--explanations", str(report))
        assert_one_line_error(code, err, "--explanations", expected)
    assert not (tmp_path / "out").exists()


def test_default_model_ids_are_neuronpedias_style(tmp_path):
    from instructsae.evaluate.neuronpedia import default_model_id

    assert default_model_id("smollm2") == "smollm2-135m-instruct"  # the embedded model, by its hub id
    assert default_model_id("google/gemma-2-2b-it") == "gemma-2-2b-it"
    assert default_model_id(str(tmp_path / "Tiny-Llama") + "/") == "tiny-llama"
    assert default_model_id("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct.q4_1"
