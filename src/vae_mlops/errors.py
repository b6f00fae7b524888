"""The one base class of every error the project expects and reports as one clear message.

`python -m vae_mlops` catches `VaeMlopsError`, prints its message and exits 2 with no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VaeMlopsError(RuntimeError):
    """A known fault: bad params or data, an unreachable store, a refused model. The message says what to do."""
