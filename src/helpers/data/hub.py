"""Reachability of the Hugging Face hub, for the online-only families and data (paper-scale presets).

Everything that downloads from the hub calls `require_hub` first, so an offline machine fails fast
with what to do instead, not after a long network time-out.
"""

from __future__ import annotations

import os
import socket


class HubUnreachable(RuntimeError):
    """The Hugging Face hub is needed (online-only family or data) but cannot be reached."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when `huggingface.co:443` accepts a connection and no offline flag is set."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    """Fail fast, with what to do instead, when `what` needs the Hugging Face hub and it is unreachable."""
    if not hub_reachable():
        raise HubUnreachable(
            f"{what} is downloaded from the Hugging Face hub, which cannot be reached from this machine "
            "(or HF_HUB_OFFLINE is set). Offline, use the embedded family (`family: embedded`, "
            "`-f params/default.yaml`) or `smollm2-135m`; run the paper-scale presets "
            "(`-f params/gpt2-small.yaml`, `params/gpt2-medium.yaml`) online, e.g. on a GPU machine or in Colab."
        )
