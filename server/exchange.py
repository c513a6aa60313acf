"""One phase of the federation: send each device its message, collect the replies, show progress.

Like `Grid.send_and_receive`, but (1) every message has its own deadline, so a late device is cut off
without holding up the others, (2) at most `max_in_flight` messages wait at once (a 1000-device delivery
does not stage 1000 models in memory), (3) a device that does not answer in time or answers with an
error is excluded in the ledger with the reason, and (4) the payload bytes each way are counted per device.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from cut.progress import progress_bar
from protocol.records import content_nbytes
from server.ledger import FAILED, Ledger

POLL_SECONDS = 0.1


def exchange(
    grid: Grid,
    ledger: Ledger,
    phase: str,
    message_type: str,
    contents: Mapping[int, RecordDict],
    timeout: float,
    max_in_flight: int = 256,
) -> dict[int, Message]:
    """node id -> its (non-error) reply. Devices that time out or reply with an error are excluded."""
    pending = list(contents.items())
    pending.reverse()  # pop() from the end keeps the original order
    in_flight: dict[str, tuple[int, float]] = {}  # message id -> (node id, deadline)
    replies: dict[int, Message] = {}
    # Every device's answer (or its exclusion) advances the bar as it happens; off a terminal (a log, `flwr log`)
    # one line per device up to 20 devices, then one per 5%.
    with progress_bar(phase, total=len(contents), plain_lines=20) as advance:
        done = 0
        while pending or in_flight:
            _push_some(grid, ledger, phase, message_type, pending, in_flight, timeout, max_in_flight)
            for reply in grid.pull_messages(list(in_flight)):
                node_id, _ = in_flight.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                if node_id is None:
                    continue
                _accept(ledger, phase, node_id, reply, replies)
                done += 1
                advance(1, _tally(done, replies))
            now = time.monotonic()
            for mid, (node_id, deadline) in list(in_flight.items()):
                if now > deadline:
                    del in_flight[mid]
                    ledger.exclude(node_id, FAILED, phase, f"no reply within {timeout:g} s")
                    done += 1
                    advance(1, _tally(done, replies))
            if in_flight:
                time.sleep(POLL_SECONDS)
    return replies


def _tally(done: int, replies: Mapping[int, Message]) -> str:
    """What the devices done so far came to: 'answered 7, excluded 1' (answers are validated afterwards)."""
    return f"answered {len(replies)}, excluded {done - len(replies)}"


def _push_some(grid, ledger, phase, message_type, pending, in_flight, timeout, max_in_flight) -> None:
    batch = []
    while pending and len(in_flight) + len(batch) < max_in_flight:
        node_id, content = pending.pop()
        ledger.records[node_id].bytes_down += content_nbytes(content)
        msg = Message(content, dst_node_id=node_id, message_type=message_type, group_id=phase,
                      ttl=timeout + 60.0)
        batch.append((node_id, msg))
    if not batch:
        return
    pushed = set(grid.push_messages([m for _, m in batch]))
    deadline = time.monotonic() + timeout
    for node_id, msg in batch:
        mid = msg.metadata.message_id
        if mid and mid in pushed:
            in_flight[mid] = (node_id, deadline)
        else:
            ledger.exclude(node_id, FAILED, phase, "the message could not be sent")


def _accept(ledger: Ledger, phase: str, node_id: int, reply: Message, replies: dict[int, Message]) -> None:
    if reply.has_error():
        reason = (reply.error.reason or f"error code {reply.error.code}").strip().splitlines()
        ledger.exclude(node_id, FAILED, phase, f"device error: {reason[-1] if reason else ''}"[:500])
        return
    ledger.records[node_id].bytes_up += content_nbytes(reply.content)
    replies[node_id] = reply


SIMULATION_SETTLE_SECONDS = 5.0


class TooFewSuperNodes(RuntimeError):
    """A simulation has fewer SuperNodes than the scenario has devices (they will never register)."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once `expected` nodes registered, or whatever registered when `timeout` runs out.

    On Flower's simulation engine (an in-memory grid) every simulated SuperNode exists before the ServerApp
    starts: fewer than `expected` after a few seconds is a configuration error, raised at once instead of
    waiting out `timeout` (`flwr run` simulates 2 SuperNodes unless told otherwise)."""
    start = time.monotonic()
    deadline = start + timeout
    simulated = type(grid).__name__ == "InMemoryGrid"
    with progress_bar("waiting for devices", total=expected) as advance:
        seen = 0
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) > seen:
                advance(min(len(nodes), expected) - seen, "")
                seen = min(len(nodes), expected)
            if len(nodes) >= expected or time.monotonic() > deadline:
                return nodes
            if simulated and time.monotonic() - start > SIMULATION_SETTLE_SECONDS:
                raise TooFewSuperNodes(
                    f"the simulation has {len(nodes)} SuperNodes but the scenario expects {expected} devices: run "
                    f"`flwr run . --federation-config \"num-supernodes={expected}\"`, or `cutfl run local` (sets it), "
                    f"or set the run config's devices = {len(nodes)}")
            time.sleep(0.5)


__all__ = ["TooFewSuperNodes", "exchange", "wait_for_nodes"]
