"""Dense tasks end to end: the scene set, the COCO / VOC / ADE20K readers and layout recognition, `--task detect`
and `--task segment` on the engine, adapter files that rebuild the whole model, frozen BatchNorm under `full`."""
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mslora
from mslora.data.dense import load_dense, recognise
from mslora.data.transforms import IGNORE
from mslora.data.scenes import write_scenes
from mslora.engine import TrainConfig, evaluate_adapter, train
from mslora.tasks import get_task


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A tiny scene set: 3 'garment' classes of solid shapes, 8 / 4 / 4 images."""
    root = tmp_path_factory.mktemp("scenes") / "s"
    return write_scenes(root, *_garments(), ["square", "bar", "disc"], {"train": 8, "val": 4, "test": 4})


def test_scene_set_is_deterministic_and_consistent(scenes, tmp_path):
    d = json.loads((scenes / "annotations" / "instances_train2017.json").read_text())
    assert [c["name"] for c in d["categories"]] == ["square", "bar", "disc"] and len(d["images"]) == 8
    again = write_scenes(tmp_path / "again", *_garments(), ["square", "bar", "disc"], {"train": 8, "val": 4, "test": 4})
    assert (again / "annotations" / "instances_train2017.json").read_text() == json.dumps(d)
    det = load_dense(str(scenes), "detect")
    seg = load_dense(str(scenes), "segment")
    assert det.classes == ["square", "bar", "disc"] and seg.classes == ["background", "square", "bar", "disc"]
    assert (len(det.train), len(det.val), len(det.test)) == (8, 4, 4)
    _, t = det.train.base[0]
    _, y = seg.train.base[0]
    for m, c in zip(t["masks"], t["labels"]):  # the semantic map holds each instance's class on its pixels
        assert (y[m.bool()] == c).all()
    assert (y[t["masks"].sum(0) == 0] == 0).all()
    sizes = [max(a["bbox"][2:]) for a in d["annotations"]]
    assert min(sizes) < 40 and all(s <= 120 for s in sizes)


def _garments():
    """(train images, labels, test images, labels): squares, bars and discs as 28x28 'garments'."""
    g = np.zeros((30, 28, 28), np.uint8)
    g[0::3, 4:24, 4:24] = 220
    g[1::3, 2:26, 10:18] = 220
    for i in range(2, 30, 3):
        yy, xx = np.mgrid[:28, :28]
        g[i][(yy - 14) ** 2 + (xx - 14) ** 2 < 100] = 220
    labels = np.arange(30) % 3
    return g, labels, g, labels


def _voc(root, objects, main=("train", "val"), seg=False):
    """A VOC folder: one 32x48 image per entry of ``objects`` (list of (name, box, difficult))."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for k, objs in enumerate(objects):
        stem = f"2007_{k:06d}"
        ids.append(stem)
        Image.fromarray(np.full((32, 48, 3), 20 * k, np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        ann = ET.Element("annotation")
        size = ET.SubElement(ann, "size")
        for t, v in (("width", 48), ("height", 32), ("depth", 3)):
            ET.SubElement(size, t).text = str(v)
        for name, (x1, y1, x2, y2), diff in objs:
            o = ET.SubElement(ann, "object")
            ET.SubElement(o, "name").text = name
            ET.SubElement(o, "difficult").text = str(int(diff))
            b = ET.SubElement(o, "bndbox")
            for t, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
                ET.SubElement(b, t).text = str(v)
        ET.ElementTree(ann).write(root / "Annotations" / f"{stem}.xml")
        lbl = np.zeros((32, 48), np.uint8)
        lbl[4:20, 4:20] = 15
        lbl[0, :] = 255
        png = Image.fromarray(lbl, mode="L").convert("P")
        png.save(root / "SegmentationClass" / f"{stem}.png")
    for split in main:
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_detection_reader_honours_difficult_and_class_names(tmp_path):
    objs = [[("dog", (5, 6, 20, 25), False), ("cat", (22, 3, 40, 30), True)]] * 10
    root = _voc(tmp_path / "VOCdevkit" / "VOC2007", objs)
    assert recognise(tmp_path, "detect") == ("voc", root)
    data = load_dense(str(tmp_path), "detect")
    assert len(data.classes) == 20 and data.classes[11] == "dog"  # VOC's own 20 names
    assert (len(data.train), len(data.val), len(data.test)) == (9, 1, 10)  # no test.txt: val held out of train
    _, t = data.train.base[0]
    assert t["boxes"].tolist() == [[4.0, 5.0, 20.0, 25.0]] and t["labels"].tolist() == [12]  # difficult cat left out
    gt = data.coco["test"][0]
    assert sorted(a["iscrowd"] for a in gt.dataset["annotations"][:2]) == [0, 1]  # ignored by COCO's evaluator
    (root / "classes.txt").write_text("dog\ncat\n")
    assert load_dense(str(root), "detect").classes == ["dog", "cat"]
    (root / "classes.txt").unlink()
    _voc(tmp_path / "own", [[("widget", (1, 1, 9, 9), False)]] * 3)
    assert load_dense(str(tmp_path / "own"), "detect").classes == ["widget"]  # names from the XML files


def test_voc_segmentation_and_ade20k_labels(tmp_path):
    _voc(tmp_path / "voc", [[("dog", (1, 1, 9, 9), False)]] * 4, main=("train", "val", "test"))
    voc = load_dense(str(tmp_path / "voc"), "segment")
    assert len(voc.classes) == 21 and len(voc.test) == 4
    _, y = voc.train.base[0]
    assert y[10, 10] == 15 and y[0, 0] == IGNORE and y[25, 40] == 0

    ade = tmp_path / "ADEChallengeData2016"
    for s in ("training", "validation"):
        (ade / "images" / s).mkdir(parents=True)
        (ade / "annotations" / s).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(ade / "images" / s / f"{k}.jpg")
            lbl = np.full((20, 30), 3, np.uint8)
            lbl[:5] = 0
            Image.fromarray(lbl).save(ade / "annotations" / s / f"{k}.png")
    data = load_dense(str(tmp_path), "segment")
    _, y = data.train.base[0]
    assert y[0, 0] == IGNORE and y[10, 10] == 2  # 0 ignored, the rest shifted down
    assert data.classes == ["0", "1", "2"]  # no names shipped: the label values found
    info = "Idx\tRatio\tTrain\tVal\tName\n1\t0.1\t1\t1\twall\n2\t0.1\t1\t1\tbuilding;edifice\n"
    (ade / "objectInfo150.txt").write_text(info + "3\t0.1\t1\t1\tsky\n")
    assert load_dense(str(tmp_path), "segment").classes == ["wall", "building", "sky"]
    (ade / "objectInfo150.txt").write_text(info)  # two names: the maps' value 3 (class 2) is no class
    with pytest.raises(ValueError, match=r"label map '.*training/0.png' holds value 3, not a class of the 2"):
        load_dense(str(tmp_path), "segment")


def test_unrecognised_layout_names_what_it_looked_for(tmp_path):
    with pytest.raises(ValueError, match=r"in no layout the 'segment' task reads: looked for .*instances_train2017"
                                         r".*SegmentationClass.*images/training"):
        load_dense(str(tmp_path), "segment")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dense(str(tmp_path / "nope"), "detect")


def _cfg(task, data, tmp_path, **kw):
    kw = {"img_size": 96, "epochs": 2, **kw}
    return TrainConfig(task=task, data=str(data), backbone="test_resnet", pretrained=False, batch_size=2,
                       output=str(tmp_path), head_channels=16, **kw)


@pytest.mark.parametrize("task,metric", [("detect", "bbox_AP"), ("segment", "mIoU")])
def test_dense_task_trains_and_its_adapter_file_rebuilds_the_model(task, metric, scenes, tmp_path):
    cfg = _cfg(task, scenes, tmp_path, method="mslora", method_options={"rank": 8, "groups": 1})
    metrics, run = train(cfg)
    keys = {"detect": ["bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl", "segm_AP"],
            "segment": ["mIoU", "mAcc", "aAcc"]}[task]
    assert all(metrics[f"test_{k}"] is None or 0.0 <= metrics[f"test_{k}"] <= 1.0 for k in keys)
    assert metrics[f"val_{metric}"] >= 0.0
    assert metrics["head_params"] > 0 and metrics["adapter_params"] > 0
    assert metrics["trainable_params"] == metrics["head_params"] + metrics["adapter_params"]
    again = evaluate_adapter(run)
    assert {k: again[f"test_{k}"] for k in keys} == {k: metrics[f"test_{k}"] for k in keys}
    # the rebuilt model is the trained one: same tensors, same outputs
    t = get_task(task)(cfg)
    torch.manual_seed(0)
    rebuilt = t.build_model(adapter=run / "adapter.safetensors").eval()
    tensors, meta = mslora.core.state.read_adapter(run / "adapter.safetensors")
    assert meta["backbone"] == cfg.backbone  # the timm backbone inside the detector / segmenter, not null
    assert any(k.startswith(("backbone.fpn.", "roi_heads.", "decode_head.")) for k in tensors)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in tensors.items())


def test_full_fine_tuning_keeps_backbone_batchnorm_statistics(scenes, tmp_path):
    t = get_task("segment")(_cfg("segment", scenes, tmp_path, method="full"))
    model = t.build_model()
    t.set_transforms(model)
    bn = {n: b.clone() for n, b in model.backbone.model.named_buffers() if "running" in n}
    model.train()
    x = torch.rand(2, 3, 64, 64)
    sum(model(x, torch.zeros(2, 64, 64, dtype=torch.long)).values()).backward()
    assert bn and all(torch.equal(b, dict(model.backbone.model.named_buffers())[n]) for n, b in bn.items())
    assert all(p.grad is not None for p in model.backbone.model.parameters() if p.requires_grad and p.ndim == 4)


def test_bad_detector_and_masks_on_voc_are_refused(scenes, tmp_path):
    with pytest.raises(ValueError, match="detector='yolo' is not one of"):
        get_task("detect")(_cfg("detect", scenes, tmp_path, detector="yolo"))
    _voc(tmp_path / "voc", [[("dog", (1, 1, 9, 9), False)]] * 3)
    with pytest.raises(ValueError, match="needs instance masks, but the VOC detection layout has boxes only"):
        get_task("detect")(_cfg("detect", tmp_path / "voc", tmp_path))
    get_task("detect")(_cfg("detect", tmp_path / "voc", tmp_path, detector="retinanet"))


@pytest.mark.parametrize("method", ["adaptformer", "mona", "ssf", "bitfit", "vpt", "rlrr", "lora"])
def test_every_adapter_family_under_a_detector_on_vit_and_swin(method):
    """Feature-space, weight-space, prompt and bias methods under Faster R-CNN on random-init ViT and Swin."""
    import timm

    from mslora.tasks.detect import build_detector
    from mslora.core.adapt import lift_adaptation

    for name, kw in (("test_vit", dict(dynamic_img_size=True)),
                     ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 2),
                                                           img_size=64, window_size=4, strict_img_size=False))):
        if method == "vpt" and name.startswith("swin"):
            continue  # VPT's prompts are tokens of a plain ViT
        torch.manual_seed(0)
        model = mslora.adapt(timm.create_model(name, num_classes=0, **kw), method)
        inner = mslora.count_parameters(model)
        det = lift_adaptation(build_detector(model, "fasterrcnn", 3, min_size=64, max_size=96, channels=16,
                                             representation=32), model)
        det.train()
        images = [torch.rand(3, 64, 96), torch.rand(3, 64, 80)]
        targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1])}] * 2
        sum(det(images, targets).values()).backward()
        counts = mslora.count_parameters(det)
        adapter = [p for n, p in det.named_parameters() if n in det.mslora_adaptation.added]
        # bitfit trains backbone biases in place (no adapter tensor); every other method adds its own
        assert counts["adapter_params"] == inner["adapter_params"] == sum(p.numel() for p in adapter)
        assert (counts["adapter_params"] == 0) == (method == "bitfit")
        assert counts["trainable_params"] == counts["head_params"] + inner["trainable_params"]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in det.backbone.body.model.parameters()
                   if p.requires_grad), (name, method)


