"""Pydantic models: every config, the store manifest. YAML and CLI flags are parsed into these."""

from instructsae.schemas.extract import ExtractConfig
from instructsae.schemas.features import FeaturesConfig
from instructsae.schemas.manifest import ROLE_CODE, ROLES, LayerStats, StoreIdentity, StoreManifest
from instructsae.schemas.train import JumpReLUConfig, OptimConfig, SAEConfig, StandardConfig, TrainConfig

__all__ = [
    "ExtractConfig", "FeaturesConfig", "ROLE_CODE", "ROLES", "LayerStats", "StoreIdentity", "StoreManifest",
    "JumpReLUConfig", "OptimConfig", "SAEConfig", "StandardConfig", "TrainConfig",
]
