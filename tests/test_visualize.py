"""mslora visualize: maps per site with adapters bypassed and applied, site choice, the CLI end to end."""
import pytest
import timm
import torch
from PIL import Image

import mslora
from mslora.cli import main
from mslora.tools.visualize import choose_sites, site_maps


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_site_maps_frozen_adapted_and_update(backbone):
    torch.manual_seed(0)
    # zero_init_last=False: a random-init timm ResNet zeroes each block's last BatchNorm, so an adapter inside a block
    # could not change what later sites see
    kw = {"zero_init_last": False} if backbone == "test_resnet" else {}
    model = timm.create_model(backbone, num_classes=3, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = {}
    model = mslora.adapt(model, "mslora", rank=8, zero_init=False)
    rows = site_maps(model, x)
    assert len(rows) == sum(1 for m in model.modules() if type(m).__name__ == "MSLoRA")
    for r in rows:
        assert r["frozen"].shape == r["adapted"].shape == r["update"].shape and r["frozen"].shape[0] == 2
        assert r["update"].abs().sum() > 0
    # "frozen" is the backbone with every adapter bypassed: at the last site (after all the others) it is the
    # unadapted backbone's features there, which the adapted model's own input to that site is not
    last = dict(model.named_modules())[rows[-1]["name"]]
    h = last.register_forward_hook(lambda m, a, o: feats.update(adapted_in=m.layout.to_2d(a[0])[0]))  # returns None
    with torch.no_grad():
        model(x)
    h.remove()
    plain = mslora.unadapt(model)
    site = rows[-1]["name"].removeprefix("adapters.")
    site = next(n for n, _ in plain.named_modules() if n.replace(".", "_") == site)
    h = plain.get_submodule(site).register_forward_hook(lambda m, a, o: feats.update(plain=o))
    with torch.no_grad():
        plain(x)
    h.remove()
    plain_map = last.layout.to_2d(feats["plain"])[0].abs().mean(1)
    torch.testing.assert_close(rows[-1]["frozen"], plain_map)
    assert not torch.allclose(rows[-1]["frozen"], feats["adapted_in"].abs().mean(1))
    chosen = choose_sites(rows)
    sizes = [tuple(r["frozen"].shape[-2:]) for r in chosen]
    if backbone == "test_vit":  # one resolution: evenly spaced, the last block included
        assert len(chosen) == min(4, len(rows)) and chosen[-1] is rows[-1]
    else:  # one per resolution, the last of each
        assert len(set(sizes)) == len(sizes) == len({tuple(r["frozen"].shape[-2:]) for r in rows})


def test_visualize_cli(image_folder, tmp_path, capsys):
    out = tmp_path / "runs"
    common = ["--backbone", "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "4", "--img-size", "32",
              "--data", str(image_folder), "--output", str(out), "--device", "cpu"]
    assert main(["train", "--method", "mslora", "--rank", "4", *common]) == 0
    (run,) = out.iterdir()
    image = next(image_folder.rglob("*.png"))
    assert main(["visualize", "--adapter", str(run), "--image", str(image), "--output", str(tmp_path / "vis"),
                 "--img-size", "64"]) == 0
    png = tmp_path / "vis" / f"{image.stem}_mslora.png"
    assert str(png) in capsys.readouterr().out and Image.open(png).size[0] > 400
    assert main(["visualize", "--adapter", str(run), "--image", str(tmp_path / "none.png"), "--output",
                 str(tmp_path / "v2")]) == 2
    assert "none.png' is no file, folder or pattern" in capsys.readouterr().err
    assert main(["train", "--method", "bitfit", *common]) == 0
    other = next(p for p in out.iterdir() if p.name.startswith("bitfit"))
    assert main(["visualize", "--adapter", str(other), "--image", str(image), "--output", str(tmp_path / "v3")]) == 2
    assert "is a bitfit adapter" in capsys.readouterr().err