def test_detection_under_two_gloo_processes(scenes, tmp_path):
    """DDP (gloo, 2 CPU processes): the detector trains, the detections of every test image are gathered once."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", port, "-m", "mslora", "train", "--task", "detect", "--data",
                          str(scenes), "--backbone", "test_resnet", "--no-pretrained", "--epochs", "1",
                          "--batch-size", "4", "--img-size", "96", "--head-channels", "16", "--rank", "8",
                          "--device", "cpu", "--output", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    m = json.loads((run / "metrics.json").read_text())
    assert m["processes"] == 2 and m["test_images"] == 4 and 0.0 <= m["test_bbox_AP"] <= 1.0


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path(__file__).parent.parent.glob("configs/*.yaml")
                                         if p.name.startswith(("coco_", "voc_", "ade20k_"))))
def test_paper_configs_load(path):
    """Every shipped config parses into a dense-task TrainConfig with the papers' settings."""
    from mslora.engine.config import config_from_args as _train_config

    cfg = _train_config(["--config", path])
    assert cfg.task in ("detect", "segment") and cfg.epochs in (12, 36, 127) and cfg.batch_size == 16
    assert cfg.lr in (2e-4, 1e-4, 1.2e-4) and cfg.weight_decay in (0.05, 0.1)
    if cfg.task == "detect":
        assert cfg.anchor_scale == 8 and cfg.head_channels == 256
    else:  # mmseg's 160k-iteration schedules, with mmseg's classifier init
        assert cfg.head_channels == 512 and cfg.conv_seg_init == "mmseg"


