"""Tiling (issue 13): the grid, box cutting for training, the merge, and a real model that needs the tiles."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from visionautoml.config import Tiling, TrainingParameters
from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.formats import read_dataset
from visionautoml.errors import ConfigError
from visionautoml.models.architectures import InputSize
from visionautoml.models.predictor import Predictor
from visionautoml.models.saved import ModelSpec, save_model
from visionautoml.models.tiling import (
    Tile,
    TiledPredictor,
    detect_tiled,
    image_tiles,
    merge_detections,
    resolve_tiling,
    tile_grid,
    with_tiling,
)
from visionautoml.models.zoo import build_model
from visionautoml.training.augment import PhasedLoader
from visionautoml.training.dataset import DetectionDataset, make_data_loader
from visionautoml.training.evaluate import evaluate_model, predict_loader
from visionautoml.training.tiles import MIN_VISIBLE_FRACTION, TiledSamples, cut_boxes, tile_samples

# --- the grid ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "grid", "overlap"),
    [(1280, 960, (3, 2), 0.25), (1000, 1000, (2, 2), 0.0), (640, 481, (5, 3), 0.4), (97, 61, (3, 3), 0.25)],
)
def test_the_grid_covers_the_image_with_equal_tiles_sharing_the_overlap(width, height, grid, overlap):
    tiles = tile_grid(width, height, grid, overlap)
    columns, rows = grid
    assert len(tiles) == columns * rows
    assert (tiles[0].left, tiles[0].top) == (0, 0)
    assert (tiles[-1].right, tiles[-1].bottom) == (width, height)
    tile_width = width / (overlap + (1 - overlap) * columns)
    tile_height = height / (overlap + (1 - overlap) * rows)
    for tile in tiles:
        assert 0 <= tile.left < tile.right <= width and 0 <= tile.top < tile.bottom <= height
        assert abs(tile.width - tile_width) <= 1 and abs(tile.height - tile_height) <= 1
    for left, right in itertools.pairwise(tiles[:columns]):
        assert abs((left.right - right.left) - overlap * tile_width) <= 1
    covered = torch.zeros(height, width, dtype=torch.bool)
    for tile in tiles:
        covered[tile.top : tile.bottom, tile.left : tile.right] = True
    assert bool(covered.all())


def test_without_overlap_the_tiles_abut_as_the_cloud_service_cuts_them():
    """The service's own 2x2 example on a 768x1024 image: four 384x512 tiles."""
    assert tile_grid(768, 1024, (2, 2), 0.0) == [
        Tile(0, 0, 384, 512),
        Tile(384, 0, 768, 512),
        Tile(0, 512, 384, 1024),
        Tile(384, 512, 768, 1024),
    ]


def test_a_1x1_grid_is_the_whole_image_and_adds_no_tile_to_inference():
    assert tile_grid(320, 200, (1, 1), 0.25) == [Tile(0, 0, 320, 200)]
    assert image_tiles(320, 200, Tiling(tile_grid_size="1x1")) == []
    assert image_tiles(320, 200, Tiling()) == []
    image = torch.rand(3, 20, 30)
    assert detect_tiled(_bright_boxes, [image], Tiling(tile_grid_size="1x1"))[0]["boxes"].equal(
        _bright_boxes([image])[0]["boxes"]
    )


def test_overrides_switch_a_models_tiling_off_and_name_a_bad_value():
    own = Tiling(tile_grid_size="3x2", tile_overlap_ratio=0.1)
    assert resolve_tiling(own, tile_grid_size="none").grid is None
    kept = resolve_tiling(own, tile_predictions_nms_threshold=0.5)
    assert (kept.grid, kept.tile_overlap_ratio, kept.tile_predictions_nms_threshold) == ((3, 2), 0.1, 0.5)
    with pytest.raises(ConfigError, match="tile_grid_size"):
        resolve_tiling(own, tile_grid_size="3by2")


# --- cutting boxes for training ------------------------------------------------------------------------


def _draw(width: int, height: int, boxes: list[Box]) -> torch.Tensor:
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for box in boxes:
        image[0, int(box.ymin) : int(box.ymax), int(box.xmin) : int(box.xmax)] = 255
    return image


def _painted(image: torch.Tensor) -> tuple[int, int, int, int] | None:
    rows, columns = torch.nonzero(image[0] > 0, as_tuple=True)
    if len(rows) == 0:
        return None
    return int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1


