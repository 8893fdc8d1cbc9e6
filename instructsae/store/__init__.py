"""The activation store: a zarr v3 group, the floor beneath extraction, training and evaluation.

layout.py (arrays and dtypes), location.py (where a store lives), writer.py (append, commit, resume),
reader.py (committed rows only).

Layout (one row per stored token unless noted):
  acts/layer_{L}     (n_tokens, d_model)  bf16 kept as a uint16 view (zarr has no bfloat16), fp16 or fp32
  token_id           (n_tokens,)          int32
  instance           (n_tokens,)          int32    index of the sequence the model ran
  position           (n_tokens,)          int32    position in that sequence
  role               (n_tokens,)          uint8    code from schemas.manifest.ROLES
  instance_start     (n_instances,)       int64    row of the instance's first stored token
  instance_length    (n_instances,)       int32    stored tokens of the instance
  instance_source    (n_instances,)       int64    dataset row of the instance (its first token's, in BT)
The manifest in the group attributes is the commit record: rows beyond its counts are uncommitted
and are cut off on resume, so a killed extraction loses and duplicates nothing.

A store lives at a local path or any fsspec URL (`file://`, `memory://`, `s3://` with s3fs installed, ...).
"""
