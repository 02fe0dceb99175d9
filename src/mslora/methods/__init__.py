"""Built-in methods; importing this package registers them (see :mod:`mslora.registry`)."""
from mslora.methods import adapters, baselines, colora, mona, mslora, peft_methods, rlrr, vpt  # noqa: F401