def test_cut_boxes_are_the_painted_pixels_each_tile_shows():
    width, height = 300, 200
    boxes = [
        Box(20, 30, 60, 70, "a"),  # inside the first tile only
        Box(150, 40, 210, 90, "a"),  # across the middle column's borders
        Box(100, 120, 140, 180, "a"),  # across the row border
    ]
    image = _draw(width, height, boxes)
    for tile in tile_grid(width, height, (3, 2), 0.25):
        crop = tile.crop(image)
        for box, cut in ((box, cut_boxes([box], tile)) for box in boxes):
            painted = _painted(_draw(width, height, [box])[:, tile.top : tile.bottom, tile.left : tile.right])
            if painted is None:
                assert cut == []
                continue
            visible = (painted[2] - painted[0]) * (painted[3] - painted[1]) / box.area
            if visible < MIN_VISIBLE_FRACTION:
                assert cut == []
                continue
            assert len(cut) == 1
            assert (cut[0].xmin, cut[0].ymin, cut[0].xmax, cut[0].ymax) == painted
        assert crop.shape[1:] == (tile.height, tile.width)


def test_a_box_mostly_outside_the_tile_is_dropped_and_one_mostly_inside_is_kept():
    tile = Tile(0, 0, 100, 100)
    sliver = Box(98, 10, 148, 60, "a")  # 2 of 50 columns inside: 4% of its area
    half = Box(80, 10, 120, 50, "a")  # half inside
    assert cut_boxes([sliver], tile) == []
    assert cut_boxes([sliver], tile, min_visible_fraction=0.01) == [Box(98, 10, 100, 60, "a")]
    assert cut_boxes([half], tile) == [Box(80, 10, 100, 50, "a")]
    assert cut_boxes([Box(100, 0, 120, 20, "a")], tile) == []  # touches the border only


# --- the training samples ------------------------------------------------------------------------------


def _records(root: Path) -> list[ImageRecord]:
    """200x100 pictures; a 2x1 grid at 0.25 overlap cuts them at x 0-114 and 86-200."""
    layouts = {
        "left": [Box(10, 20, 40, 60, "red")],
        "right": [Box(150, 30, 190, 70, "red")],
        "middle": [Box(90, 10, 110, 50, "red")],  # whole in both tiles
        "empty": [],
    }
    records = []
    for name, boxes in layouts.items():
        path = root / f"{name}.png"
        Image.fromarray(_draw(200, 100, boxes).permute(1, 2, 0).numpy()).save(path)
        records.append(ImageRecord(f"{name}.png", path, 200, 100, boxes))
    return records


def test_the_training_samples_are_the_pictures_then_their_tiles_with_boxes(tmp_path):
    records = _records(tmp_path)
    tiling = Tiling(tile_grid_size="2x1")
    base = DetectionDataset(
        Dataset(records, ["red"]), train=True, input_size=InputSize(min_size=800, max_size=1333)
    )
    samples = TiledSamples(base, tiling)
    assert [(s.picture, s.tile.left) for s in samples.tiles] == [(0, 0), (1, 86), (2, 0), (2, 86)]
    assert len(samples) == 4 + 4
    assert len(samples.records) == len(samples)
    for index in range(len(samples)):
        image, target = samples[index]
        painted = _painted((image * 255).round().to(torch.uint8))
        boxes = target["boxes"].tolist()
        assert len(boxes) == (0 if painted is None else 1)
        if boxes:
            assert tuple(round(v) for v in boxes[0]) == painted
    _, tile_target = samples[5]  # the right picture's tile: its box moved by the tile's left edge
    assert tile_target["boxes"].tolist() == [[64.0, 30.0, 104.0, 70.0]]
    assert int(tile_target["image_id"]) == 1
    samples.preload()
    assert samples[5][1]["boxes"].tolist() == [[64.0, 30.0, 104.0, 70.0]]


def test_tiles_are_cut_from_the_full_resolution_picture_then_scaled_like_a_training_image(tmp_path):
    """The picture is stored at the model's 64 px; a tile is cut from the original and scaled on its own."""
    records = _records(tmp_path)
    base = DetectionDataset(Dataset(records, ["red"]), train=True, input_size=InputSize(image_size=64))
    samples = TiledSamples(base, Tiling(tile_grid_size="2x1"))
    assert samples.decoded_bytes() == 4 * 3 * 64 * 64 + 4 * 3 * 64 * 64
    image, target = samples[4]  # the left picture's tile, 114 px wide, scaled to 64
    assert image.shape == (3, 64, 64)
    (x0, y0, x1, y1) = target["boxes"][0].tolist()
    assert x0 == pytest.approx(10 * 64 / 114, abs=0.01) and x1 == pytest.approx(40 * 64 / 114, abs=0.01)
    assert y0 == pytest.approx(20 * 64 / 100, abs=0.01) and y1 == pytest.approx(60 * 64 / 100, abs=0.01)


