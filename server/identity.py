"""Who a device is: the node Flower authenticated, not the device id it declares.

Flower tells the ServerApp two things about each node (`Grid.get_nodes()`): its node id and the public key
it registered with. Under SuperNode authentication (`--enable-supernode-auth`) that key was registered by
the operator (`flwr supernode register KEY.pub`) and the SuperNode proves it holds the private key, so the
key is the device's identity; Flower maps each key to one node id. Without authentication a SuperNode
makes a fresh key pair every time it starts, and in simulation Flower registers random bytes as the key:
then there is no identity that outlives the process, and the key is reported as "" (none).

The device id in a TaskProfile is a label the device chooses. The server checks it, in this order:

1. pinned (`[identity] pinned_ids = {"dev-a" = "SHA256:..." or "<node id>"}`): only the node holding that
   key (or with that node id) may claim the id, and a pinned node may claim no other id;
2. bound by a previous run of the same run directory (a resumed run): an id first held by a node with a key
   may be claimed again only by the node with that key (server.rundir keeps the bindings);
3. unique: the first node to claim an id keeps it; a later claim of the same id is refused, and the earlier
   device is never evicted.

A refused claim excludes the newcomer with the reason; the device it tried to impersonate goes on.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping

log = logging.getLogger("cutfl.server")

FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")  # OpenSSH's: `ssh-keygen -lf KEY.pub` prints it


def key_fingerprint(public_key: bytes | str) -> str:
    """The OpenSSH SHA256 fingerprint of a public key given as PEM (what Flower stores) or OpenSSH text
    (a KEY.pub file); "" when it is neither (simulation registers random bytes)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = public_key.encode() if isinstance(public_key, str) else bytes(public_key)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
        text = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
        return ""
    blob = base64.b64decode(text.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def node_keys(grid) -> dict[int, str]:
    """Node id -> fingerprint of the key Flower registered for it ("" when it has none), from the Grid."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {}
    try:
        nodes = list(get_nodes())
    except Exception as e:  # noqa: BLE001 - an older or fake Grid: no keys, pins by key then refuse
        log.warning("cannot read node keys from the grid (%s): key pins and bindings cannot be met", e)
        return {}
    return {int(n.node_id): key_fingerprint(getattr(n, "public_key", b"") or b"") for n in nodes}


def check_pin(value: str) -> str:
    """A pin's value is a key fingerprint or a node id; returns it, or raises ValueError saying what is allowed."""
    if FINGERPRINT.match(value) or (value.isdigit() and value.isascii() and int(value) > 0):
        return value
    raise ValueError(f"{value!r} is neither a key fingerprint (SHA256:<43 base64 characters>, as "
                     f"`ssh-keygen -lf KEY.pub` prints it) nor a node id (a positive integer, as a string)")


class Identities:
    """The profile phase's check of declared device ids against pins, earlier bindings and each other."""

    def __init__(self, pinned: Mapping[str, str], bound: Mapping[str, str], keys: Mapping[int, str]) -> None:
        self.pinned = dict(pinned)
        self.bound = {device: key for device, key in bound.items() if key}  # device id -> key that held it
        self.keys = dict(keys)
        self.taken: dict[str, int] = {}  # device id -> node id that holds it in this run

    def _node(self, node_id: int) -> str:
        return f"node {node_id} (key {self.keys.get(node_id) or 'none'})"

    @staticmethod
    def _owns(pin: str, node_id: int, key: str) -> bool:
        return key == pin if pin.startswith("SHA256:") else str(node_id) == pin

    def problem(self, device_id: str, node_id: int) -> str:
        """Why `node_id` may not be `device_id` ("" when it may)."""
        key = self.keys.get(node_id, "")
        pin = self.pinned.get(device_id)
        if pin is not None and not self._owns(pin, node_id, key):
            owner = pin if pin.startswith("SHA256:") else f"node {pin}"
            return f"device id {device_id!r} is pinned to {owner}; this is {self._node(node_id)}"
        for other, other_pin in self.pinned.items():
            if other != device_id and self._owns(other_pin, node_id, key):
                return f"{self._node(node_id)} is pinned to device id {other!r} and claims {device_id!r}"
        held = self.bound.get(device_id)
        if pin is None and held and held != key:
            return (f"device id {device_id!r} was held by the node with key {held} before the restart; this is "
                    f"{self._node(node_id)}")
        if device_id in self.taken:
            return f"device id {device_id!r} is already taken by node {self.taken[device_id]}, which keeps it"
        return ""

    def accept(self, device_id: str, node_id: int) -> None:
        self.taken[device_id] = node_id

    def bindings(self, accepted: Iterable[tuple[str, int]]) -> dict[str, str]:
        """device id -> key for the devices accepted now, on top of the earlier bindings (kept for the next resume)."""
        out = dict(self.bound)
        out.update({device: self.keys[node] for device, node in accepted if self.keys.get(node)})
        return out


__all__ = ["FINGERPRINT", "Identities", "check_pin", "key_fingerprint", "node_keys"]
