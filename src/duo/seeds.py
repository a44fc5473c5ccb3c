"""Seeds derived from a base seed and names, so that runs with different base seeds never share draws.

`base + i` makes target i of seed 1 the target i + 1 of seed 0: three "independent" seeds would share two
thirds of their images. A hash of (base, names...) gives every (run seed, role, index) its own stream.
"""

from __future__ import annotations

import hashlib


def derive_seed(base: int, *names: object) -> int:
    """A 63-bit seed that is a function of the base seed and the names (their str, in order) alone."""
    text = "/".join(str(x) for x in (base, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
