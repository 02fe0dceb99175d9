"""UPerNet with an auxiliary FCN head on adapted timm backbones, and the segmentation metrics."""
import pytest
import timm
import torch

import mslora
from mslora.tasks.segment import UPerNet, confusion_matrix, segmentation_metrics

BACKBONES = {
    "resnet": ("test_resnet", dict(zero_init_last=False)),
    "vit": ("test_vit", dict(dynamic_img_size=True)),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 2), img_size=64,
                                                   window_size=4, strict_img_size=False)),
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_upernet_trains_heads_and_adapters_only(backbone):
    name, kw = BACKBONES[backbone]
    torch.manual_seed(0)
    model = mslora.adapt(timm.create_model(name, num_classes=0, **kw), "mslora", rank=16)
    net = UPerNet(model, num_classes=5, channels=32)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if not n.startswith("adapters.")}
    x, y = torch.rand(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    y[:, :4] = 255  # ignored pixels
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()
    for _ in range(2):
        losses = net(x, y)
        assert set(losses) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    for n, t in model.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), n
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 5, 64, 96)


def test_metrics_on_a_known_confusion_matrix():
    # 3 classes; class 2 never appears nor is predicted (left out of the means); 255 ignored
    target = torch.tensor([0, 0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 0])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 0]]
    m = segmentation_metrics(cm)
    # IoU_0 = 2 / (3 + 3 - 2) = 0.5, IoU_1 = 1 / (2 + 2 - 1) = 1/3; acc_0 = 2/3, acc_1 = 1/2; pixel acc 3/5
    assert m["mIoU"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert m["mAcc"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert m["aAcc"] == pytest.approx(3 / 5)
