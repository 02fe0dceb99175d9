"""Bad or odd data is refused when it loads, with one line naming the file, row or annotation and the value, or read
as it really is (16-bit, float, EXIF-rotated images); each case here was silently wrong or a traceback before."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mslora.data import load_classification, load_dense, load_rgb
from mslora.data.coco import CocoDetection
from mslora.data.images import image_size


def _save(array, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def _pil(im, path):
    im.save(path)
    return path


@pytest.mark.parametrize("make,expected", [
    (lambda p: _save(np.full((4, 4), 32768, np.uint16), p / "a.png"), (128, 128, 128)),  # 16-bit: was 255
    (lambda p: _save(np.full((4, 4), 65535, np.uint16), p / "a.png"), (255, 255, 255)),
    (lambda p: _save(np.full((4, 4), 0.5, np.float32), p / "a.tif"), (128, 128, 128)),  # float in [0, 1]: was 0
    (lambda p: _save(np.linspace(0, 1000, 16, dtype=np.float32).reshape(4, 4), p / "a.tif"), (0, 0, 0)),  # stretched
    (lambda p: _save(np.full((4, 4), 77, np.uint8), p / "a.png"), (77, 77, 77)),  # 8-bit grey
    (lambda p: _save(np.dstack([np.full((4, 4), 77, np.uint8), np.zeros((4, 4), np.uint8)]), p / "a.png"),
     (77, 77, 77)),  # LA: alpha dropped
    (lambda p: _save(np.full((4, 4, 4), (10, 20, 30, 0), np.uint8), p / "a.png"), (10, 20, 30)),  # RGBA: dropped
    (lambda p: _pil(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), p / "a.jpg"), (255, 255, 255)),  # CMYK: no ink
    (lambda p: _pil(Image.new("RGB", (4, 4), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE), p / "a.png"), (200, 10, 10)),  # palette
])
def test_every_image_mode_is_read_from_its_real_range(make, expected, tmp_path):
    im = np.asarray(load_rgb(make(tmp_path)))
    assert im.shape == (4, 4, 3) and im.dtype == np.uint8
    assert tuple(im[0, 0]) == expected


def test_float_images_outside_0_1_are_stretched_min_to_max(tmp_path):
    im = np.asarray(load_rgb(_save(np.linspace(0, 1000, 16, dtype=np.float32).reshape(4, 4), tmp_path / "a.tif")))
    assert im[0, 0, 0] == 0 and im[-1, -1, 0] == 255 and 0 < im[1, 1, 0] < 255


def _rotated_jpeg(path, orientation=6):
    """A 20x10 (width x height) JPEG, its top-left quarter red, with an EXIF orientation (6: shown turned 90 degrees
    clockwise, 10 wide and 20 high)."""
    a = np.zeros((10, 20, 3), np.uint8)
    a[:5, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_everywhere_an_image_is_read(tmp_path):
    path = _rotated_jpeg(tmp_path / "a.jpg")
    im = np.asarray(load_rgb(path))
    assert im.shape == (20, 10, 3) and image_size(path) == (10, 20)
    assert im[2, 7, 0] > 200 and im[2, 2, 0] < 50  # the red quarter is now top-right
    import mslora.inference as inference
    with Image.open(path) as pil:  # predict on a PIL image reads it upright too
        assert tuple(inference.as_image(pil).shape) == (3, 20, 10)


def _csv(tmp_path, rows, n_images=6):
    for i in range(n_images):
        _save(np.full((8, 8, 3), 20 * i, np.uint8), tmp_path / f"{i}.png")
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{r}\n" for r in rows))
    return tmp_path / "train.csv"


GOOD_ROWS = ["0.png,0", "1.png,1", "2.png,0", "3.png,1", "4.png,0", "5.png,1"]


@pytest.mark.parametrize("change,match", [
    ({2: "2.png,-1"}, r"train.csv row 3: label -1 is negative"),
    ({4: "4.png,1000000"}, r"train.csv row 5: label 1000000, but 999998 of the labels 0..1000000 have no image"),
    ({1: "1.png, "}, r"train.csv row 2: \['1.png', ' '\] has an empty label"),
    ({1: "1.png,"}, r"train.csv row 2: \['1.png', ''\] has an empty label"),
    ({3: "missing.png,1"}, r"1 of 6 images of 'train' cannot be read: image '.*missing.png' does not exist"),
])
def test_csv_labels_and_files_are_checked_when_the_data_loads(change, match, tmp_path):
    rows = [change.get(i, r) for i, r in enumerate(GOOD_ROWS)]
    with pytest.raises(ValueError, match=match):
        load_classification(str(_csv(tmp_path, rows)))
    load_classification(str(_csv(tmp_path / "good", GOOD_ROWS)))  # the same layout, good rows: loads


def test_vtab_label_past_classes_txt_and_fgvc_bad_labels(tmp_path):
    v = tmp_path / "vtab"
    for i in range(4):
        _save(np.zeros((8, 8, 3), np.uint8), v / f"{i}.png")
    for name in ("train800", "val200", "train800val200", "test"):
        (v / f"{name}.txt").write_text("0.png 0\n1.png 1\n2.png 2\n3.png 5\n")
    (v / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match=r"train800.txt line 4: label 5 is past the 3 classes of '.*classes.txt'"):
        load_classification(str(v))

    f = tmp_path / "fgvc"
    for i in range(3):
        _save(np.zeros((8, 8, 3), np.uint8), f / "images" / f"{i}.png")
    good = {"0.png": 0, "1.png": 1, "2.png": 2}
    for split in ("train", "val", "test"):
        (f / f"{split}.json").write_text(json.dumps(good))
    (f / "train.json").write_text(json.dumps({**good, "2.png": [2]}))
    with pytest.raises(ValueError, match=r"train.json: '2.png' has label \[2\]; expected an integer or a class name"):
        load_classification(str(f))
    (f / "train.json").write_text(json.dumps(good))
    (f / "classes.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="names 2 classes but the json files use 3 labels"):
        load_classification(str(f))
    (f / "train.json").write_text("{}")
    (f / "classes.txt").unlink()
    with pytest.raises(ValueError, match="train.json lists no images"):
        load_classification(str(f))


def _coco(root, anns=None, images=None, split="train"):
    """A COCO split of two 30x20 (width x height) images and two good annotations, with overrides."""
    for i in (1, 2):
        _save(np.full((20, 30, 3), 50 * i, np.uint8), root / f"{split}2017" / f"{i}.png")
    data = {"images": images or [{"id": i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in (1, 2)],
            "annotations": anns or [
                {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0,
                 "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]},
                {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 5, 5], "area": 25, "iscrowd": 0,
                 "segmentation": [[5, 5, 10, 5, 10, 10]]}],
            "categories": [{"id": 3, "name": "cat"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root


def _ann(**kw):
    return [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]], **kw}]


@pytest.mark.parametrize("anns,match", [
    (_ann(category_id=99), r"annotation id 7: category_id 99 is not one of the categories \(3\)"),
    (_ann(image_id=5), r"annotation id 7: image_id 5 is not an image of the file"),
    (_ann(bbox=[2, "2", 10, 8]), r"annotation id 7: bbox \[2, '2', 10, 8\] is not \[x, y, width, height\]"),
    (_ann(bbox=[2, 2, 10]), r"annotation id 7: bbox \[2, 2, 10\] is not"),
    (_ann(segmentation=[[2, 2, 12, 2]]), r"annotation id 7: polygon \[2, 2, 12, 2\] is not x, y pairs of at least 3"),
    (_ann(segmentation=[[]]), r"annotation id 7: polygon \[\] is not x, y pairs"),
    (_ann(segmentation={"size": [10, 10], "counts": "abc"}), r"annotation id 7: RLE segmentation of size \[10, 10\]"),
])
def test_coco_annotations_are_checked_when_the_data_loads(anns, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        CocoDetection(_coco(tmp_path, anns), "train")


def test_coco_image_files_and_sizes_are_checked(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 20, "height": 30}, {"id": 2, "file_name": "2.png",
                                                                            "width": 30, "height": 20}]
    with pytest.raises(ValueError, match=r"image '.*1.png' is 30x20 as decoded .* but .* says 20x30 \(image id 1\)"):
        CocoDetection(_coco(tmp_path / "a", images=images), "train")
    root = _coco(tmp_path / "b")
    (root / "train2017" / "2.png").unlink()
    with pytest.raises(ValueError, match=r"1 of 2 images of 'instances_train2017.json' cannot be read: image "
                                         r"'.*2.png' does not exist"):
        CocoDetection(root, "train")
    root = _coco(tmp_path / "c", images=[{"id": 1, "file_name": "r.jpg", "width": 20, "height": 10}])
    _rotated_jpeg(root / "train2017" / "r.jpg")  # stored 20x10, shown 10x20 (EXIF 6): annotated as stored
    with pytest.raises(ValueError, match=r"'.*r.jpg' is 10x20 as decoded \(EXIF orientation applied\) but"):
        CocoDetection(root, "train")


def test_degenerate_and_outside_boxes_are_left_out_with_a_warning(tmp_path):
    anns = _ann() + [{**_ann()[0], "id": 8, "bbox": [40, 2, 5, 5]}, {**_ann()[0], "id": 9, "bbox": [2, 2, 0, 5]}]
    with pytest.warns(UserWarning, match="1 boxes of no area and 1 boxes wholly outside their image left out"):
        ds = CocoDetection(_coco(tmp_path, anns), "train")
    assert ds.skip == {8, 9} and ds[0][1]["boxes"].tolist() == [[2.0, 2.0, 12.0, 10.0]]


def test_mask_detectors_refuse_coco_without_segmentations(tmp_path):
    from mslora.engine import TrainConfig
    from mslora.registry import get_task

    root = _coco(tmp_path, [{k: v for k, v in _ann()[0].items() if k != "segmentation"}])
    _coco(root, split="val")
    assert "masks" not in CocoDetection(root, "train")[0][1]  # box-only COCO reads for box detectors
    cfg = TrainConfig(task="detect", data=str(root), detector="maskrcnn", backbone="resnet18", pretrained=False)
    with pytest.raises(ValueError, match=r"needs instance masks, but .*annotation id 7 has no segmentation"):
        get_task("detect")(cfg)
    with pytest.raises(ValueError, match=r"no semantic/train2017 label maps and .*annotation id 7 has no segm"):
        load_dense(str(root), "segment")


def test_label_maps_of_another_size_than_their_image_are_refused(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for s in ("training", "validation"):
        for k in range(2):
            _save(np.zeros((20, 30, 3), np.uint8), ade / "images" / s / f"{k}.jpg")
            wide = 20 if (s, k) == ("training", 0) else 30
            _save(np.ones((20, wide), np.uint8), ade / "annotations" / s / f"{k}.png")
    with pytest.raises(ValueError, match=r"label map '.*training/0.png' is 20x20 but its image '.*0.jpg' is 30x20"):
        load_dense(str(tmp_path), "segment")
    _save(np.ones((20, 30, 3), np.uint8), ade / "annotations" / "training" / "0.png")
    with pytest.raises(ValueError, match=r"label map '.*training/0.png' is RGB with 3 channels"):
        load_dense(str(tmp_path), "segment")


def test_symlink_loops_list_each_image_once_and_never_hang(image_folder):
    (image_folder / "ant" / "loop").symlink_to(image_folder)  # a loop through the root
    (image_folder / "bee" / "self").symlink_to(image_folder / "bee")  # a loop onto itself
    (image_folder / "cat" / "again").symlink_to(image_folder / "cat")
    d = load_classification(str(image_folder), "full")
    samples = d.train.base.samples
    assert len(samples) == 24 and len({os.path.realpath(p) for p, _ in samples}) == 24
    (image_folder / "bee" / "stolen.png").symlink_to(image_folder / "ant" / "0.png")
    with pytest.raises(ValueError, match=r"image '.*ant/0.png' is in two class folders"):
        load_classification(str(image_folder), "full")


def test_cli_refuses_bad_data_in_one_line_before_a_run_directory_exists(tmp_path):
    rows = [r if i != 2 else "2.png,-1" for i, r in enumerate(GOOD_ROWS)]
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "mslora", "train", "--data", str(_csv(tmp_path, rows)),
                           "--backbone", "resnet18", "--no-pretrained", "--epochs", "1", "--output", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "row 3: label -1 is negative" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("argv,yaml_text,match", [
    (["--set", "lr=abc"], None, "lr='abc' must be of type float | None"),
    (["--set", "img_size=abc"], None, "img_size='abc' must be of type int | None"),
    (["--set", "epochs=true"], None, "epochs=True must be of type int | None"),  # a bool is not an int
    (["--set", "rnak=8"], None, "unknown option(s) rnak given (did you mean rank?)"),
    ([], "lr: fast\n", "lr='fast' must be of type float | None"),
    ([], "method_options: 5\n", "method_options=5 must be a mapping of option: value"),
    ([], "rnak: 8\n", "unknown option(s) rnak in "),
])
def test_option_values_of_the_wrong_type_are_one_valueerror(argv, yaml_text, match, tmp_path):
    from mslora.engine.config import config_from_args

    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv = [*argv, "--config", str(tmp_path / "c.yaml")]
    with pytest.raises(ValueError) as e:
        config_from_args(argv)
    assert match in str(e.value)


@pytest.mark.parametrize("argv,match", [
    (["eval", "--adapter", "x", "--batch-size", "0"], "argument --batch-size: 0 is below 1"),
    (["params", "--backbone", "test_resnet", "--num-classes", "-5"], "argument --num-classes: -5 is below 0"),
    (["bench", "--backbone", "test_resnet", "--batch-size", "0"], "argument --batch-size: 0 is below 1"),
    (["predict", "--adapter", "x", "--input", "y", "--top-k", "zero"], "argument --top-k: 'zero' is not an integer"),
])
def test_counts_below_their_least_are_refused_by_the_parser(argv, match, capsys):
    from mslora.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_api_misuse_is_one_clear_exception(tmp_path):
    import timm

    import mslora
    from mslora.core.peft_format import export_peft, import_peft
    from mslora.engine.checkpoint import atomic_write

    with pytest.raises(TypeError, match="adapt takes a model .* not str 'resnet18'"):
        mslora.adapt("resnet18", "mslora")
    model = mslora.adapt(timm.create_model("test_resnet"), "mslora", rank=8)
    with pytest.raises(FileNotFoundError, match="folder '.*no/such' does not exist"):
        mslora.save_adapter(model, tmp_path / "no" / "such" / "a.safetensors")
    with pytest.raises(ValueError, match="metadata 'x' is not JSON"):
        mslora.save_adapter(model, tmp_path / "a.safetensors", {"x": object()})
    export_peft(mslora.adapt(timm.create_model("test_resnet"), "lora", rank=4), tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for change, match in (({"peft_type": None}, "is not a PEFT adapter config: .*peft_type"),
                          ({"r": 8}, r"do not fit the adapter its config describes \(r=8\): size mismatch")):
        broken = {k: v for k, v in {**config, **change}.items() if v is not None}
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=match):
            import_peft(timm.create_model("test_resnet"), tmp_path / "peft")

    def full_disk(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file: file write "
                           "failed")
    (tmp_path / "last.pt").write_bytes(b"the last good checkpoint")
    with pytest.raises(OSError, match=r"cannot write '.*last.pt': .*file write failed"):
        atomic_write(tmp_path / "last.pt", full_disk)
    assert (tmp_path / "last.pt").read_bytes() == b"the last good checkpoint"
    assert not (tmp_path / ".last.pt.tmp").exists()


def test_merge_into_a_missing_folder_eval_on_other_classes_and_two_images_of_one_name(image_folder, tmp_path, capsys):
    from mslora.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--backbone", "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
                 "--img-size", "32", "--rank", "8", "--data", str(image_folder), "--output", str(out)]) == 0
    (run,) = out.iterdir()
    capsys.readouterr()
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "no" / "dir" / "m.safetensors")]) == 2
    assert "folder '" in capsys.readouterr().err
    other = tmp_path / "other"
    for c in ("ant", "bee", "dog"):  # three classes, as the run's, one of another name
        (other / c).mkdir(parents=True)
        for i in range(3):
            (other / c / f"{i}.png").write_bytes((image_folder / "ant" / f"{i}.png").read_bytes())
    assert main(["eval", "--adapter", str(run), "--data", str(other)]) == 2
    assert "class 2 is 'dog' there, 'cat' in the run" in capsys.readouterr().err
    (other / "dog").rename(other / "cat")
    assert main(["eval", "--adapter", str(run), "--data", str(other)]) == 0  # one pool: every image, not 15%
    result = json.loads(capsys.readouterr().out)
    assert result["test_images"] == 9 and result["evaluated"].startswith("every image of")
    assert main(["eval", "--adapter", str(run)]) == 0  # the run's own data: its test split
    assert json.loads(capsys.readouterr().out)["evaluated"] == "test"
    images = [image_folder / "ant" / "0.png", image_folder / "bee" / "0.png"]  # both named 0.png
    assert main(["visualize", "--adapter", str(run), "--image", *map(str, images), "--output", str(tmp_path / "v")]) == 0
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["0_0_mslora.png", "0_1_mslora.png"]
    assert main(["visualize", "--adapter", str(run), "--image", str(image_folder / "bee"), "--output",
                 str(tmp_path / "w")]) == 0  # a folder: its images
    assert len(list((tmp_path / "w").iterdir())) == 8