def test_the_loader_adds_the_tiles_with_the_augmentations_and_mosaic(tiny_voc):
    dataset = read_dataset(tiny_voc)
    params = TrainingParameters(
        model_name="ssdlite320_mobilenet_v3_large",
        pretrained="none",
        image_size=64,
        number_of_workers=0,
        training_batch_size=4,
        tile_grid_size="2x2",
        apply_mosaic_for_yolo=True,
        number_of_epochs=10,
    )
    expected = len(dataset.images) + len(tile_samples(dataset.images, params))
    assert expected > len(dataset.images)
    loader = make_data_loader(dataset, params, train=True)
    assert isinstance(loader, PhasedLoader)
    for phase in (loader.augmented, loader.plain):  # mosaic over pictures and tiles, then the plain recipe
        assert len(phase.dataset) == expected
        images, targets = next(iter(phase))
        assert all(image.shape[0] == 3 and image.dtype == torch.float32 for image in images)
        assert all(target["boxes"].shape[1] == 4 for target in targets)
    plain = make_data_loader(dataset, params.model_copy(update={"tile_grid_size": None}), train=True)
    assert len(plain.plain.dataset) == len(dataset.images)
    validation = make_data_loader(dataset, params, train=False)
    assert len(validation.dataset) == len(dataset.images)


# --- merging -------------------------------------------------------------------------------------------


def test_one_object_seen_whole_and_in_two_tiles_comes_back_once():
    image_run = (torch.tensor([[120.0, 20.0, 160.0, 60.0]]), torch.tensor([0.6]), torch.tensor([1]))
    left_tile = (torch.tensor([[120.0, 20.0, 133.0, 60.0]]), torch.tensor([0.5]), torch.tensor([1]))  # cut
    right_tile = (torch.tensor([[53.0, 21.0, 93.0, 61.0]]), torch.tensor([0.9]), torch.tensor([1]))
    other_class = (torch.tensor([[53.0, 20.0, 93.0, 60.0]]), torch.tensor([0.4]), torch.tensor([2]))
    boxes, scores, labels = merge_detections(
        [image_run, left_tile, right_tile, other_class], [(0, 0), (0, 0), (67, 0), (67, 0)], 0.25
    )
    assert boxes.tolist() == [[120.0, 21.0, 160.0, 61.0], [120.0, 20.0, 160.0, 60.0]]
    assert scores.tolist() == pytest.approx([0.9, 0.4])
    assert labels.tolist() == [1, 2]
    assert (
        len(merge_detections([image_run, right_tile, other_class], [(0, 0), (67, 0), (67, 0)], 0.25, 1)[0])
        == 1
    )


