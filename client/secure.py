"""The device side of secure aggregation (`[scoring] secure_aggregation`): one flat vector per device.

Under Flower's SecAgg+ the server only learns the *sum* of the devices' vectors, so what a device sends
must be summable into exactly what the plain weighted mean needs. Every device therefore lays out one
float vector over ALL tasks of the base model, in an order both sides share (`protocol.layout.Layout`, sent by the server
in the ScoringRequest's config and checked by the device against its own model):

    [ w_t * s_t[g][c]  for t in tasks, for g in t's groups, for c in g's channels ]  +  [ C * w_t for t in tasks ]

where `s_t` are the device's per-task scores normalised to mean 1 over the task's channels (after the
optional clipping and noise of client.scoring, normalised again, exactly as the server's per-task
normalisation would treat a plain report) and `w_t` is the device's sample weight for t (samples used,
capped at the samples its profile declared, divided by the server's `weight_scale` so it lies in [0, 1]);
both are 0 for a task the device does not hold. Summed over devices this gives, per task, the weighted
sum of scores and the total weight: their ratio is the plain path's weighted mean. C is the clipping range
below: the weights then use the whole quantisation range, so the total weight, which scales every score of
its task, is exact to about 1e-9 instead of 1e-6.

The server cannot validate individual vectors any more (it never sees them), so the device validates its
own (finite, non-negative, the right groups and sizes) and refuses to send anything else. Values are at
most the task's channel count (a mean-1 non-negative vector cannot exceed it), which is the SecAgg+
clipping range the server uses: nothing is ever clipped, only quantised.

Distributed differential privacy (the layout carries `dp`, protocol.layout.DistributedNoise): the device
encodes its mean-1 scores as u_t = clip(T(s_t) / sqrt(N_t)), weights them as above, and adds its share of
the noise (client.scoring.distributed_share, fresh OS entropy) to the score coordinates before masking;
the local `privacy` of the request is then off (the server refuses both at once).

The reply is Flower's legacy FitRes layout, which `flwr.client.mod.secaggplus_mod` masks before it leaves
the device: `fitres.parameters` (the vector), `fitres.num_examples` = 1 (the real weights are inside the
vector; SecAgg+ divides by the sum of num_examples, the server multiplies back by the device count),
empty `fitres.metrics` (nothing else leaves in the clear) and an OK `fitres.status`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from client.data import LocalData
from client.device import Device
from client.hooks import NO_HOOKS, DeviceHooks
from client.scoring import distributed_share, local_scores, mean_one, privatise
from cut.messages import ScoringRequest
from cut.models import MultiTaskModel
from protocol.layout import Layout


def secure_vector(device: Device, model: MultiTaskModel, data: LocalData, request: ScoringRequest, layout: Layout,
                  seed: int, hooks: DeviceHooks = NO_HOOKS) -> np.ndarray:
    """What this device contributes to the secure sum (see the module docstring)."""
    scores = mean_one(privatise(mean_one(local_scores(model, data, request, seed)), request.privacy))
    used = min(request.num_batches * request.batch_size, data.num_train)
    declared = device.profile(data.num_train).samples_per_task
    # The device caps its own weight (the server, seeing only sums, cannot): samples used, at most declared.
    weights = {t: min(1.0, min(used, declared.get(t, used)) / layout.weight_scale) for t in scores}
    if layout.dp is not None:
        scores = layout.dp.encode(scores, {t: layout.channels(t) for t in scores})
    scores = hooks.outgoing("secure-scores", device, scores)
    vector = layout.flatten(scores, weights)  # refuses scores that are not finite and non-negative
    if layout.dp is not None:
        vector = distributed_share(vector, layout.score_size, layout.dp.share_std)
        vector = np.clip(vector, -layout.clipping_range, layout.clipping_range)  # what the quantiser does
    return vector


def legacy_reply(vector: np.ndarray) -> RecordDict:
    """The FitRes layout secaggplus_mod expects; it masks `fitres.parameters` before anything leaves."""
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([np.asarray(vector, dtype=np.float64)]),
                    num_examples=1, metrics={})
    return fitres_to_recorddict(fitres, keep_input=False)


__all__ = ["legacy_reply", "secure_vector"]
