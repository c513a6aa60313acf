"""The privacy a device spends by sending its scores: (epsilon, delta) of its Gaussian mechanism.

What is protected (the unit of privacy): **one device's whole local dataset** (user-level local DP). The
server sees every report, so the guarantee is that of each device's own release: any two local datasets,
however different, give report distributions within (epsilon, delta) of each other.

The mechanism (client.scoring.privatise): for each of its k tasks a device clips the task's concatenated
score vector to L2 norm C (`scoring.clip_norm`) and adds N(0, (z C)^2) to every coordinate, z =
`scoring.noise_multiplier`; clamping at 0, the float16 encoding and everything the server does later are
post-processing and cost nothing.

Sensitivity: scores are non-negative before clipping (cut.importance validates every criterion's
scores >= 0, and per-task normalisation divides by a positive total), and clipping keeps them so. Two
non-negative vectors x, y of norm <= C have x.y >= 0, so ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y <= 2 C^2:
the L2 sensitivity of one task's vector is sqrt(2) C (not 2 C, the bound for arbitrary signs). A device
with k tasks releases k such vectors with independent noise: one Gaussian mechanism on the concatenated
vector with sensitivity sqrt(2 k) C and noise z C, i.e. a noise-to-sensitivity ratio
sigma = z / sqrt(2 k). Devices with more tasks spend more; the report states the maximum over devices.

Accounting (distributed): Google's dp-accounting library composes the releases (its PLD accountant is
what the report states; its RDP accountant is shown too); the closed form of the analytic Gaussian is the
cross-check (tests/test_privacy.py). Accounting (local, unchanged): Renyi DP of the Gaussian mechanism
(Mironov 2017: RDP(alpha) = alpha / (2 sigma^2), additive under composition), converted to (epsilon, delta) with the conversion of Balle et al. 2020 / Canonne,
Kamath & Steinke 2020 (epsilon = RDP(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) /
(alpha - 1), minimised over alpha). Because the whole release is a single Gaussian mechanism, its exact
privacy curve is known too (the analytic Gaussian mechanism, Balle & Wang 2018): `analytic_epsilon`
gives the tight epsilon, which the RDP figure upper-bounds; both are reported.

Distributed DP (`[scoring] privacy = "distributed"`, needs secure aggregation): each device encodes every
task's mean-1 scores as u_t = clip(T(s_t) / sqrt(N_t), C) (protocol.layout.DistributedNoise: T a power
transform, C = `dp_clip`), weights it by its public sample weight w_t <= 1 and adds N(0, (z C)^2 / n_min)
to each score coordinate of its SecAgg+ vector, z = `dp_noise_multiplier`, n_min = `dp_min_devices`. The
server unmasks only the sum; with n >= n_min devices in it the sum carries Gaussian noise of std
z C sqrt(n / n_min) >= z C per coordinate. The release is aborted *before unmasking* when fewer than n_min
devices sent masked vectors (server.secagg), so a sum with less noise is never reconstructed. Replacing
one device's whole dataset moves its non-negative, norm <= C contribution by at most sqrt(2) C per task:
one release is k Gaussian mechanisms of noise-to-sensitivity ratio z / sqrt(2) for a device with k
tasks, i.e. one of ratio z / sqrt(2 k); every release (each task, each run: `dp_prior_releases` earlier
runs) composes (`distributed_epsilon`). The server's shrinkage, clamping and inverse transform are
post-processing. Each share alone, if it were exposed, would be protected only at z / sqrt(n_min).

Local DP and secure aggregation without `distributed`: the server's sums are post-processing of locally
private reports, so the local epsilon holds unchanged.

Assumptions (stated in every report): fresh device-side randomness (the ScoringRequest carries no noise
seed), an idealised continuous Gaussian (floating-point sampling effects ignored), and the accounting
covers the scores only, one scoring round: fine-tuning updates (FedAvg) and evaluation metrics are not
privatised, and the sample counts in the profile are public metadata.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np

MECHANISM = "Gaussian mechanism per task vector (L2 clip, N(0, (noise_multiplier * clip_norm)^2) per coordinate)"
UNIT = "one device's whole local dataset (user-level local DP: the server sees each device's report)"
SENSITIVITY = "sqrt(2) * clip_norm per task vector (scores >= 0 before clipping); sqrt(2 k) * clip_norm for k tasks"
ASSUMPTIONS = (
    "fresh randomness on each device (no noise seed in the ScoringRequest)",
    "idealised continuous Gaussian noise (floating-point sampling effects ignored)",
    "covers the score reports of one scoring round only: fine-tune updates and evaluation metrics are not "
    "privatised, and sample counts in the profile are public",
)

# RDP orders: dense near 1 (large epsilon) and up to 1e6 (tiny epsilon); refined around the best.
_ORDERS = np.unique(np.concatenate([1.0 + np.logspace(-4, 6, 2001)]))


def sigma_of(noise_multiplier: float, num_tasks: int = 1) -> float:
    """Noise-to-sensitivity ratio of a device's whole release: z / sqrt(2 k) (non-negative scores)."""
    if noise_multiplier < 0 or num_tasks < 1:
        raise ValueError(f"need noise_multiplier >= 0 and num_tasks >= 1, got {noise_multiplier}, {num_tasks}")
    return noise_multiplier / math.sqrt(2.0 * num_tasks)


