"""Package version. transformers' AutoRoundQuantizer requires auto-round >= 0.5.0 to be installed."""

__version__ = "0.9.0"