def _coco(root, splits=("train", "val", "test"), n=2, semantic=False):
    """A COCO folder: per split ``n`` 48x64 images, each with one 20x10 'cat' rectangle (polygon) at (10, 10); with
    ``semantic``, semantic/{split}2017/<stem>.png label maps that differ from the painted instances (class 2 in a
    band the instances do not cover)."""
    (root / "annotations").mkdir(parents=True)
    for s in splits:
        (root / f"{s}2017").mkdir()
        if semantic:
            (root / "semantic" / f"{s}2017").mkdir(parents=True)
        images, anns = [], []
        for i in range(1, n + 1):
            Image.fromarray(np.full((48, 64, 3), 30 * i, np.uint8)).save(root / f"{s}2017" / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "height": 48, "width": 64})
            anns.append({"id": i, "image_id": i, "category_id": 7, "bbox": [10, 10, 20, 10], "area": 200,
                         "iscrowd": 0, "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]})
            if semantic:
                lbl = np.zeros((48, 64), np.uint8)
                lbl[30:40, :] = 2
                Image.fromarray(lbl).save(root / "semantic" / f"{s}2017" / f"{i}.png")
        (root / "annotations" / f"instances_{s}2017.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]}))
    return root


class Replay(torch.nn.Module):
    """A stub model that answers each call with the next prepared outputs (one per image, in loader order)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        n = len(images)
        out, self.outputs = self.outputs[:n], self.outputs[n:]
        return out if isinstance(out[0], dict) else torch.stack(out)


def _evaluate(task, model, split="test"):
    from torch.utils.data import DataLoader

    loader = DataLoader(task.datasets[split], batch_size=2, collate_fn=task.collate_fn)
    return task.evaluate(model, loader, lambda x: x, split)


def test_detection_evaluator_scores_the_ground_truth_one_and_a_shifted_box_as_computed_by_hand(tmp_path):
    task = get_task("detect")(_cfg("detect", _coco(tmp_path / "coco"), tmp_path))
    task.set_transforms(None)
    gt = [t for _, t in (task.datasets["test"][i] for i in range(len(task.datasets["test"])))]
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                "masks": t["masks"][:, None].float()} for t in gt]
    m = _evaluate(task, Replay(perfect))
    assert m["bbox_AP"] == pytest.approx(1.0) and m["segm_AP"] == pytest.approx(1.0) and m["images"] == 2
    # Each box moved 4 px right: IoU = 16 / 24 = 0.667, a true positive at the IoU thresholds 0.50 ... 0.65 (4 of
    # COCO's 10) with precision 1, a miss at 0.70 ... 0.95: box AP = 4 / 10, AP50 = 1, AP75 = 0. Masks kept: 1.0.
    shifted = [dict(p, boxes=p["boxes"] + torch.tensor([4.0, 0.0, 4.0, 0.0])) for p in perfect]
    m = _evaluate(task, Replay(shifted))
    assert m["bbox_AP"] == pytest.approx(0.4) and m["bbox_AP50"] == pytest.approx(1.0)
    assert m["bbox_AP75"] == pytest.approx(0.0) and m["segm_AP"] == pytest.approx(1.0)


def test_segmentation_evaluator_scores_the_ground_truth_one_and_a_half_wrong_map_as_computed(scenes, tmp_path):
    task = get_task("segment")(_cfg("segment", scenes, tmp_path, img_size=256))  # the canvases' size: no resize
    task.set_transforms(timm.create_model("test_resnet"))
    labels = [y for _, y in (task.datasets["test"][i] for i in range(len(task.datasets["test"])))]
    k = task.data.num_classes

    def logits(y):
        return torch.nn.functional.one_hot(torch.where(y == IGNORE, 0, y), k).permute(2, 0, 1).float()

    m = _evaluate(task, Replay([logits(y) for y in labels]))
    assert m["mIoU"] == pytest.approx(1.0) and m["aAcc"] == pytest.approx(1.0) and m["images"] == len(labels)
    # Everything predicted as background: IoU(background) = its pixels / all valid pixels, every other class present
    # in the labels scores 0 (predicted nowhere, present in the labels).
    zeros = [logits(torch.zeros_like(y)) for y in labels]
    valid = torch.cat([y[y != IGNORE] for y in labels])
    present = len(torch.unique(valid))
    expected = (valid == 0).sum().item() / valid.numel() / present
    assert _evaluate(task, Replay(zeros))["mIoU"] == pytest.approx(expected)


def test_coco_semantic_png_layout_is_read_before_painting_instances(tmp_path):
    root = _coco(tmp_path / "coco", semantic=True)
    data = load_dense(str(root), "segment")
    assert data.classes == ["background", "cat", "dog"]
    _, y = data.test.base[0]
    assert (y[30:40] == 2).all() and (y[12:18, 12:28] == 0).all()  # the PNG's values, not the painted cat
    for png in (root / "semantic").rglob("*.png"):
        png.unlink()
    _, y = load_dense(str(root), "segment").test.base[0]
    assert (y[12:18, 12:28] == 1).all() and (y[30:40] == 0).all()  # no PNGs: the instances painted by class


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_predict_files_score_what_the_evaluator_scored(task, scenes, tmp_path):
    """mslora predict on the test images: COCO AP from the written results JSON (detect) and mIoU from the written
    label maps (segment) equal what evaluation reports for the same run."""
    from pycocotools.coco import COCO

    from mslora.data.coco import coco_evaluate
    from mslora.tasks.segment import confusion_matrix, segmentation_metrics
    from mslora.tools.predict import predict_files

    cfg = _cfg(task, scenes, tmp_path, method="mslora", method_options={"rank": 8, "groups": 1}, epochs=1)
    metrics, run = train(cfg)
    gt = COCO(str(scenes / "annotations" / "instances_test2017.json"))
    files = [str(scenes / "test2017" / img["file_name"]) for img in gt.dataset["images"]]
    out, _, skipped = predict_files(str(run), files, str(tmp_path / "pred"), batch_size=3, score_threshold=0.0,
                                    device="cpu")
    assert not skipped
    if task == "detect":
        ids = json.loads((out / "image_ids.json").read_text())
        by_file = {str(scenes / "test2017" / img["file_name"]): img["id"] for img in gt.dataset["images"]}
        ours = {k: by_file[path] for path, k in ids.items()}
        dets = [dict(d, image_id=ours[d["image_id"]]) for d in json.loads((out / "results.json").read_text())]
        for kind in ("bbox", "segm"):
            assert coco_evaluate(gt, dets, kind)["AP"] == pytest.approx(metrics[f"test_{kind}_AP"], abs=1e-9)
        assert len(list(out.glob("*.png"))) == len(files)
    else:
        t = get_task("segment")(cfg)
        total = torch.zeros(t.num_classes, t.num_classes, dtype=torch.long)
        for k, (_, label) in enumerate(t.data.test.base[i] for i in range(len(files))):
            pred = torch.from_numpy(np.asarray(Image.open(next(out.glob(f"{k + 1:05d}_*_labels.png")))).astype(np.int64))
            total += confusion_matrix(pred, label, t.num_classes)
        assert segmentation_metrics(total)["mIoU"] == pytest.approx(metrics["test_mIoU"], abs=1e-9)


# --- UPerNet / FCN heads as mmsegmentation builds them ---------------------------------------------------------

def test_seg_classifiers_are_mmseg_cls_seg_dropout_then_normal_conv_seg():
    from mslora.tasks.segment import UPerNet

    torch.manual_seed(0)
    model = UPerNet(timm.create_model("test_resnet", num_classes=0), num_classes=5, channels=512,
                    conv_seg_init="mmseg")
    for head in (model.decode_head, model.auxiliary_head):
        drop, conv_seg = head.classifier  # mmseg BaseDecodeHead.cls_seg: dropout, then conv_seg
        assert isinstance(drop, torch.nn.Dropout2d) and drop.p == 0.1
        assert conv_seg.kernel_size == (1, 1) and torch.equal(conv_seg.bias, torch.zeros(5))
        assert abs(conv_seg.weight.std().item() - 0.01) < 0.001 and abs(conv_seg.weight.mean().item()) < 0.001
    feats = torch.ones(1, 512, 4, 4)
    head = model.decode_head.classifier.train()
    assert (head[0](feats).flatten(2).amax(2) == 0).sum() > 20  # whole channels dropped in training (~51 of 512)
    head.eval()
    torch.testing.assert_close(head(feats), head[1](feats))  # and none at evaluation
    # conv_seg_init="pytorch" (the training default) keeps torch's Conv2d init: kaiming-uniform(a=sqrt(5)), i.e.
    # U(+-1/sqrt(C)) for the weight and the bias alike
    model = UPerNet(timm.create_model("test_resnet", num_classes=0), num_classes=5, channels=512,
                    conv_seg_init="pytorch")
    for head, c in ((model.decode_head, 512), (model.auxiliary_head, 256)):
        conv_seg = head.classifier[1]
        assert abs(conv_seg.weight.std().item() - (3 * c) ** -0.5) < 0.1 * (3 * c) ** -0.5
        assert conv_seg.weight.abs().max() <= c ** -0.5 and 0 < conv_seg.bias.abs().max() <= c ** -0.5
    with pytest.raises(ValueError, match="'xavier'"):
        UPerNet(timm.create_model("test_resnet", num_classes=0), num_classes=5, conv_seg_init="xavier")


@pytest.mark.parametrize("conv_seg_init", ["pytorch", "mmseg"])
def test_short_segment_run_leaves_the_background_only_state_with_the_default_init(conv_seg_init, tmp_path):
    """A short run at a high lr (the scene recipe's regime: AdamW at 1e-3, a few hundred steps, most pixels
    background) learns past "background everywhere" with the default (torch's) conv_seg init; with mmseg's
    N(0, 0.01) it stays there, which is why that init is not the training default (README 'Dense tasks')."""
    data = write_scenes(tmp_path / "s", *_garments(), ["square", "bar", "disc"], {"train": 32, "val": 4, "test": 4})
    cfg = _cfg("segment", data, tmp_path, method="fixed", epochs=10, conv_seg_init=conv_seg_init, test=False)
    metrics, _ = train(cfg)
    task = get_task("segment")(cfg)
    task.set_transforms(timm.create_model("test_resnet"))
    valid = torch.cat([y[y != IGNORE] for _, y in (task.datasets["val"][i] for i in range(len(task.datasets["val"])))])
    background_only = (valid == 0).float().mean().item() / len(torch.unique(valid))  # IoU(bg) / classes present
    if conv_seg_init == "pytorch":
        assert metrics["val_mIoU"] > background_only + 0.03
    else:
        assert metrics["val_mIoU"] == pytest.approx(background_only, abs=1e-3)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_seg_loss_averages_as_mmseg_cross_entropy_loss(avg_non_ignore):
    from mslora.tasks.segment import cross_entropy

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=gen)
    target = torch.randint(0, 4, (2, 3, 5), generator=gen)
    target[0, :2] = IGNORE  # 10 of 30 pixels ignored
    # mmseg: F.cross_entropy(reduction='none', ignore_index) -> 0 at ignored pixels; weight_reduce_loss 'mean' over
    # every element, or over the non-ignored count when avg_non_ignore=True
    logp = torch.log_softmax(logits, 1)
    per_pixel = [(-logp[b, target[b, i, j], i, j]).item() if target[b, i, j] != IGNORE else 0.0
                 for b in range(2) for i in range(3) for j in range(5)]
    denominator = 20 if avg_non_ignore else 30
    expected = sum(per_pixel) / denominator
    assert cross_entropy(logits, target, IGNORE, avg_non_ignore).item() == pytest.approx(expected, rel=1e-6)