def gaussian_rdp(orders: np.ndarray | float, sigma: float) -> np.ndarray:
    """RDP of the Gaussian mechanism with noise-to-sensitivity ratio sigma, at each order alpha > 1."""
    return np.asarray(orders, dtype=np.float64) / (2.0 * sigma * sigma)


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """(epsilon, best order) from RDP values (Balle et al. 2020, Prop. 3 / Canonne et al. 2020)."""
    _check_delta(delta)
    a = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp, dtype=np.float64) + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


def rdp_epsilon(sigma: float, delta: float, compositions: int = 1) -> float:
    """epsilon at delta of `compositions` Gaussian mechanisms of ratio sigma, by RDP (upper bound)."""
    if sigma <= 0:
        return math.inf
    eps, best = rdp_to_epsilon(_ORDERS, compositions * gaussian_rdp(_ORDERS, sigma), delta)
    fine = np.linspace(max(1.0 + 1e-6, best * 0.98), best * 1.02, 401)  # refine around the grid's best
    return min(eps, rdp_to_epsilon(fine, compositions * gaussian_rdp(fine, sigma), delta)[0])


def _log_phi(x: float) -> float:
    """log of the standard normal CDF, accurate far in the lower tail."""
    if x > -30.0:
        return math.log(max(0.5 * math.erfc(-x / math.sqrt(2.0)), 1e-300))
    # Mills ratio asymptotics: Phi(x) ~ phi(x) / |x| * (1 - 1/x^2 + 3/x^4)
    return -0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / x**2 + 3 / x**4)


def analytic_delta(epsilon: float, sigma: float) -> float:
    """The exact delta(epsilon) of the Gaussian mechanism with ratio sigma (Balle & Wang 2018, Thm. 8):
    Phi(1/(2 sigma) - epsilon sigma) - e^epsilon Phi(-1/(2 sigma) - epsilon sigma)."""
    if sigma <= 0:
        return 1.0
    a, b = 0.5 / sigma - epsilon * sigma, -0.5 / sigma - epsilon * sigma
    first = math.exp(_log_phi(a))
    second = math.exp(min(700.0, epsilon + _log_phi(b)))
    return max(0.0, first - second)


def analytic_epsilon(sigma: float, delta: float) -> float:
    """The smallest epsilon with analytic_delta(epsilon, sigma) <= delta (bisection; tight)."""
    _check_delta(delta)
    if sigma <= 0:
        return math.inf
    if analytic_delta(0.0, sigma) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while analytic_delta(hi, sigma) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if analytic_delta(mid, sigma) <= delta else (mid, hi)
    return hi


def local_epsilon(noise_multiplier: float, num_tasks: int, delta: float, method: str = "rdp") -> float:
    """epsilon at delta of one device's report (k = num_tasks task vectors); inf without noise."""
    sigma = sigma_of(noise_multiplier, num_tasks)
    if method == "rdp":
        return rdp_epsilon(sigma, delta)
    if method == "analytic":
        return analytic_epsilon(sigma, delta)
    raise ValueError(f"unknown accounting method {method!r} (rdp or analytic)")


def central_epsilon(central_noise_multiplier: float, num_tasks: int, delta: float, method: str = "rdp") -> float:
    """Distributed DP: epsilon of the per-task sums when they carry noise of std z C in total (each of the
    n devices adding z C / sqrt(n) under secure aggregation). Same formula; z is the total noise."""
    return local_epsilon(central_noise_multiplier, num_tasks, delta, method)


