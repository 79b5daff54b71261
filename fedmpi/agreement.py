"""Every rank runs the same federation: the same configuration and the same fedmpi code. Each rank parses the
configuration from its own node's file system and imports fedmpi from its own installation, so a node with an
older jobs/ file or another install trains something else: a model of another width failed only at the first
decode ('buffer holds a vector of length 184625, expected 737633'), a learning rate of its own not at all.
Rank 0 sends its configuration and code digest as JSON text (never pickle); each learner names what differs,
and every rank stops together, exit 2, before the cohort is built or a data file is read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import Config, setting_changes
from .errors import PayloadError
from .messages import brief, row_text, text_row
from .preflight import ERROR_BYTES, say
from .provenance import code_digest

# The most a configuration's JSON may take on the wire: a few kB in practice (paths up to PATH_MAX included); a
# header announcing more is refused before a learner allocates it.
MAX_CONFIG_BYTES = 1 << 20
SHOWN = 3  # differing settings named in one rank's line; the rest are counted
# Settings a node may hold its own value of where rank 0 gives one too: a job may stage the split to each node's
# local disk, under a path of its own (each rank reads only its own file there; the preflight compares it with rank
# 0's copy where rank 0 holds one, the run records every file's digest, and a resume checks them). An empty
# data.dir is another thing: the synthetic cohort, which rank 0 builds first.
NODE_SETTINGS = (("data", "dir"),)


def statement(cfg: Config, code: str) -> bytes:
    """What rank 0 sends: its resolved configuration and its code digest."""
    return json.dumps({"config": cfg.to_dict(), "code": code}, sort_keys=True).encode()


def disagreement(server: bytes, cfg: Config, code: str) -> str:
    """How this rank differs from rank 0's statement, in one line; empty when it does not."""
    try:
        theirs = json.loads(server)
        ok = isinstance(theirs, dict) and isinstance(theirs.get("config"), dict)
    except (ValueError, RecursionError):  # not UTF-8 nor JSON, an integer of over 4300 digits; nested too deep
        ok = False
    if not ok:
        return "rank 0's configuration arrived as no JSON object of a configuration and a code digest"
    # What to do comes before the settings, whose values may run long: rank 0 prints the line as cut to ERROR_BYTES.
    problems = []
    if theirs.get("code") != code:
        problems.append(
            f"its fedmpi code differs from rank 0's (source digest {code[:12]} of {Path(__file__).parent}, rank 0's "
            f"{str(theirs.get('code'))[:12]}): install the same fedmpi on every node"
        )
    mine = cfg.to_dict()
    changes = setting_changes(_shared(theirs["config"], mine), _shared(mine, theirs["config"]), shown=brief)
    if changes:
        more = f"; and {len(changes) - SHOWN} more" if len(changes) > SHOWN else ""
        problems.append(
            "its configuration differs from rank 0's; every node must read the same configuration file and --set "
            f"options (rank 0's -> its own: {'; '.join(changes[:SHOWN])}{more})"
        )
    return "; ".join(problems)


def _shared(config: dict, other: dict) -> dict:
    """`config` without the NODE_SETTINGS that both it and `other` set."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    for section, name in NODE_SETTINGS:
        if all(isinstance(c.get(section), dict) and c[section].get(name) for c in (config, other)):
            out[section].pop(name)
    return out


def agree(cfg: Config, wire) -> bool:
    """Rank 0's statement to every rank, each rank's disagreement back; rank 0 prints each (one line a rank) and
    every rank returns False together when any rank differs."""
    code = code_digest()
    said = np.frombuffer(statement(cfg, code), np.uint8) if wire.is_server else np.zeros(0, np.uint8)
    size = wire.bcast(np.array([said.size], np.int64), "rank 0's configuration")
    if not wire.is_server:
        if not 0 < size[0] <= MAX_CONFIG_BYTES:
            raise PayloadError(f"rank 0 announced a configuration of {int(size[0])} bytes: not 1..{MAX_CONFIG_BYTES}")
        said = np.zeros(int(size[0]), np.uint8)
    said = wire.bcast(said, "rank 0's configuration")
    problem = "" if wire.is_server else disagreement(said.tobytes(), cfg, code)
    texts = np.zeros((wire.size, ERROR_BYTES), np.uint8)
    wire.gather(
        text_row(f"rank {wire.rank}: {problem}" if problem else "", ERROR_BYTES),
        texts if wire.is_server else None,
        "the agreement",
    )
    problems = [t for t in map(row_text, texts) if t] if wire.is_server else []
    verdict = wire.bcast(np.array([len(problems)], np.int64), "the agreement's verdict")
    for p in problems:
        say(wire.rank, p)
    return not verdict[0]
