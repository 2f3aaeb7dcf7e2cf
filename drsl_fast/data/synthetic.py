"""Built-in synthetic street-scene domain pair (issue 5), the project's default
data when no real dataset is at hand.

Scenes are drawn procedurally from a seed: sky, buildings, road with lane
marks, sidewalks, trees, poles with traffic signs, cars and persons, labelled
with Cityscapes ids. Every class has several appearance modes (three car
colours, brick / glass / concrete buildings, ...), which is what MMDL's modes
model (docs/method.md §1).

- Source ("game-like"): flat, saturated colours, no noise, sharp edges, a
  horizon near mid-height. Written in the GTA5 layout (``images/``,
  ``labels/`` with palette PNGs of Cityscapes ids), 16:9 frames.
- Target ("real-like"): a shifted domain -- desaturated, tinted palette
  (colour matrix and gamma), a lighting gradient, sensor noise, blur, a
  different mix of modes (mostly overcast skies, white cars, glass buildings,
  autumn trees) and of layouts (higher horizon, more objects, an ego-vehicle
  hood labelled "ego vehicle", i.e. ignored). Written in the Cityscapes layout
  (``leftImg8bit`` and ``gtFine`` ``*_labelIds.png``, train and val), 2:1 frames.

Image ``i`` of a split depends only on (seed, split, i): the pair is
deterministic and byte-identical across runs.
"""

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
from PIL import Image

from .labels import CITYSCAPES_ID

RGB = Tuple[int, int, int]

# Appearance modes per class: one flat colour each (source palette).
MODE_COLOURS: Dict[str, Tuple[RGB, ...]] = {
    "sky": ((100, 165, 245), (200, 205, 215)),  # clear, overcast
    "building": ((155, 70, 50), (80, 120, 170), (150, 150, 140)),  # brick, glass, concrete
    "road": ((75, 75, 80), (100, 92, 85)),  # asphalt, worn
    "sidewalk": ((175, 170, 165), (185, 120, 110)),  # paving, red tiles
    "vegetation": ((35, 125, 35), (100, 170, 55), (185, 125, 35)),  # dark, light, autumn
    "car": ((210, 30, 30), (30, 60, 200), (235, 235, 235)),  # red, blue, white
    "person": ((230, 190, 40), (45, 45, 45), (50, 160, 180)),  # shirt colours
    "pole": ((115, 115, 120), (55, 55, 60)),
    "traffic sign": ((30, 80, 210), (245, 205, 20), (225, 30, 30)),
}

