#!/usr/bin/env python3
"""OpenStack TaskFlow as metalgraph's benchmark peer.

Runs the same two shapes the Rust harness (benches/harness) runs on metalgraph, with
TaskFlow's persistence on (its SQLAlchemy backend on a SQLite file), and prints one JSON
object with the timings on stdout:

- chain: one linear flow of N no-op tasks;
- fan-out: M flows, each a graph of 10 no-op tasks shaped 1 -> 8 -> 1.

Every flow gets its own logbook entry (`FlowDetail`) in the SQLite backend, so TaskFlow
persists every atom's state change (PENDING, RUNNING, SUCCESS) as it happens, which is the
durability metalgraph gives by committing every transition.

Usage: taskflow_peer.py --dir DIR [--chain N] [--fanout-flows M] [--fanout-width 8]
"""

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import time

from taskflow import engines, task
from taskflow.patterns import graph_flow, linear_flow
from taskflow.persistence import backends, models

try:
    from importlib.metadata import version as _version
except ImportError:  # pragma: no cover - Python < 3.8 is not supported anyway.
    _version = None


class Noop(task.Task):
    """Does nothing and succeeds, like metalgraph's `noop` job."""

    def execute(self):
        return None


def open_backend(path):
    """Opens TaskFlow's SQLAlchemy persistence on a SQLite file and creates its tables."""
    backend = backends.fetch({"connection": "sqlite:///" + path})
    with contextlib.closing(backend.get_connection()) as conn:
        conn.upgrade()
    return backend


def new_flow_detail(backend, name):
    """Saves a new logbook with one flow detail, as a TaskFlow service does per flow."""
    book = models.LogBook(name)
    detail = models.FlowDetail(name, uuid=_uuid())
    book.add(detail)
    with contextlib.closing(backend.get_connection()) as conn:
        conn.save_logbook(book)
    return book, detail


def _uuid():
    import uuid

    return str(uuid.uuid4())


def run_flow(backend, flow, name, engine_kind):
    book, detail = new_flow_detail(backend, name)
    eng = engines.load(
        flow, flow_detail=detail, book=book, backend=backend, engine=engine_kind
    )
    eng.run()
    state = eng.storage.get_flow_state()
    if str(state) != "SUCCESS":
        raise SystemExit(f"flow {name} ended {state}, not SUCCESS")


def chain(backend, n):
    flow = linear_flow.Flow("chain")
    flow.add(*[Noop(name=f"t{i:05d}") for i in range(n)])
    start = time.perf_counter()
    run_flow(backend, flow, "chain", "serial")
    return time.perf_counter() - start


def fanout_flow(i, width):
    """A graph flow of 1 -> width parallel -> 1 no-op tasks, linked explicitly."""
    flow = graph_flow.Flow(f"fan-{i}")
    first = Noop(name="first")
    last = Noop(name="last")
    middle = [Noop(name=f"mid{j}") for j in range(width)]
    flow.add(first, last, *middle)
    for m in middle:
        flow.link(first, m)
        flow.link(m, last)
    return flow


def fanout(backend, flows, width, engine_kind):
    start = time.perf_counter()
    for i in range(flows):
        run_flow(backend, fanout_flow(i, width), f"fan-{i}", engine_kind)
    return time.perf_counter() - start


def sqlite_settings(path):
    """The SQLite journal mode and synchronous level the peer's database runs with."""
    con = sqlite3.connect(path)
    try:
        mode = con.execute("PRAGMA journal_mode").fetchone()[0]
        sync = con.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        con.close()
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return mode, names.get(sync, str(sync))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="where the SQLite files go")
    ap.add_argument("--chain", type=int, default=1000)
    ap.add_argument("--fanout-flows", type=int, default=100)
    ap.add_argument("--fanout-width", type=int, default=8)
    ap.add_argument(
        "--fanout-engine",
        default="serial",
        choices=["serial", "parallel"],
        help="TaskFlow engine for the fan-out flows",
    )
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    out = {
        "taskflow": _version("taskflow") if _version else "unknown",
        "sqlalchemy": _version("SQLAlchemy") if _version else "unknown",
        "python": sys.version.split()[0],
    }
    if args.chain > 0:
        db = os.path.join(args.dir, "chain.sqlite")
        backend = open_backend(db)
        out["chain_tasks"] = args.chain
        out["chain_wall_s"] = chain(backend, args.chain)
        out["sqlite_journal_mode"], out["sqlite_synchronous"] = sqlite_settings(db)
    if args.fanout_flows > 0:
        db = os.path.join(args.dir, "fanout.sqlite")
        backend = open_backend(db)
        out["fanout_flows"] = args.fanout_flows
        out["fanout_tasks"] = args.fanout_flows * (args.fanout_width + 2)
        out["fanout_engine"] = args.fanout_engine
        out["fanout_wall_s"] = fanout(
            backend, args.fanout_flows, args.fanout_width, args.fanout_engine
        )
        if "sqlite_journal_mode" not in out:
            out["sqlite_journal_mode"], out["sqlite_synchronous"] = sqlite_settings(db)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
