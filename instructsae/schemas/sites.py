"""The hook sites of a decoder layer whose activations a store can hold, and how the manifest names them."""

from typing import Literal

# Hook sites of a decoder layer, in the order a forward pass reaches them. resid_post alone is a store made
# before sites (its arrays and statistics keep their names); the others are read around the layer's `self_attn`
# and `mlp` modules (mlp_in: the MLP's input, after its norm).
SITES = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
Site = Literal["resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post"]
DEFAULT_SITE = "resid_post"


def stats_key(layer: int, site: str) -> str:
    """The manifest's layer_stats key of (layer, site): the bare layer for resid_post, as stores always had."""
    return str(layer) if site == DEFAULT_SITE else f"{layer}.{site}"


def sites_in_order(sites) -> tuple[str, ...]:
    """Sites without repeats, in forward order; an unknown one is a ValueError naming the known ones."""
    unknown = [site for site in sites if site not in SITES]
    if unknown:
        raise ValueError(f"unknown hook site {unknown[0]!r} (known: {', '.join(SITES)})")
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites repeat: {list(sites)}")
    return tuple(site for site in SITES if site in sites)
