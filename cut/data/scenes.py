"""`scenes`: procedurally rendered indoor-like rooms with exact per-pixel class, depth and normals.

The embedded default dataset: no files, deterministic by (seed, split, index). Each scene is a room
(floor, ceiling, walls; a rug on the floor and a picture on a wall) holding boxes, spheres and cylinders,
seen by a pinhole camera with random height, yaw and pitch. Rendering is an exact ray cast, so labels are
ground truth by construction: semantic class of the first surface hit, depth along the optical axis, and
the surface normal in camera coordinates. Surfaces are textured (checker, stripes, noise), lit by a point
light with ambient and Lambertian terms, and the image gets sensor noise.

Each scene has a *room type* (storage, lounge, hall, gallery) that skews which objects appear; it is the
attribute used for non-IID (Dirichlet) partitioning across devices.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from cut.data import register
from cut.tasks import TaskSpec

CLASS_NAMES = ("floor", "ceiling", "wall", "rug", "picture", "box", "sphere", "cylinder")
FLOOR, CEILING, WALL, RUG, PICTURE, BOX, SPHERE, CYLINDER = range(len(CLASS_NAMES))
ROOM_TYPES = ("storage", "lounge", "hall", "gallery")
# Relative frequency of box / sphere / cylinder per room type.
_OBJECT_MIX = {0: (0.7, 0.15, 0.15), 1: (0.15, 0.7, 0.15), 2: (0.15, 0.15, 0.7), 3: (0.34, 0.33, 0.33)}
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}
_MEAN, _STD = 0.45, 0.25


def scene_tasks() -> tuple[TaskSpec, ...]:
    return (
        TaskSpec("seg", "segmentation", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES),
        TaskSpec("depth", "depth", loss_weight=1.0),
        TaskSpec("normals", "normals", loss_weight=1.0),
    )


class Scenes(Dataset):
    """Procedural rooms; `num_samples` scenes per split, rendered on access at `size` x `size`."""

    def __init__(self, split: str = "train", num_samples: int | None = None, size: int = 64, seed: int = 0,
                 cache: bool = True) -> None:
        if size < 8:
            raise ValueError(f"scenes: size must be >= 8, got {size}")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.num_samples = int(num_samples if num_samples is not None else (4000 if split == "train" else 500))
        if self.num_samples < 1:
            raise ValueError("scenes: num_samples must be >= 1")
        self.tasks = scene_tasks()
        self.input_size = (self.size, self.size)
        self.in_channels = 3
        # Rendered scenes kept in compact dtypes (about 15 bytes a pixel), filled on first access:
        # epochs after the first cost no rendering.
        self._cache: dict[int, tuple] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_OFFSET[self.split], index])

    def attribute(self, index: int) -> int:
        """Room type of scene `index` (the first draw of its generator, so no rendering is needed)."""
        return int(self._rng(index).integers(len(ROOM_TYPES)))

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self._cache is not None and index in self._cache:
            image, seg, depth, normals = self._cache[index]
        else:
            image, seg, depth, normals = render_scene(self._rng(index), self.size)
            image, seg = image.astype(np.float16), seg.astype(np.uint8)
            depth, normals = depth.astype(np.float16), normals.astype(np.float16)
            if self._cache is not None:
                self._cache[index] = (image, seg, depth, normals)
        x = torch.from_numpy((image.astype(np.float32) - _MEAN) / _STD).permute(2, 0, 1)
        normals_t = torch.nn.functional.normalize(torch.from_numpy(normals.astype(np.float32)), dim=-1)
        targets = {
            "seg": torch.from_numpy(seg.astype(np.int64)),
            "depth": torch.from_numpy(depth.astype(np.float32))[None],
            "normals": normals_t.permute(2, 0, 1).contiguous(),
        }
        return x, targets


register("scenes")(Scenes)


def _camera_rays(rng: np.random.Generator, size: int):
    fov = np.deg2rad(rng.uniform(55, 70))
    f = 0.5 / np.tan(fov / 2)
    coords = (np.arange(size) + 0.5) / size - 0.5
    u, v = np.meshgrid(coords, -coords)  # v: up is positive
    dirs_cam = np.stack([u, v, np.full_like(u, f)], -1)
    dirs_cam /= np.linalg.norm(dirs_cam, axis=-1, keepdims=True)
    yaw, pitch = rng.uniform(-0.35, 0.35), rng.uniform(-0.25, 0.1)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    rot_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    cam_to_world = rot_yaw @ rot_pitch
    dirs = dirs_cam @ cam_to_world.T
    return dirs.reshape(-1, 3), cam_to_world


def _hit_plane(origin, dirs, axis: int, value: float, normal_sign: float):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (value - origin[axis]) / dirs[:, axis]
    t = np.where(t > 1e-6, t, np.inf)
    normal = np.zeros(3)
    normal[axis] = normal_sign
    return t, np.broadcast_to(normal, dirs.shape)


def _hit_box(origin, dirs, lo, hi):
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs
        t1, t2 = (lo - origin) * inv, (hi - origin) * inv
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, axis = tmin.max(1), tmin.argmax(1)
    t_far = tmax.min(1)
    hit = (t_near <= t_far) & (t_near > 1e-6)
    t = np.where(hit, t_near, np.inf)
    normal = np.zeros_like(dirs)
    rows = np.arange(len(dirs))
    normal[rows, axis] = -np.sign(dirs[rows, axis])
    return t, normal


def _hit_sphere(origin, dirs, center, radius):
    oc = origin - center
    b = dirs @ oc
    c = oc @ oc - radius**2
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0))
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    points = origin + dirs * np.where(np.isfinite(t), t, 0)[:, None]
    return t, (points - center) / radius


def _hit_cylinder(origin, dirs, center_xz, radius, height):
    ox, oz = origin[0] - center_xz[0], origin[2] - center_xz[1]
    dx, dz = dirs[:, 0], dirs[:, 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - radius**2
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
    y_side = origin[1] + t_side * dirs[:, 1]
    t_side = np.where((disc >= 0) & (t_side > 1e-6) & (y_side >= 0) & (y_side <= height), t_side, np.inf)
    t_cap, _ = _hit_plane(origin, dirs, 1, height, 1.0)
    px = origin[0] + t_cap * dirs[:, 0] - center_xz[0]
    pz = origin[2] + t_cap * dirs[:, 2] - center_xz[1]
    with np.errstate(invalid="ignore"):
        t_cap = np.where(px * px + pz * pz <= radius**2, t_cap, np.inf)
    use_cap = t_cap < t_side
    t = np.minimum(t_side, t_cap)
    points = origin + dirs * np.where(np.isfinite(t), t, 0)[:, None]
    side_normal = np.stack([points[:, 0] - center_xz[0], np.zeros(len(t)), points[:, 2] - center_xz[1]], 1) / radius
    normal = np.where(use_cap[:, None], np.array([0.0, 1.0, 0.0]), side_normal)
    return t, normal


def _texture(kind: int, points: np.ndarray, color: np.ndarray, freq: float, phase: float) -> np.ndarray:
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    if kind == 0:  # checker
        pattern = ((np.floor(x * freq + phase) + np.floor(z * freq) + np.floor(y * freq)) % 2) * 0.35 + 0.65
    elif kind == 1:  # stripes
        pattern = 0.75 + 0.25 * np.sin((x + z) * freq * 3 + phase)
    else:  # smooth blotches
        pattern = 0.8 + 0.2 * np.sin(x * freq * 2 + phase) * np.cos(y * freq * 2 - phase)
    return color[None, :] * pattern[:, None]


def _place_objects(rng: np.random.Generator, room_type: int, width: float, depth_far: float):
    """Objects as (class, params) tuples, resting on the floor inside the room, away from the camera."""
    count = int(rng.integers(2, 6))
    mix = np.array(_OBJECT_MIX[room_type])
    objects = []
    for _ in range(count):
        cls = (BOX, SPHERE, CYLINDER)[rng.choice(3, p=mix / mix.sum())]
        x = rng.uniform(-width / 2 + 0.6, width / 2 - 0.6)
        z = rng.uniform(2.0, depth_far - 0.8)
        if cls == BOX:
            half = rng.uniform(0.25, 0.6, size=3)
            half[1] = rng.uniform(0.2, 0.8)
            lo = np.array([x - half[0], 0.0, z - half[2]])
            objects.append((BOX, (lo, lo + 2 * half)))
        elif cls == SPHERE:
            r = rng.uniform(0.25, 0.6)
            objects.append((SPHERE, (np.array([x, r + rng.uniform(0, 0.6), z]), r)))
        else:
            objects.append((CYLINDER, ((x, z), rng.uniform(0.15, 0.4), rng.uniform(0.5, 1.8))))
    return objects


def render_scene(rng: np.random.Generator, size: int):
    """Render one scene; returns (image HxWx3 in [0,1], seg HxW int, depth HxW, normals HxWx3)."""
    room_type = int(rng.integers(len(ROOM_TYPES)))  # first draw: must match Scenes.attribute
    width, height, depth_far = rng.uniform(4, 7), rng.uniform(2.4, 3.2), rng.uniform(6, 10)
    origin = np.array([rng.uniform(-0.5, 0.5), rng.uniform(1.0, 1.7), 0.0])
    dirs, cam_to_world = _camera_rays(rng, size)
    n = len(dirs)

    best_t = np.full(n, np.inf)
    best_cls = np.full(n, WALL, dtype=np.int64)
    best_normal = np.zeros((n, 3))
    best_surface = np.zeros(n, dtype=np.int64)  # index into surface colour/texture table

    def consider(t, normal, cls, surface):
        closer = t < best_t
        best_t[closer] = t[closer]
        best_cls[closer] = cls
        best_normal[closer] = normal[closer]
        best_surface[closer] = surface

    planes = [
        (1, 0.0, 1.0, FLOOR), (1, height, -1.0, CEILING),
        (0, -width / 2, 1.0, WALL), (0, width / 2, -1.0, WALL),
        (2, depth_far, -1.0, WALL), (2, -1.0, 1.0, WALL),
    ]
    surfaces = []
    for axis, value, sign, cls in planes:
        t, normal = _hit_plane(origin, dirs, axis, value, sign)
        consider(t, normal, cls, len(surfaces))
        surfaces.append(cls)

    for cls, params in _place_objects(rng, room_type, width, depth_far):
        if cls == BOX:
            t, normal = _hit_box(origin, dirs, *params)
        elif cls == SPHERE:
            t, normal = _hit_sphere(origin, dirs, *params)
        else:
            t, normal = _hit_cylinder(origin, dirs, *params)
        consider(t, normal, cls, len(surfaces))
        surfaces.append(cls)

    points = origin + dirs * np.where(np.isfinite(best_t), best_t, depth_far)[:, None]
    # Rug on the floor and picture on the back wall: flat patches that only change the class and texture.
    rug_c = np.array([rng.uniform(-1.5, 1.5), rng.uniform(2.5, depth_far - 1.5)])
    rug_half = rng.uniform([0.6, 0.5], [1.4, 1.2])
    on_rug = (best_cls == FLOOR) & (np.abs(points[:, 0] - rug_c[0]) < rug_half[0]) & (
        np.abs(points[:, 2] - rug_c[1]) < rug_half[1]) & (rng.random() < 0.85 or room_type == 3)
    best_cls[on_rug] = RUG
    pic_c = np.array([rng.uniform(-width / 4, width / 4), rng.uniform(1.2, height - 0.6)])
    pic_half = rng.uniform([0.4, 0.3], [1.0, 0.5])
    on_picture = (best_cls == WALL) & (np.abs(points[:, 2] - depth_far) < 1e-3) & (
        np.abs(points[:, 0] - pic_c[0]) < pic_half[0]) & (np.abs(points[:, 1] - pic_c[1]) < pic_half[1])
    best_cls[on_picture] = PICTURE

    # Appearance: one colour and texture per surface, distinct ones for rug and picture.
    albedo = np.zeros((n, 3))
    class_palette = {FLOOR: (0.55, 0.4, 0.25), CEILING: (0.9, 0.9, 0.88), WALL: (0.75, 0.72, 0.65),
                     BOX: (0.6, 0.45, 0.3), SPHERE: (0.3, 0.5, 0.8), CYLINDER: (0.5, 0.7, 0.35),
                     RUG: (0.7, 0.2, 0.25), PICTURE: (0.2, 0.25, 0.35)}
    texture_of = {FLOOR: 0, CEILING: 2, WALL: 2, BOX: 1, SPHERE: 2, CYLINDER: 1, RUG: 1, PICTURE: 0}
    for surface_id, surface_cls in enumerate(surfaces):
        for cls in {surface_cls, RUG, PICTURE}:
            mask = (best_surface == surface_id) & (best_cls == cls)
            if not mask.any():
                continue
            base = np.array(class_palette[cls]) * rng.uniform(0.75, 1.25, size=3)
            albedo[mask] = _texture(texture_of[cls], points[mask], np.clip(base, 0, 1),
                                    rng.uniform(1.5, 4.0), rng.uniform(0, 6.28))

    light = np.array([rng.uniform(-1, 1), height - 0.2, rng.uniform(1.5, depth_far / 2)])
    to_light = light - points
    dist = np.linalg.norm(to_light, axis=1, keepdims=True)
    normals_world = best_normal / np.maximum(np.linalg.norm(best_normal, axis=1, keepdims=True), 1e-9)
    facing = np.sign((normals_world * -dirs).sum(1, keepdims=True))  # make normals face the camera
    normals_world = normals_world * np.where(facing == 0, 1, facing)
    lambert = np.clip((normals_world * to_light / dist).sum(1, keepdims=True), 0, 1)
    intensity = rng.uniform(0.25, 0.4) + rng.uniform(0.6, 0.9) * lambert * np.clip(6.0 / (dist**2 + 2.0), 0, 1.2)
    image = albedo * intensity
    image = image + rng.normal(0, 0.02, size=image.shape)

    depth = (points - origin) @ cam_to_world[:, 2]  # distance along the optical axis
    normals_cam = normals_world @ cam_to_world  # world -> camera coordinates
    return (
        np.clip(image, 0, 1).reshape(size, size, 3).astype(np.float32),
        best_cls.reshape(size, size),
        depth.reshape(size, size).astype(np.float32),
        normals_cam.reshape(size, size, 3).astype(np.float32),
    )