# Official Cityscapes colours, for viewing the palette label PNGs.
LABEL_COLOURS: Dict[int, RGB] = {
    1: (0, 0, 0), 7: (128, 64, 128), 8: (244, 35, 232), 11: (70, 70, 70), 17: (153, 153, 153),
    20: (220, 220, 0), 21: (107, 142, 35), 23: (70, 130, 180), 24: (220, 20, 60), 26: (0, 0, 142),
}  # fmt: skip


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks: mode mix, layout ranges and image degradations."""

    mode_weights: Dict[str, Tuple[float, ...]]
    horizon: Tuple[float, float]  # fraction of the height
    cars: Tuple[int, int]  # inclusive count ranges
    persons: Tuple[int, int]
    trees: Tuple[int, int]
    poles: Tuple[int, int]
    colour_matrix: Tuple[Tuple[float, float, float], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    gamma: float = 1.0
    lighting: float = 0.0  # amplitude of the multiplicative lighting gradient
    noise: float = 0.0  # std of per-pixel noise, in 0-255 units
    blur: float = 0.0  # Gaussian blur sigma in pixels (0: none)
    object_jitter: float = 0.04  # per-object brightness std
    ego_vehicle: bool = False


def uniform_weights(counts: Dict[str, int]) -> Dict[str, Tuple[float, ...]]:
    return {name: tuple(1.0 for _ in range(n)) for name, n in counts.items()}


SOURCE_STYLE = DomainStyle(
    mode_weights=uniform_weights({k: len(v) for k, v in MODE_COLOURS.items()}),
    horizon=(0.42, 0.52),
    cars=(1, 4),
    persons=(0, 3),
    trees=(1, 3),
    poles=(1, 3),
)

TARGET_STYLE = DomainStyle(
    mode_weights={
        "sky": (0.2, 0.8),
        "building": (0.2, 0.5, 0.3),
        "road": (0.3, 0.7),
        "sidewalk": (0.7, 0.3),
        "vegetation": (0.3, 0.2, 0.5),
        "car": (0.15, 0.15, 0.7),
        "person": (0.2, 0.5, 0.3),
        "pole": (0.3, 0.7),
        "traffic sign": (0.5, 0.3, 0.2),
    },
    horizon=(0.33, 0.43),
    cars=(2, 6),
    persons=(1, 5),
    trees=(2, 5),
    poles=(1, 4),
    colour_matrix=((0.70, 0.25, 0.10), (0.15, 0.65, 0.15), (0.15, 0.25, 0.50)),
    gamma=1.35,
    lighting=0.45,
    noise=9.0,
    blur=1.0,
    object_jitter=0.12,
    ego_vehicle=True,
)


class SceneCanvas:
    """An RGB float image and its label map, painted in draw order."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, style: DomainStyle):
        self.height, self.width, self.rng, self.style = height, width, rng, style
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.ids = np.zeros((height, width), np.uint8)

    def pick_mode(self, name: str) -> Tuple[int, np.ndarray]:
        """A mode of class ``name`` drawn from the domain's mix, and its jittered colour."""
        weights = np.asarray(self.style.mode_weights[name], np.float64)
        mode = int(self.rng.choice(len(weights), p=weights / weights.sum()))
        gain = 1.0 + self.rng.normal(0.0, self.style.object_jitter)
        return mode, np.asarray(MODE_COLOURS[name][mode], np.float32) * gain

    def mode_colour(self, name: str) -> np.ndarray:
        return self.pick_mode(name)[1]

    def paint(self, mask: np.ndarray, name: str, colour, texture: Optional[np.ndarray] = None) -> None:
        colour = np.asarray(colour, np.float32)
        self.ids[mask] = CITYSCAPES_ID[name]
        self.rgb[mask] = colour if texture is None else colour * texture[mask][:, None]

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.xx - cx) / max(rx, 0.5)) ** 2 + ((self.yy - cy) / max(ry, 0.5)) ** 2 <= 1.0

    def smooth_noise(self, cell: int) -> np.ndarray:
        """Blocky noise in [0, 1) with ``cell``-pixel cells (textures)."""
        coarse = self.rng.random((self.height // cell + 1, self.width // cell + 1)).astype(np.float32)
        return np.kron(coarse, np.ones((cell, cell), np.float32))[: self.height, : self.width]


@dataclass
class StreetLayout:
    """Horizon, vanishing point and road edges of one scene."""

    horizon: float
    vanish_x: float
    road_left: float  # road edges at the bottom row
    road_right: float

    def depth(self, y, height: int):
        """0 at the horizon, 1 at the bottom row."""
        return np.clip((y - self.horizon) / (height - self.horizon), 0.0, None)

    def road_edges(self, y, height: int):
        t = self.depth(y, height)
        return self.vanish_x + t * (self.road_left - self.vanish_x), self.vanish_x + t * (
            self.road_right - self.vanish_x
        )


def draw_background(canvas: SceneCanvas, layout: StreetLayout) -> None:
    """Sky, buildings, road with lane marks, sidewalks."""
    H, W, rng, yy, xx = canvas.height, canvas.width, canvas.rng, canvas.yy, canvas.xx
    canvas.paint(np.ones((H, W), bool), "sky", canvas.mode_colour("sky"))
    x = -rng.uniform(0, 0.1) * W
    while x < W:
        width = rng.uniform(0.08, 0.3) * W
        top = layout.horizon - rng.uniform(0.12, 0.42) * H
        mask = canvas.rect(x, top, x + width, layout.horizon + 1)
        mode, colour = canvas.pick_mode("building")
        canvas.paint(mask, "building", colour, building_texture(mode, xx - x, yy - top))
        x += width + (rng.uniform(0.02, 0.08) * W if rng.random() < 0.25 else 0.0)

    below = yy >= layout.horizon
    left, right = layout.road_edges(yy, H)
    road = below & (xx >= left) & (xx < right)
    canvas.paint(below & ~road, "sidewalk", canvas.mode_colour("sidewalk"), 0.9 + 0.2 * canvas.smooth_noise(4))
    canvas.paint(road, "road", canvas.mode_colour("road"), 0.92 + 0.16 * canvas.smooth_noise(2))
    t = layout.depth(yy, H)
    centre = (left + right) / 2
    dashes = ((t * 12.0) % 1.0) < 0.5
    canvas.paint(road & dashes & (np.abs(xx - centre) < 0.5 + 2.0 * t), "road", (225, 225, 215))


def building_texture(mode: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brick courses, glass window grid or concrete panels (x, y relative to the facade)."""
    xi, yi = np.floor(x).astype(np.int32), np.floor(y).astype(np.int32)
    if mode == 0:
        mortar = (yi % 5 == 0) | ((xi + 5 * ((yi // 5) % 2)) % 10 == 0)
        return np.where(mortar, 0.7, 1.0).astype(np.float32)
    if mode == 1:
        window = (xi % 9 < 6) & (yi % 8 < 5)
        return np.where(window, 1.3, 0.6).astype(np.float32)
    return np.where(yi % 12 == 0, 0.85, 1.0).astype(np.float32)


def sidewalk_point(canvas: SceneCanvas, layout: StreetLayout, min_depth: float) -> Tuple[float, float]:
    """A random ground point (x, y) on a sidewalk, at least ``min_depth`` below the horizon."""
    H, W, rng = canvas.height, canvas.width, canvas.rng
    y = layout.horizon + rng.uniform(min_depth, 1.0) * (H - layout.horizon)
    left, right = layout.road_edges(y, H)
    if rng.random() < 0.5 and left > 1:
        return rng.uniform(0, left), y
    if right < W - 1:
        return rng.uniform(right, W), y
    return rng.uniform(0, max(left, 1.0)), y


Painter = Callable[[], None]


def plan_tree(canvas: SceneCanvas, layout: StreetLayout) -> Tuple[float, Painter]:
    x, y = sidewalk_point(canvas, layout, 0.05)
    radius = 2.0 + float(layout.depth(y, canvas.height)) * canvas.rng.uniform(0.12, 0.25) * canvas.height

    def paint() -> None:
        half_trunk = max(0.6, radius * 0.12)
        colour = canvas.mode_colour("vegetation")
        canvas.paint(canvas.rect(x - half_trunk, y - 2.2 * radius, x + half_trunk, y), "vegetation", colour * 0.45)
        crown = canvas.ellipse(x, y - 2.6 * radius, radius, radius * 1.15)
        canvas.paint(crown, "vegetation", colour, 0.8 + 0.4 * canvas.smooth_noise(2))

    return y, paint


def plan_pole(canvas: SceneCanvas, layout: StreetLayout) -> Tuple[float, Painter]:
    x, y = sidewalk_point(canvas, layout, 0.08)
    width = max(1.0, 4.0 * float(layout.depth(y, canvas.height)))
    top = y - (y - layout.horizon) * canvas.rng.uniform(2.0, 3.5) - 4

    def paint() -> None:
        canvas.paint(canvas.rect(x - width / 2, top, x + width / 2, y), "pole", canvas.mode_colour("pole"))
        if canvas.rng.random() < 0.7:
            size = max(2.0, 3.5 * width)
            if canvas.rng.random() < 0.5:
                sign = canvas.ellipse(x, top + size, size, size)
            else:
                sign = canvas.rect(x - size, top, x + size, top + 1.6 * size)
            canvas.paint(sign, "traffic sign", canvas.mode_colour("traffic sign"))

    return y, paint


def plan_car(canvas: SceneCanvas, layout: StreetLayout) -> Tuple[float, Painter]:
    H, rng = canvas.height, canvas.rng
    y = layout.horizon + rng.uniform(0.12, 1.05) * (H - layout.horizon)
    left, right = layout.road_edges(y, H)
    width = 3.0 + float(layout.depth(y, H)) * rng.uniform(0.22, 0.32) * canvas.width
    x = left + rng.uniform(0.15, 0.85) * (right - left)
    height = 0.55 * width

    def paint() -> None:
        body = canvas.rect(x - width / 2, y - 0.7 * height, x + width / 2, y - 0.15 * height)
        cabin = canvas.rect(x - 0.32 * width, y - height, x + 0.32 * width, y - 0.65 * height)
        windows = canvas.rect(x - 0.27 * width, y - 0.95 * height, x + 0.27 * width, y - 0.7 * height)
        wheels = canvas.ellipse(x - 0.3 * width, y - 0.15 * height, 0.12 * width, 0.15 * height) | canvas.ellipse(
            x + 0.3 * width, y - 0.15 * height, 0.12 * width, 0.15 * height
        )
        canvas.paint(body | cabin, "car", canvas.mode_colour("car"))
        canvas.paint(windows, "car", (45, 55, 70))
        canvas.paint(wheels, "car", (25, 25, 25))

    return y, paint


def plan_person(canvas: SceneCanvas, layout: StreetLayout) -> Tuple[float, Painter]:
    x, y = sidewalk_point(canvas, layout, 0.1)
    height = 4.0 + float(layout.depth(y, canvas.height)) * canvas.rng.uniform(0.25, 0.4) * canvas.height
    half = 0.14 * height

    def paint() -> None:
        canvas.paint(canvas.rect(x - half * 0.8, y - 0.45 * height, x + half * 0.8, y), "person", (50, 50, 85))
        torso = canvas.rect(x - half, y - 0.82 * height, x + half, y - 0.45 * height)
        canvas.paint(torso, "person", canvas.mode_colour("person"))
        canvas.paint(canvas.ellipse(x, y - 0.9 * height, 0.6 * half, 0.1 * height), "person", (225, 185, 150))

    return y, paint


OBJECT_PLANNERS: Dict[str, Callable[[SceneCanvas, StreetLayout], Tuple[float, Painter]]] = {
    "trees": plan_tree,
    "poles": plan_pole,
    "cars": plan_car,
    "persons": plan_person,
}


def draw_objects(canvas: SceneCanvas, layout: StreetLayout) -> None:
    """Places the domain's numbers of objects, then paints them far to near
    (ascending ground row) so nearer objects occlude farther ones."""
    planned: List[Tuple[float, Painter]] = []
    for kind, planner in OBJECT_PLANNERS.items():
        low, high = getattr(canvas.style, kind)
        planned += [planner(canvas, layout) for _ in range(int(canvas.rng.integers(low, high + 1)))]
    for _, paint in sorted(planned, key=lambda item: item[0]):
        paint()


def apply_camera(canvas: SceneCanvas) -> np.ndarray:
    """Domain-specific colour transform, lighting gradient, noise and blur -> uint8 RGB."""
    style, rng = canvas.style, canvas.rng
    rgb = canvas.rgb @ np.asarray(style.colour_matrix, np.float32).T
    rgb = 255.0 * (np.clip(rgb, 0, 255) / 255.0) ** style.gamma
    if style.lighting:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * (canvas.xx / canvas.width - 0.5) + np.sin(angle) * (canvas.yy / canvas.height - 0.5)
        rgb = rgb * (1.0 + style.lighting * ramp)[..., None] * rng.uniform(0.8, 1.15)
    if style.blur:
        rgb = cv2.GaussianBlur(rgb, (0, 0), style.blur)
    if style.noise:
        rgb = rgb + rng.normal(0.0, style.noise, rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render_scene(
    rng: np.random.Generator, style: DomainStyle, height: int, width: int
) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB and (H, W) uint8 Cityscapes ids."""
    canvas = SceneCanvas(height, width, rng, style)
    layout = StreetLayout(
        horizon=rng.uniform(*style.horizon) * height,
        vanish_x=rng.uniform(0.35, 0.65) * width,
        road_left=rng.uniform(-0.25, 0.2) * width,
        road_right=rng.uniform(0.8, 1.25) * width,
    )
    draw_background(canvas, layout)
    draw_objects(canvas, layout)
    if style.ego_vehicle:
        hood = canvas.ellipse(width / 2, height * 1.1, width * 0.7, height * 0.16)
        canvas.paint(hood, "ego vehicle", (35, 35, 40))
    return apply_camera(canvas), canvas.ids


SPLIT_KEYS = {"source": 0, "target_train": 1, "target_val": 2}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_KEYS[split], index])


def save_rgb(path: str, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path)


def save_palette_label(path: str, ids: np.ndarray) -> None:
    """Palette PNG whose indices are the ids (the GTA5 label format)."""
    image = Image.fromarray(ids)
    palette = np.zeros((256, 3), np.uint8)
    for label_id, colour in LABEL_COLOURS.items():
        palette[label_id] = colour
    image.putpalette(palette.tobytes())
    image.save(path)


@dataclass
class SyntheticPairConfig:
    """What :func:`make_synthetic_pair` writes (sizes are (width, height))."""

    seed: int = 0
    n_source: int = 300
    n_target_train: int = 200
    n_target_val: int = 60
    source_size: Tuple[int, int] = (256, 144)  # 16:9 like GTA5
    target_size: Tuple[int, int] = (256, 128)  # 2:1 like Cityscapes
    target_style: Optional[Dict[str, object]] = None  # DomainStyle fields changed for the target, e.g. {"lighting": 0}


def target_style(changes: Optional[Dict[str, object]]) -> DomainStyle:
    """:data:`TARGET_STYLE` with ``changes`` (a mapping of :class:`DomainStyle`
    fields; lists become tuples; ``mode_weights`` changes only the classes it
    names), to vary the domain gap."""
    if not changes:
        return TARGET_STYLE
    known = {field.name for field in fields(DomainStyle)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"target_style: unknown DomainStyle fields {unknown}; known: {sorted(known)}")

    def as_tuples(value):
        if isinstance(value, dict):
            return {k: as_tuples(v) for k, v in value.items()}
        return tuple(as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value

    def merged(name, value):  # a mapping field (mode_weights) keeps the classes not named
        current = getattr(TARGET_STYLE, name)
        return {**current, **as_tuples(value)} if isinstance(current, dict) else as_tuples(value)

    return replace(TARGET_STYLE, **{name: merged(name, value) for name, value in changes.items()})


def make_synthetic_pair(out_dir: str, config: Optional[SyntheticPairConfig] = None) -> Dict[str, str]:
    """Writes the pair under ``out_dir``: ``source/`` (GTA5 layout) and
    ``target/`` (Cityscapes layout, cities ``synthtrain`` and ``synthval``),
    plus ``synthetic_pair.json`` with the config (default
    :class:`SyntheticPairConfig`). Returns the two roots."""
    config = config if config is not None else SyntheticPairConfig()
    source_root, target_root = os.path.join(out_dir, "source"), os.path.join(out_dir, "target")
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(source_root, sub), exist_ok=True)
    width, height = config.source_size
    for index in range(config.n_source):
        rgb, ids = render_scene(scene_rng(config.seed, "source", index), SOURCE_STYLE, height, width)
        name = f"{index + 1:05d}.png"
        save_rgb(os.path.join(source_root, "images", name), rgb)
        save_palette_label(os.path.join(source_root, "labels", name), ids)

    width, height = config.target_size
    style = target_style(config.target_style)
    for split, city, count in (
        ("train", "synthtrain", config.n_target_train),
        ("val", "synthval", config.n_target_val),
    ):
        image_dir = os.path.join(target_root, "leftImg8bit", split, city)
        label_dir = os.path.join(target_root, "gtFine", split, city)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for index in range(count):
            rgb, ids = render_scene(scene_rng(config.seed, f"target_{split}", index), style, height, width)
            stem = f"{city}_{index // 1000:06d}_{index % 1000:06d}"
            save_rgb(os.path.join(image_dir, f"{stem}_leftImg8bit.png"), rgb)
            Image.fromarray(ids).save(os.path.join(label_dir, f"{stem}_gtFine_labelIds.png"))

    with open(os.path.join(out_dir, "synthetic_pair.json"), "w", encoding="utf-8") as handle:
        json.dump(asdict(config), handle, indent=2, sort_keys=True)
    return {"source": source_root, "target": target_root}
