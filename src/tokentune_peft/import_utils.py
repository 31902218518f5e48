"""Optional libraries, checked in one place."""

from __future__ import annotations

import importlib.util


def is_trl_available() -> bool:
    """Whether TRL is installed (``pip install tokentune-peft[trl]``).

    Example:
        >>> isinstance(is_trl_available(), bool)
        True
    """
    return importlib.util.find_spec("trl") is not None


def require_trl(feature: str) -> None:
    """Raise ImportError naming ``feature`` and the install command when TRL is missing.

    Example:
        >>> require_trl("TokenTuneSFTTrainer") if is_trl_available() else None
    """
    if not is_trl_available():
        raise ImportError(f"{feature} needs TRL: pip install 'tokentune-peft[trl]'.")