def noise_for_epsilon(epsilon: float, num_tasks: int, delta: float, method: str = "rdp") -> float:
    """The smallest noise_multiplier whose report (num_tasks vectors) spends at most `epsilon` at delta."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"target epsilon must be a finite number > 0, got {epsilon}")
    _check_delta(delta)
    lo, hi = 0.5, 1.0
    while local_epsilon(hi, num_tasks, delta, method) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e7:
            raise ValueError(f"epsilon {epsilon} at delta {delta} needs an absurd noise multiplier")
    while lo > 1e-9 and local_epsilon(lo, num_tasks, delta, method) <= epsilon:
        lo, hi = lo / 2.0, lo
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if local_epsilon(mid, num_tasks, delta, method) > epsilon else (lo, mid)
    return hi


DISTRIBUTED_MECHANISM = ("Gaussian mechanism on the SecAgg+ sum: each device clips each task's transformed "
                         "vector T(s)/sqrt(channels) to L2 dp_clip and adds N(0, (z dp_clip)^2 / n_min) per "
                         "coordinate; the sum carries std >= z dp_clip")
DISTRIBUTED_UNIT = ("one device's whole local dataset (user-level, replace-one), against the server that holds "
                    "only the unmasked sum (central DP of the release)")
DISTRIBUTED_ASSUMPTIONS = (
    "an honest-but-curious server that runs SecAgg+ as specified (it checks n_min before unmasking; a device "
    "sees only its neighbours and cannot check it)",
    "at least n_min devices add their noise share honestly and keep it secret (no collusion with the server)",
    "fresh randomness on each device (no noise seed travels)",
    "idealised continuous Gaussian noise; the quantiser clips a share beyond dp_clip + 10 noise stds "
    "(probability ~1e-23 per coordinate, far below delta)",
    "sample weights and task subsets (from the profiles) are public metadata",
    "covers the score release(s) only; fine-tuning is refused with this mode, evaluation metrics are not "
    "privatised",
)


def distributed_sigma(noise_multiplier: float, num_tasks: int = 1, releases: int = 1) -> float:
    """The one Gaussian mechanism equivalent to a device's `releases` releases of `num_tasks` task vectors:
    ratio z / sqrt(2 k m) (Gaussian mechanisms compose exactly into one)."""
    if noise_multiplier < 0 or num_tasks < 1 or releases < 1:
        raise ValueError(f"need noise_multiplier >= 0, num_tasks >= 1, releases >= 1, got {noise_multiplier}, "
                         f"{num_tasks}, {releases}")
    return noise_multiplier / math.sqrt(2.0 * num_tasks * releases)


@functools.lru_cache(maxsize=256)
def library_epsilon(noise_multiplier: float, count: int, delta: float, accountant: str = "pld") -> float:
    """epsilon at delta of `count` Gaussian mechanisms of noise multiplier (std / L2 sensitivity)
    `noise_multiplier`, composed by Google's dp-accounting: its privacy-loss-distribution accountant
    ('pld': numerically tight, pessimistic by construction) or its RDP accountant ('rdp')."""
    import dp_accounting
    from dp_accounting import pld, rdp

    _check_delta(delta)
    if noise_multiplier <= 0:
        return math.inf
    make = {"pld": pld.PLDAccountant, "rdp": rdp.RdpAccountant}.get(accountant)
    if make is None:
        raise ValueError(f"unknown dp-accounting accountant {accountant!r} (pld or rdp)")
    acc = make()
    acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier), int(count))
    return float(acc.get_epsilon(delta))


def distributed_epsilon(noise_multiplier: float, num_tasks: int, delta: float, releases: int = 1,
                        method: str = "pld") -> float:
    """epsilon at delta of a device holding `num_tasks` tasks after `releases` distributed releases: each
    release is one Gaussian mechanism of multiplier z / sqrt(2) per task vector, k x releases composed.
    'pld' / 'rdp': dp-accounting; 'analytic': the closed form of the equivalent single Gaussian (exact)."""
    sigma = distributed_sigma(noise_multiplier, num_tasks, releases)
    if method == "analytic":
        return analytic_epsilon(sigma, delta)
    if method in ("pld", "rdp"):
        return library_epsilon(float(noise_multiplier) / math.sqrt(2.0), int(num_tasks) * int(releases), float(delta),
                               method)
    raise ValueError(f"unknown accounting method {method!r} (pld, rdp or analytic)")


def distributed_noise_for_epsilon(epsilon: float, num_tasks: int, delta: float, releases: int = 1) -> float:
    """The smallest dp_noise_multiplier z whose `releases` releases spend at most epsilon at delta: the
    closed form (bisection on the analytic Gaussian), then raised until dp-accounting's PLD accountant, the
    one the report states, agrees that epsilon is not exceeded."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"target epsilon must be a finite number > 0, got {epsilon}")
    _check_delta(delta)
    lo, hi = 1e-3, 1.0
    while analytic_epsilon(hi, delta) > epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e7:
            raise ValueError(f"epsilon {epsilon} at delta {delta} needs an absurd noise multiplier")
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if analytic_epsilon(mid, delta) > epsilon else (lo, mid)
    z = hi * math.sqrt(2.0 * num_tasks * releases)
    for _ in range(40):
        if distributed_epsilon(z, num_tasks, delta, releases) <= epsilon:
            return z
        z *= 1.0005
    raise ValueError(f"dp-accounting does not confirm epsilon {epsilon} at delta {delta} near z = {z:.4g}")


