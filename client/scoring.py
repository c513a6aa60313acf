"""Local, per-task channel scoring on a device's private data (CUT step 2, on the device).

The device runs the engine's criterion (`cut.importance.score_tasks`) on its decomposed base model and a
few batches of its own samples, then prepares what leaves the device:

1. each task's scores are divided by their mean over all the task's channels (per-task normalisation,
   which measured best for CUT; BENCHMARKS.md): scores become scale-free, so devices with different batch counts or loss scales weigh by their sample counts only,
   and a clip norm means the same thing on every device;
2. privacy (optional, from the ScoringRequest): each task's concatenated vector is clipped to L2 norm
   `clip_norm` and gets Gaussian noise of std `noise_multiplier * clip_norm`, then is clamped at 0 (the
   contract wants non-negative scores; clamping is post-processing, so it costs no privacy);
   (Under `[scoring] privacy = "distributed"` the secure path adds a share of the noise instead:
   `distributed_share`, client.secure, protocol.layout.DistributedNoise.)
3. encoding with `cut.wire.encode_report` (float16 by default: half the upload).

What leaves passes through the device's hooks (client.hooks), where a simulation injects faults.
"""

from __future__ import annotations

import numpy as np
import torch

from client.data import LocalData
from client.device import Device
from client.hooks import NO_HOOKS, DeviceHooks
from cut import fusion
from cut.fusion import TaskScores
from cut.importance import score_tasks
from cut.messages import ImportanceReport, PrivacySettings, ScoringRequest
from cut.models import MultiTaskModel
from cut.train import make_loader
from cut.wire import encode_report


def local_scores(model: MultiTaskModel, data: LocalData, request: ScoringRequest, seed: int) -> TaskScores:
    """task -> group -> raw per-channel scores on this device's training samples."""
    loader = make_loader(data.train, batch_size=request.batch_size, shuffle=True, seed=seed)
    torch.manual_seed(seed)
    return score_tasks(model, loader, list(request.tasks), request.criterion, request.num_batches, seed)


def mean_one(scores: TaskScores) -> TaskScores:
    """Each task's scores divided by their mean over all the task's channels (mean 1 per task).

    This is the engine's per-task (`global`) normalisation, which measured best (BENCHMARKS.md), rescaled
    so values sit near 1 rather than 1/N: they stay well inside float16's normal range on the wire.
    """
    out = {}
    for task, groups in fusion.normalise(scores, "global").items():
        channels = sum(v.size for v in groups.values())
        out[task] = {g: (v * channels).astype(np.float32) for g, v in groups.items()}
    return out


def privatise(scores: TaskScores, privacy: PrivacySettings, rng: np.random.Generator | None = None) -> TaskScores:
    """Clip each task's concatenated vector to `clip_norm` and add Gaussian noise (a no-op when off).

    The noise comes from fresh OS entropy (`np.random.default_rng()`), never from anything the server sent:
    a server that knew the seed could subtract the noise. `rng` is for local benchmarks and tests only; the
    device's code never passes it.
    """
    if privacy.clip_norm <= 0:
        return scores
    if rng is None:
        rng = np.random.default_rng()
    out: TaskScores = {}
    for task, groups in scores.items():
        names = list(groups)
        flat = np.concatenate([groups[g].astype(np.float64) for g in names])
        norm = float(np.linalg.norm(flat))
        if norm > privacy.clip_norm:
            flat *= privacy.clip_norm / norm
        if privacy.noise_multiplier > 0:
            flat += rng.normal(0.0, privacy.noise_multiplier * privacy.clip_norm, size=flat.shape)
        flat = np.maximum(flat, 0.0)
        out[task], start = {}, 0
        for g in names:
            n = len(groups[g])
            out[task][g] = flat[start:start + n].astype(np.float32)
            start += n
    return out


def distributed_share(vector: np.ndarray, scores: int, share_std: float,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Distributed DP: this device's share of the noise, N(0, share_std^2) on each of the first `scores`
    coordinates of its secure vector (the per-task weight block after them is public and gets none).

    Not clamped: the shares of the n devices sum to noise of std sqrt(n) x share_std in the one sum the
    server unmasks, and clamping a share would bias that sum. Fresh OS entropy, as in `privatise`: the
    server sends no seed, so it cannot regenerate and subtract the noise (`rng`: benchmarks and tests only).
    """
    if not (np.isfinite(share_std) and share_std > 0):
        raise ValueError(f"distributed noise: share std must be a finite number > 0, got {share_std!r}")
    if rng is None:
        rng = np.random.default_rng()
    out = np.array(vector, dtype=np.float64, copy=True)
    out[:scores] += rng.normal(0.0, share_std, size=scores)
    return out


def build_report(device: Device, request: ScoringRequest, scores: TaskScores, samples_used: int) -> ImportanceReport:
    return ImportanceReport(
        device_id=device.device_id,
        base_model_id=request.base_model_id,
        base_model_sha256=request.base_model_sha256,
        scores=scores,
        samples_used={t: int(samples_used) for t in scores},
    )


def score_and_encode(
    device: Device, model: MultiTaskModel, data: LocalData, request: ScoringRequest, dtype: str, seed: int,
    hooks: DeviceHooks = NO_HOOKS,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The whole device side of query.score: scores -> normalise -> privatise -> wire (header, arrays)."""
    scores = privatise(mean_one(local_scores(model, data, request, seed)), request.privacy)
    samples_used = min(request.num_batches * request.batch_size, data.num_train)
    report = hooks.outgoing("report", device, build_report(device, request, scores, samples_used))
    header, arrays = encode_report(report, dtype)
    return header, hooks.outgoing("report-arrays", device, arrays)


__all__ = ["build_report", "distributed_share", "local_scores", "mean_one", "privatise", "score_and_encode"]
