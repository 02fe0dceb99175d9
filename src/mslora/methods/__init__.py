"""Built-in methods; importing this package registers them (see :mod:`mslora.registry`)."""
from mslora.methods import baselines, mslora  # noqa: F401
