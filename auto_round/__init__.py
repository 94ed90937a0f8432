"""auto-round: SignRound post-training quantization of LLMs, with exports that real runtimes load.

    from auto_round import AutoRound
    AutoRound("path/or/hub-id", scheme="W4A16").quantize_and_save("./out", format="auto_round")

Imports are lazy so that `transformers` can import `auto_round.inference` cheaply.
"""

from .version import __version__

__all__ = ["AutoRound", "AutoScheme", "QuantScheme", "PRESET_SCHEMES", "__version__"]


def __getattr__(name):
    if name == "AutoRound":
        from .compressor import AutoRound

        return AutoRound
    if name == "AutoRoundAdam":  # the reference's deprecated entry point: AutoRound with enable_adam=True
        from functools import partial

        from .compressor import AutoRound

        return partial(AutoRound, enable_adam=True)
    if name == "AutoScheme":
        from .algorithms.autoscheme import AutoScheme

        return AutoScheme
    if name in ("QuantScheme", "PRESET_SCHEMES"):
        from . import schemes

        return getattr(schemes, name)
    raise AttributeError(f"module 'auto_round' has no attribute {name!r}")