def shrink(values: np.ndarray, noise_var: float) -> np.ndarray:
    """Empirical-Bayes shrinkage of one channel group's noisy values towards the group's mean: the
    deviations scaled by max(0, var - noise_var) / var. Uses only the release and the public noise
    variance (post-processing); a group whose differences are within the noise keeps only its mean."""
    v = np.asarray(values, dtype=np.float64)
    var = float(v.var())
    lam = max(0.0, var - noise_var) / var if var > 0 else 0.0
    return v.mean() + lam * (v - v.mean())


def distributed_summary(noise_multiplier: float, clip: float, delta: float, task_counts: Iterable[int],
                        min_devices: int, transform: str, prior_releases: int = 0, released: bool = True) -> dict:
    """The report's `privacy` block in distributed mode: epsilon of the worst device after every release
    counted (this run's, if it took place, and `prior_releases` earlier ones), with its assumptions."""
    counts = [int(k) for k in task_counts if int(k) > 0]
    k = max(counts, default=1)
    releases = prior_releases + (1 if released else 0)
    out: dict = {"mode": "distributed", "delta": delta, "dp_clip": clip, "dp_noise_multiplier": noise_multiplier,
                 "min_devices": min_devices, "transform": transform, "releases": releases,
                 "released_this_run": released, "max_tasks_per_device": k, "mechanism": DISTRIBUTED_MECHANISM,
                 "unit": DISTRIBUTED_UNIT, "sensitivity": "sqrt(2) * dp_clip per task vector (non-negative)",
                 "assumptions": list(DISTRIBUTED_ASSUMPTIONS)}
    if releases == 0:
        out.update({"epsilon": 0.0, "epsilon_analytic": 0.0, "statement": (
            "distributed: the release was aborted before unmasking (fewer devices than min_devices), so no "
            "score sum was revealed and no privacy was spent")})
        return out
    eps = distributed_epsilon(noise_multiplier, k, delta, releases)
    out.update({
        "epsilon": eps,
        "epsilon_analytic": distributed_epsilon(noise_multiplier, k, delta, releases, "analytic"),
        "epsilon_by_tasks": {str(n): distributed_epsilon(noise_multiplier, n, delta, releases)
                             for n in sorted(set(counts))},
        "noise_to_sensitivity": distributed_sigma(noise_multiplier, k, releases),
        "accountant": "dp-accounting's PLD accountant (Google), k x releases Gaussian mechanisms composed; "
                      "epsilon_analytic: the closed form of the equivalent single Gaussian (Balle & Wang 2018)",
        "epsilon_rdp": distributed_epsilon(noise_multiplier, k, delta, releases, "rdp"),
        "statement": (f"distributed DP: the score sums the server unmasked are ({eps:.3g}, {delta:g})-DP with "
                      f"respect to each device's whole local dataset (worst device, {k} task(s), {releases} "
                      f"release(s); noise calibrated for at least {min_devices} devices in the sum; transform "
                      f"{transform}, clip {clip:g}, noise multiplier {noise_multiplier:.4g}). Assumptions: "
                      + "; ".join(DISTRIBUTED_ASSUMPTIONS)),
    })
    return out


