"""Stores with several hook sites: each site equals the module's own input/output in a plain forward pass,
arrays describe themselves, verify/convert/inspect handle them, and a store of the layout before sites reads as
resid_post."""

import json

import numpy as np
import pytest
import torch
import zarr

from instructsae.cli import cli
from instructsae.errors import UserError
from instructsae.extract.run import run_extract
from instructsae.lm.hooks import activations_at
from instructsae.lm.models import decoder_layers, load_model
from instructsae.schemas import ExtractConfig
from instructsae.store.reader import open_store
from instructsae.store.verify import verify_report

SITES = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")


def config(model_dir, dataset, out, **overrides) -> ExtractConfig:
    values = dict(model=str(model_dir), dataset=str(dataset), out=str(out), layers=(0, 1), sites=SITES,
                  dtype="float32", model_dtype="float32", chunk_tokens=32, batch_tokens=256, shard_mb=0.02,
                  keep_first_token=True)
    values.update(overrides)
    return ExtractConfig(**values)


def reference_sites(model, token_ids) -> dict:
    """Each site written out by hand from the layer's own modules (Llama), no hooks of ours."""
    found = {}
    layers = decoder_layers(model)

    def keep(name, use_input):
        def hook(_module, args, output):
            found[name] = (args[0] if use_input else output[0] if isinstance(output, tuple) else output).detach()
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep((index, "resid_pre"), True)))
        handles.append(layer.register_forward_hook(keep((index, "resid_post"), False)))
        handles.append(layer.self_attn.register_forward_hook(keep((index, "attn_out"), False)))
        handles.append(layer.mlp.register_forward_hook(keep((index, "mlp_in"), True)))
        handles.append(layer.mlp.register_forward_hook(keep((index, "mlp_out"), False)))
    model(input_ids=token_ids)
    for handle in handles:
        handle.remove()
    return found


def test_every_site_equals_the_modules_own_tensors(tiny_model_dir, dialogues_jsonl, tmp_path):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store")
    run_extract(cfg, show_progress=False)
    reader = open_store(cfg.out)
    assert reader.sites == SITES and len(reader.acts_keys) == 10
    lm = load_model(str(tiny_model_dir), "float32")
    start, length = int(reader.read_column("instance_start")[3]), int(reader.read_column("instance_length")[3])
    token_ids = torch.from_numpy(reader.read_column("token_id")[start:start + length].astype(np.int64))[None]
    expected = reference_sites(lm.model, token_ids)
    # the residual stream's pieces add up: resid_post = resid_pre + attn_out + mlp_out
    torch.testing.assert_close(expected[(1, "resid_post")], expected[(1, "resid_pre")] + expected[(1, "attn_out")]
                               + expected[(1, "mlp_out")], atol=1e-5, rtol=1e-5)
    for layer in (0, 1):
        for site in SITES:
            stored = reader.read_acts(layer, start, start + length, site)
            torch.testing.assert_close(stored, expected[(layer, site)][0], atol=1e-5, rtol=1e-5)
    stats = reader.manifest.layer_stats
    assert set(stats) == {"0", "1", *(f"{layer}.{site}" for layer in (0, 1) for site in SITES[:-1])}
    assert all(entry.count == reader.n_tokens for entry in stats.values())


def test_hooks_stop_after_the_deepest_layer(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), "float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    found = activations_at(lm.model, [(0, "mlp_in"), (0, "mlp_out")], ids)
    assert set(found) == {(0, "mlp_in"), (0, "mlp_out")}
    reached = []
    handle = decoder_layers(lm.model)[1].register_forward_pre_hook(lambda *_: reached.append(1))
    activations_at(lm.model, [(0, "attn_out")], ids)
    handle.remove()
    assert not reached  # layer 1 never ran


def test_arrays_describe_their_site_and_verify_convert_inspect(tiny_model_dir, dialogues_jsonl, tmp_path, capsys):
    cfg = config(tiny_model_dir, dialogues_jsonl, tmp_path / "store", layers=(1,), sites=("mlp_in", "mlp_out"))
    first = run_extract(cfg, show_progress=False)
    assert run_extract(cfg, show_progress=False) == first  # a rerun finds it finished: the same config
    capsys.readouterr()
    group = zarr.open_group(str(cfg.out), mode="r")
    assert group["acts/layer_1_mlp_in"].attrs["hook_site"] == "mlp_in"
    assert group["acts/layer_1_mlp_out"].attrs["layer"] == 1
    assert "acts/layer_1" not in [f"acts/{name}" for name in group["acts"].array_keys()]
    assert verify_report(str(cfg.out), show_progress=False)["ok"]
    cli.main(["inspect", str(cfg.out), "--json"], standalone_mode=False)
    summary = json.loads(capsys.readouterr().out)
    assert summary["manifest"]["identity"]["sites"] == ["mlp_in", "mlp_out"]
    assert set(summary["mean_sq_norm"]) == {"1.mlp_in", "1.mlp_out"}
    cli.main(["inspect", str(cfg.out)], standalone_mode=False)
    assert "sites=mlp_in,mlp_out" in capsys.readouterr().out
    shard = next(path for path in (tmp_path / "store" / "acts" / "layer_1_mlp_out").rglob("*") if path.is_file()
                 and path.name != "zarr.json")
    shard.unlink()
    report = verify_report(str(cfg.out), show_progress=False)
    assert not report["ok"] and "layer_1_mlp_out" in json.dumps(report["problems"])


def test_resid_post_alone_keeps_the_layout_and_fingerprint_of_stores_before_sites(tiny_model_dir, dialogues_jsonl,
                                                                                  tmp_path):
    plain = config(tiny_model_dir, dialogues_jsonl, tmp_path / "plain", sites=("resid_post",))
    run_extract(plain, show_progress=False)
    reader = open_store(plain.out)
    raw = zarr.open_group(str(plain.out), mode="r").attrs["instructsae"]
    assert "sites" not in raw["identity"] or raw["identity"]["sites"] is None
    assert reader.sites == ("resid_post",) and set(reader.manifest.layer_stats) == {"0", "1"}
    assert sorted(zarr.open_group(str(plain.out), mode="r")["acts"].array_keys()) == ["layer_0", "layer_1"]
    # what today's code wrote before sites existed: the same manifest without the field reads the same
    identity = {key: value for key, value in raw["identity"].items() if key != "sites"}
    from instructsae.schemas.manifest import StoreIdentity

    old = StoreIdentity.model_validate(identity)
    assert old.stored_sites == ("resid_post",) and old.fingerprint() == reader.manifest.fingerprint


def test_unknown_site_is_one_line(tiny_model_dir, dialogues_jsonl, tmp_path):
    with pytest.raises(UserError, match="sites"):
        cli.main(["extract", "--model", str(tiny_model_dir), "--dataset", str(dialogues_jsonl), "--out",
                  str(tmp_path / "s"), "--sites", "resid_post,mlp_middle"], standalone_mode=False)
