"""SAE architectures, one per file, chosen by name from one registry."""

from instructsae.errors import UserError
from instructsae.schemas.train import DEFAULT_EXPANSION, SAEConfig
from instructsae.sae.base import LossOutput, SparseAutoencoder
from instructsae.sae.batchtopk import BatchTopKSAE
from instructsae.sae.jumprelu import JumpReLUSAE
from instructsae.sae.standard import StandardSAE
from instructsae.sae.topk import TopKSAE

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.architecture: cls for cls in (StandardSAE, JumpReLUSAE, TopKSAE, BatchTopKSAE)}
# read by build_sae and the trainer, not the module
TRAINER_FIELDS = {"arch", "expansion", "d_sae", "sparsity_coeff"}


def check_sae_config(cfg: SAEConfig, d_in: int) -> None:
    """What the schema cannot check alone: settings that depend on the model's width."""
    k = getattr(cfg, "k", None)
    if k is not None and k > cfg.width(d_in):
        how = "as given" if cfg.d_sae is not None else f"expansion {cfg.expansion or DEFAULT_EXPANSION} × d_in {d_in}"
        raise UserError(f"k {k} exceeds d_sae {cfg.width(d_in)} ({how})")


def build_sae(cfg: SAEConfig, d_in: int) -> SparseAutoencoder:
    """The SAE a config describes; architecture-specific fields become constructor arguments."""
    check_sae_config(cfg, d_in)
    extra = cfg.model_dump(exclude=TRAINER_FIELDS)
    return SAE_CLASSES[cfg.arch](d_in, cfg.width(d_in), **extra)


__all__ = ["SAE_CLASSES", "LossOutput", "SparseAutoencoder", "build_sae", "check_sae_config"]
