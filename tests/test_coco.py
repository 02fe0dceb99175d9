"""COCO-layout reader (polygons, RLE, crowd regions) and COCO's evaluator on hand-checked cases."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mslora.data.coco import CocoDetection, coco_evaluate


@pytest.fixture
def coco_root(tmp_path):
    """Two 40x60 images; image 1: a polygon 'cat' and a crowd region; image 2: an RLE 'dog'."""
    from pycocotools import mask as mask_util

    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in (1, 2):
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(tmp_path / "val2017" / f"{i}.png")
    m = np.zeros((40, 60), np.uint8, order="F")
    m[5:15, 20:40] = 1
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 17, "bbox": [10, 10, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},
        {"id": 2, "image_id": 1, "category_id": 17, "bbox": [40, 20, 10, 10], "area": 100, "iscrowd": 1,
         "segmentation": [[40, 20, 50, 20, 50, 30, 40, 30]]},
        {"id": 3, "image_id": 2, "category_id": 18, "bbox": [20, 5, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": rle},
    ]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 60} for i in (1, 2)],
            "annotations": anns, "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return tmp_path


def test_reader_gives_xyxy_boxes_masks_and_contiguous_labels(coco_root):
    ds = CocoDetection(coco_root, "val")
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    image, t = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8 and image[0, 0, 0] == 40
    assert t["boxes"].tolist() == [[10, 10, 30, 20]] and t["labels"].tolist() == [1]  # crowd region left out
    assert t["masks"].shape == (1, 40, 60) and t["masks"][0, 12, 15] == 1 and t["masks"][0, 30, 45] == 0
    _, t2 = ds[1]
    assert t2["labels"].tolist() == [2] and t2["masks"][0].sum() == 200  # RLE decoded
    with pytest.raises(FileNotFoundError, match="instances_train2017.json' does not exist"):
        CocoDetection(coco_root, "train")


def test_ap_is_one_for_a_perfect_prediction_and_hand_computed_otherwise(coco_root):
    gt = CocoDetection(coco_root, "val").coco
    perfect = [{"image_id": 1, "category_id": 17, "bbox": [10, 10, 20, 10], "score": 0.9},
               {"image_id": 2, "category_id": 18, "bbox": [20, 5, 20, 10], "score": 0.8}]
    assert coco_evaluate(gt, perfect)["AP"] == pytest.approx(1.0)
    # A false 'cat' on image 1 scored above the true one (0.95, no overlap with the cat or the crowd region):
    # the cat's precision is 1/2 at every recall (FP then TP), so its AP is 0.5 at every IoU threshold; the dog
    # stays perfect (1.0). COCO's AP is the mean over the categories: 0.75; AP50 and AP75 likewise.
    partial = perfect + [{"image_id": 1, "category_id": 17, "bbox": [0, 25, 8, 8], "score": 0.95}]
    m = coco_evaluate(gt, partial)
    assert m["AP"] == pytest.approx(0.75) and m["AP50"] == pytest.approx(0.75) and m["AP75"] == pytest.approx(0.75)
    assert coco_evaluate(gt, [])["AP"] == 0.0