def run_privacy(scoring, entries: list[dict]) -> dict:
    """The report's privacy block for a run's [scoring] settings and its device entries (task lists and
    report sources): local/none as `privacy_summary`, distributed as `distributed_summary` (released when
    a device's scores are in a secure sum of this run, or of the run it resumes)."""
    counts = [len(e["tasks"]) for e in entries]
    if scoring.privacy != "distributed":
        return privacy_summary(scoring.clip_norm, scoring.noise_multiplier, scoring.dp_delta, counts,
                               scoring.secure_aggregation)
    in_sum = sum(e.get("report_source") in ("secure-sum", "resumed") for e in entries)
    out = distributed_summary(scoring.dp_noise_multiplier, scoring.dp_clip, scoring.dp_delta, counts,
                              scoring.dp_min_devices, scoring.dp_transform, scoring.dp_prior_releases, in_sum > 0)
    out["devices_in_release"] = in_sum
    if not scoring.dp_min_devices:
        out["min_devices"] = "every device asked to score (dp_min_devices 0)"
    return out


def device_privacy(scoring, num_tasks: int, released: bool = True) -> float | None:
    """epsilon at dp_delta spent by one device with `num_tasks` tasks (None: no noise, so no claim)."""
    if num_tasks < 1:
        return None
    if scoring.privacy == "distributed":
        releases = scoring.dp_prior_releases + (1 if released else 0)
        return distributed_epsilon(scoring.dp_noise_multiplier, num_tasks, scoring.dp_delta, releases) \
            if releases else 0.0
    if scoring.noise_multiplier <= 0 or scoring.clip_norm <= 0:
        return None
    return local_epsilon(scoring.noise_multiplier, num_tasks, scoring.dp_delta)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def privacy_summary(clip_norm: float, noise_multiplier: float, delta: float, task_counts: Iterable[int],
                    secure_aggregation: bool = False) -> dict:
    """The report's `privacy` block: epsilon per device (max over devices) at delta, and how it was
    obtained. Mode 'none' when devices add no noise (clipping alone gives no DP guarantee)."""
    counts = [int(k) for k in task_counts if int(k) > 0]
    out: dict = {"mode": "none", "delta": delta, "clip_norm": clip_norm, "noise_multiplier": noise_multiplier,
                 "epsilon": None, "epsilon_analytic": None, "max_tasks_per_device": max(counts, default=0)}
    if noise_multiplier <= 0 or clip_norm <= 0 or not counts:
        out["statement"] = ("none: devices add no noise to their scores, so no differential-privacy guarantee "
                            "is claimed" + (" (scores are clipped only)" if clip_norm > 0 else ""))
        return out
    k = max(counts)
    eps = local_epsilon(noise_multiplier, k, delta)
    out.update({
        "mode": "local",
        "epsilon": eps,
        "epsilon_analytic": local_epsilon(noise_multiplier, k, delta, "analytic"),
        "epsilon_by_tasks": {str(n): local_epsilon(noise_multiplier, n, delta) for n in sorted(set(counts))},
        "accountant": "RDP of the Gaussian mechanism (Mironov 2017), converted as in Balle et al. 2020; "
                      "epsilon_analytic: the exact analytic Gaussian mechanism (Balle & Wang 2018)",
        "mechanism": MECHANISM,
        "unit": UNIT,
        "sensitivity": SENSITIVITY,
        "noise_to_sensitivity": sigma_of(noise_multiplier, k),
        "assumptions": list(ASSUMPTIONS),
        "statement": (f"each device's scores are ({eps:.3g}, {delta:g})-DP with respect to its whole local "
                      f"dataset (user-level local DP; worst device, {k} task(s))"),
    })
    if secure_aggregation:
        out["secure_aggregation"] = ("the server holds only per-task sums, a post-processing of the devices' "
                                     "noisy reports: the same local guarantee holds; no central (distributed) "
                                     "noise reduction is claimed")
    return out


__all__ = [
    "ASSUMPTIONS",
    "DISTRIBUTED_ASSUMPTIONS",
    "distributed_epsilon",
    "distributed_noise_for_epsilon",
    "distributed_sigma",
    "distributed_summary",
    "library_epsilon",
    "device_privacy",
    "run_privacy",
    "shrink",
    "MECHANISM",
    "SENSITIVITY",
    "UNIT",
    "analytic_delta",
    "analytic_epsilon",
    "central_epsilon",
    "gaussian_rdp",
    "local_epsilon",
    "noise_for_epsilon",
    "privacy_summary",
    "rdp_epsilon",
    "rdp_to_epsilon",
    "sigma_of",
]