def _bright_boxes(views: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A detector that needs no training: the box around each view's bright pixels, scored by its size."""
    outputs = []
    for view in views:
        found = _painted((view * 255).to(torch.uint8) if view.is_floating_point() else view)
        boxes = torch.tensor([found], dtype=torch.float32) if found else torch.zeros(0, 4)
        scores = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 10_000
        outputs.append(
            {"boxes": boxes, "scores": scores, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        )
    return outputs


def test_detect_tiled_maps_every_tile_back_to_the_image():
    """An object inside the overlap is seen whole by the image and by two tiles: one box, in image pixels."""
    image = _draw(200, 100, [Box(95, 40, 105, 52, "a")]).float() / 255
    tiling = Tiling(tile_grid_size="2x1", tile_overlap_ratio=0.25)
    [merged] = detect_tiled(_bright_boxes, [image], tiling)
    assert merged["boxes"].tolist() == [[95.0, 40.0, 105.0, 52.0]]
    runs = []
    detect_tiled(lambda views: runs.append(len(views)) or _bright_boxes(views), [image, image], tiling)
    assert runs == [2, 2, 2]  # six views in batches of the two images it replaces


def test_each_tiling_setting_changes_the_merged_answer():
    """An object across a tile border: the grid, the overlap and the NMS threshold each change the answer."""
    image = _draw(200, 100, [Box(80, 40, 120, 60, "a")]).float() / 255

    def answer(**settings: object) -> tuple[int, int]:
        views = []

        def detect(batch: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            views.extend(batch)
            return _bright_boxes(batch)

        [merged] = detect_tiled(detect, [image], Tiling(**settings))
        return len(views), len(merged["boxes"])

    # 2x1 at 0.25 overlap: tiles 0-114 and 86-200 each see 34 of the 40 columns (IoU 0.85 with the whole).
    assert answer(tile_grid_size="2x1", tile_predictions_nms_threshold=0.6) == (3, 1)
    assert answer(tile_grid_size=None) == (1, 1)
    assert answer(tile_grid_size="2x1", tile_predictions_nms_threshold=0.9) == (3, 3)
    # Without overlap the halves are 20 columns (IoU 0.5): no longer duplicates at 0.6.
    assert answer(tile_grid_size="2x1", tile_overlap_ratio=0.0, tile_predictions_nms_threshold=0.6) == (3, 3)


# --- a real model that only sees the object in a tile ---------------------------------------------------

CANVAS = 256
GRID = Tiling(tile_grid_size="4x4", tile_overlap_ratio=0.0)  # 64-pixel tiles, what the model works at


def _square_crop(generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    size = int(torch.randint(16, 27, (1,), generator=generator))
    image = torch.rand(3, 64, 64, generator=generator) * 0.3
    x, y = (int(v) for v in torch.randint(0, 64 - size, (2,), generator=generator))
    image[:, y : y + size, x : x + size] = 1.0
    return image, {
        "boxes": torch.tensor([[x, y, x + size, y + size]], dtype=torch.float32),
        "labels": torch.ones(1, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def square_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSDlite at 64 px trained 120 steps on 64-pixel views of one 16-26 px white square: a tile's view."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        params = TrainingParameters(
            model_name="ssdlite320_mobilenet_v3_large",
            pretrained="none",
            image_size=64,
            box_score_threshold=0.3,
        )
        model = build_model(params.model_name, 2, params)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.3  # running statistics that catch up within the few steps
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(120):
            images, targets = zip(*(_square_crop(generator) for _ in range(8)), strict=True)
            loss = sum(model(list(images), list(targets)).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        spec = ModelSpec.from_params(params.model_copy(update=GRID.model_dump()), ["square"])
        return save_model(model.eval(), spec, tmp_path_factory.mktemp("tiling") / "model")
    finally:
        torch.set_num_threads(threads)


def _canvas(x: int, y: int, size: int = 22, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, CANVAS, CANVAS, generator=generator) * 0.3
    image[:, y : y + size, x : x + size] = 1.0
    return (image * 255).round().to(torch.uint8)


SQUARES = [(30, 30), (150, 90), (200, 200)]  # each inside one tile


def _found(boxes: torch.Tensor, x: int, y: int, size: int = 22) -> bool:
    """Whether one of ``boxes`` is the square at (x, y) (IoU >= 0.5)."""
    from torchvision.ops import box_iou

    truth = torch.tensor([[x, y, x + size, y + size]], dtype=torch.float32)
    return len(boxes) > 0 and bool((box_iou(boxes.float(), truth) >= 0.5).any())


def test_a_small_object_is_found_only_with_tiling(square_model, one_torch_thread):
    predictor = Predictor.from_directory(square_model)
    assert predictor.spec.tiling.grid == (4, 4)
    tiled = with_tiling(predictor)
    assert isinstance(tiled, TiledPredictor) and tiled.spec is predictor.spec
    assert with_tiling(tiled, Tiling()) is predictor  # an override switches it off
    canvases = [_canvas(x, y) for x, y in SQUARES]
    whole = predictor.predict(canvases)
    merged = tiled.predict(canvases)
    for (x, y), plain, tiles in zip(SQUARES, whole, merged, strict=True):
        assert not _found(plain.boxes, x, y)
        assert _found(tiles.boxes, x, y)
        assert bool((tiles.scores >= 0.3).all()) and tiles.scores.tolist() == sorted(
            tiles.scores.tolist(), reverse=True
        )
        assert len(tiles) <= predictor.spec.thresholds.box_detections_per_image


def test_the_onnx_runtime_predictor_goes_through_the_same_tiling(square_model, tmp_path, one_torch_thread):
    from visionautoml.deploy.export import export_saved_model
    from visionautoml.deploy.runtime import ExportSettings, OnnxPredictor
    from visionautoml.models.saved import load_model

    module, spec = load_model(square_model)
    canvases = [_canvas(x, y) for x, y in SQUARES]
    export = export_saved_model(
        module, ExportSettings.from_spec(spec), tmp_path / "onnx", canvases[:1], sample_source="canvas"
    )
    onnx = TiledPredictor(OnnxPredictor(export.directory, intra_op_threads=1), spec.tiling)
    pytorch = TiledPredictor(Predictor(module, spec), spec.tiling)
    for (x, y), a, b in zip(SQUARES, onnx.predict(canvases), pytorch.predict(canvases), strict=True):
        assert _found(a.boxes, x, y)
        assert a.labels == b.labels
        assert torch.allclose(a.boxes, b.boxes, atol=0.5) and torch.allclose(a.scores, b.scores, atol=1e-3)


def test_the_served_export_applies_the_models_tiling(square_model, tmp_path, one_torch_thread):
    """`serve` on the ONNX export: the export records the grid, the service tiles around the graph."""
    import contextlib
    import io
    import os

    from test_serve import start_server

    from visionautoml.deploy.export import export_saved_model
    from visionautoml.deploy.runtime import ExportSettings
    from visionautoml.models.saved import load_model

    module, spec = load_model(square_model)
    export = export_saved_model(
        module, ExportSettings.from_spec(spec), tmp_path / "onnx", [_canvas(30, 30)], sample_source="canvas"
    )
    assert ExportSettings.read(export.directory).tiling == spec.tiling
    x, y = SQUARES[1]
    png = io.BytesIO()
    Image.fromarray(_canvas(x, y).permute(1, 2, 0).numpy()).save(png, format="PNG")
    env = {**os.environ, "VISIONAUTOML_API_KEY": "tiling-key"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def served(*options: str) -> tuple[bool, dict]:
        arguments = [str(export.directory), "--concurrency", "1", *options]
        log = tmp_path / f"serve{len(options)}.log"
        with contextlib.contextmanager(start_server)(arguments, log, env) as server:
            headers = {"x-api-key": "tiling-key"}
            answer = server.post(files={"file": ("canvas.png", png.getvalue(), "image/png")}, headers=headers)
            assert answer.status_code == 200, answer.text
            metadata = httpx.get(server.url + "/metadata", headers=headers, timeout=30).json()
        boxes = torch.tensor(
            [
                [box["box"][key] * CANVAS for key in ("topX", "topY", "bottomX", "bottomY")]
                for box in answer.json()[0]["boxes"]
            ]
        ).reshape(-1, 4)
        return _found(boxes, x, y), metadata

    found, metadata = served()
    assert found and metadata["tiling"]["tile_grid_size"] == "4x4"
    found, metadata = served("--tile-grid-size", "none")
    assert not found and metadata["tiling"]["tile_grid_size"] is None


def test_validation_and_evaluate_score_the_merged_predictions(square_model, tmp_path, one_torch_thread):
    from visionautoml.models.saved import load_model

    module, spec = load_model(square_model)
    images = [_canvas(x, y).float() / 255 for x, y in SQUARES]
    targets = [
        {"boxes": torch.tensor([[x, y, x + 22.0, y + 22.0]]), "labels": torch.tensor([1])} for x, y in SQUARES
    ]
    _, plain = predict_loader(module, [(images, targets)], "cpu")
    _, tiled = predict_loader(
        module, [(images, targets)], "cpu", tiling=spec.tiling, detections_per_image=100
    )
    assert len(tiled) == len(plain) == len(SQUARES)
    for (x, y), without, merged in zip(SQUARES, plain, tiled, strict=True):
        confident = [torch.from_numpy(found.boxes[found.scores >= 0.3]) for found in (without, merged)]
        assert not _found(confident[0], x, y) and _found(confident[1], x, y)
        assert len(merged.boxes) <= 100 and len(merged.boxes) >= 1

    root = tmp_path / "voc"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for index, ((x, y), canvas) in enumerate(zip(SQUARES, images, strict=True)):
        Image.fromarray((canvas * 255).round().byte().permute(1, 2, 0).numpy()).save(
            root / "images" / f"c{index}.png"
        )
        (root / "annotations" / f"c{index}.xml").write_text(
            f"<annotation><filename>c{index}.png</filename><size><width>{CANVAS}</width><height>{CANVAS}</height>"
            f"<depth>3</depth></size><object><name>square</name><difficult>0</difficult><bndbox><xmin>{x}</xmin>"
            f"<ymin>{y}</ymin><xmax>{x + 22}</xmax><ymax>{y + 22}</ymax></bndbox></object></annotation>",
            encoding="utf-8",
        )
    own, _ = evaluate_model(square_model, root, device="cpu")
    switched_off, _ = evaluate_model(
        square_model, root, TrainingParameters(tile_grid_size="none"), device="cpu"
    )
    # The tiny model also fires on some empty tiles (how often depends on the CPU's kernels): what
    # matters is that evaluate scores the merged answer, which finds every square, and not the whole.
    assert own.metrics["recall"] == 1.0 and own.metrics["map_50"] >= 0.5
    assert switched_off.metrics["map_50"] <= 0.1
