"""Shared fixtures: small random-init timm models (never the network) and a tiny image folder."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm / huggingface_hub are imported

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

torch.set_num_threads(2)

# name -> (timm model name, create_model kwargs) of a small random-init model with 4 classes: one per layout and
# family rule
SPECS = {
    # zero_init_last=False: a random-init timm ResNet zeroes each block's last BN, which would cut the
    # bottleneck (where MSLoRA sits) off from the loss; pretrained weights do not have that.
    "resnet": ("test_resnet", dict(zero_init_last=False)),  # NCHW
    # tokens with 1 class + 2 register tokens; average pooling of patch tokens so that the last block's
    # adapter reaches the logits (with class-token pooling it cannot: see test_class_token_pooling_...)
    "vit": ("test_vit", dict(reg_tokens=2, global_pool="avg")),
    "convnext": ("test_convnext", {}),  # NCHW, pre-norm style
    "efficientnet": ("test_efficientnet", {}),  # NCHW, BatchNormAct
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), img_size=64,
                                                   window_size=4)),  # NHWC
    "tnt": ("tnt_s_legacy_patch16_224", dict(depth=2, img_size=64, global_pool="avg")),  # blocks return tuples
}
MODELS = {k: (lambda name=name, kw=kw: timm.create_model(name, num_classes=4, **kw)) for k, (name, kw) in SPECS.items()}


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def sample_input(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    from mslora.core.placement import input_size

    c, h, w = input_size(model)
    h, w = min(h, 64), min(w, 64)  # CNNs take any size; keep tests fast
    if getattr(model, "patch_embed", None) is not None or getattr(model, "pixel_embed", None) is not None:
        h, w = input_size(model)[1:]
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 8 random 20x20 RGB PNGs in class sub-folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("ant", "bee", "cat"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def colour_folder(root, names, n, shape=lambda i: (24, 24)):
    """An ImageFolder of ``n`` noisy images per class, class c brighter in colour channel c (learnable in an epoch or
    two); ``shape(i)`` gives image i's (H, W). Returns ``root``."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 120, (*shape(i), 3), dtype=np.uint8)
            img[..., c] += 120
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """Two 1-epoch runs on the same backbone weights (a local file): 3 colour classes (mslora) and 2 (adapter);
    name -> (run directory, the images of its data)."""
    from mslora.engine import TrainConfig, train

    root = tmp_path_factory.mktemp("named")
    weights = root / "backbone.safetensors"
    save_file(make_model("resnet").state_dict(), str(weights))
    runs = {}
    for name, classes, method, options in (("rgb", ("red", "green", "blue"), "mslora", {"rank": 8}),
                                           ("rg", ("red", "green"), "adapter", {"rank": 4})):
        data = colour_folder(root / name, classes, 12)
        cfg = TrainConfig(data=str(data), split="full", backbone="test_resnet", weights=str(weights), epochs=1,
                          batch_size=8, img_size=32, lr=0.01, device="cpu", workers=0, output=str(root / "runs"),
                          method=method, method_options=options, seed=0)
        runs[name] = (train(cfg)[1], sorted(data.glob("*/*.png")))
    return runs
