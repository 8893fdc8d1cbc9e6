"""The Hugging Face hub, asked before a slow failure: a model id that is not in the local cache fails in seconds
when the hub cannot be reached (offline mode on, or no connection), instead of after a minute of retries; a
cached one is then read from the cache without any request."""

import os
import socket
from urllib.parse import urlparse

from instructsae.errors import UserError

PROBE_SECONDS = 3.0


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Can a TCP connection to the hub's endpoint be opened? Offline mode says no without trying."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def use_cache_only() -> None:
    """Tell huggingface_hub (and transformers, which asks it) to use the cache and never retry the network."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # for what a later import reads


def is_cached(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: then not cached either
        return False


def check_model_id(model_id: str, what: str = "model") -> None:
    """A hub model id can be loaded without waiting on an unreachable hub, or one line says why not ("cannot
    load {what} 'ID': ...")."""
    from huggingface_hub import constants

    if hub_reachable():
        return
    if is_cached(model_id):
        use_cache_only()
        return
    why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else \
        f"the hub ({constants.ENDPOINT}) cannot be reached"
    raise UserError(f"cannot load {what} '{model_id}': not a local folder, .gguf file or embedded name, and not in "
                    f"the local Hugging Face cache while {why}: download it once with a connection, or give its "
                    "folder")
