"""PostgreSQL and Ray for the tests that need them (started by ``.ci/services.sh``).

``VEILFACE_TEST_PG_DSN``: a PostgreSQL database the tests may create schemas in;
``VEILFACE_TEST_RAY_ADDRESS``: the GCS address of a running Ray cluster (``HOST:PORT``),
``VEILFACE_TEST_RAY_NODE_IP``: the node address a driver on this machine attaches to, and
``VEILFACE_TEST_RAY_WORKER``: ``PGID`` of a second, killable Ray node (process group).
Where they are absent the tests skip with a printed reason; with
``VEILFACE_TEST_REQUIRE_SERVICES=1`` (CI) they fail instead, so CI cannot silently skip them.
"""
from __future__ import annotations

import os
import secrets

import pytest

PG_ENV, RAY_ENV, RAY_NODE_ENV, RAY_WORKER_ENV = ("VEILFACE_TEST_PG_DSN", "VEILFACE_TEST_RAY_ADDRESS",
                                                 "VEILFACE_TEST_RAY_NODE_IP", "VEILFACE_TEST_RAY_WORKER")


def _missing(what: str) -> None:
    msg = f"{what} (run the tests through .ci/run, or start the services with .ci/services.sh)"
    if os.environ.get("VEILFACE_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail("required service missing: " + msg)
    pytest.skip(msg)


def pg_dsn() -> str:
    """The admin DSN of the test PostgreSQL (skips / fails when there is none or it is down)."""
    dsn = os.environ.get(PG_ENV, "")
    if not dsn:
        _missing(f"no PostgreSQL: ${PG_ENV} is not set")
    try:
        import psycopg
    except ImportError:
        _missing("psycopg is not installed (pip install -e '.[scale]')")
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        _missing(f"PostgreSQL at ${PG_ENV} is not reachable: {str(exc).strip()[:200]}")
    return dsn


def ray_worker_pgid() -> int:
    """The process group of the second, killable Ray node (skips / fails without one). The failure test that kills it
    starts a new one and writes its id to ``$VF_SVC_DIR/ray-worker.pgid``, so that file (when
    there) is newer than ``$VEILFACE_TEST_RAY_WORKER``, which a shell exported once at start. A
    group that no longer runs counts as none (killing it would kill nothing, and the restart
    would add a second node at the worker's address)."""
    svc = os.environ.get("VF_SVC_DIR", "")
    path = os.path.join(svc, "ray-worker.pgid") if svc else ""
    text = ""
    if path and os.path.exists(path):
        with open(path) as f:
            text = f.read().strip()
    text = text or os.environ.get(RAY_WORKER_ENV, "")
    try:
        pgid = int(text or 0)
        if pgid > 0:
            os.kill(pgid, 0)
            return pgid
    except (ValueError, ProcessLookupError, PermissionError):
        pass
    _missing(f"no running second Ray node to kill (${RAY_WORKER_ENV} / $VF_SVC_DIR/ray-worker.pgid: {text!r})")
    return 0


def fresh_schema(dsn: str | None = None) -> tuple[str, str]:
    """A new empty schema in the test database: (DSN whose search_path is that schema, schema name)."""
    from urllib.parse import quote

    import psycopg
    dsn = dsn or pg_dsn()
    name = "vf_" + secrets.token_hex(6)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-c search_path={name}')}", name


def drop_schema(name: str, dsn: str | None = None) -> None:
    import psycopg
    with psycopg.connect(dsn or pg_dsn(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def postgres_store(tmp_path, clock):
    """An empty PostgreSQL store in a schema of its own, dropped when the store is closed."""
    from engine.service.store.postgres import PostgresStore
    dsn, name = fresh_schema()
    store = PostgresStore(dsn, clock, max_size=8)
    close = store.close

    def close_and_drop() -> None:
        close()
        drop_schema(name)
    store.close = close_and_drop
    return store


def ray_address() -> tuple[str, str]:
    """(GCS address, node IP) of the test Ray cluster (skips / fails when there is none)."""
    addr = os.environ.get(RAY_ENV, "")
    if not addr:
        _missing(f"no Ray cluster: ${RAY_ENV} is not set")
    try:
        import ray  # noqa: F401
    except ImportError:
        _missing("ray is not installed (pip install -e '.[scale]')")
    return addr, os.environ.get(RAY_NODE_ENV, "")


# pg2: a short-lived Ray driver (the test process itself stays out of Ray) ---------------------------------
def ray_driver(addr: str, node_ip: str, ns: str, body: str, shards: int = 0, timeout: float = 300.0) -> str:
    """Run the Python ``body`` in a fresh driver attached to namespace ``ns`` (``ray`` and ``sys`` are
    imported; ``shard(i)`` is the handle of gallery shard ``i`` of ``shards``); returns its stdout."""
    import subprocess
    import sys
    code = ("import ray, sys\n"
            "ray.init(address=sys.argv[1], namespace=sys.argv[3], logging_level='ERROR', log_to_driver=False, "
            "**({'_node_ip_address': sys.argv[2]} if sys.argv[2] else {}))\n"
            f"def shard(i): return ray.get_actor(f'veilface-shard-{{i}}-of-{shards}', namespace=sys.argv[3])\n" + body)
    out = subprocess.run([sys.executable, "-c", code, addr, node_ip, ns], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"ray driver failed: {out.stderr[-2000:]}")
    return out.stdout


def shard_places(addr: str, node_ip: str, ns: str, shards: int) -> dict[int, tuple[int, str]]:
    """{shard: (process id, node address)} of a deployment's gallery shards."""
    import json
    out = ray_driver(addr, node_ip, ns, "import json\n"
                     f"print(json.dumps([ray.get(shard(i).ping.remote()) for i in range({shards})]))\n", shards)
    return {int(s): (int(pid), str(ip)) for s, _, pid, ip in json.loads(out.strip().splitlines()[-1])}


def remove_namespace(addr: str, node_ip: str, ns: str) -> None:
    """Kill the named actors (gallery shards, intrusion detector) and remove the placement groups of
    a deployment's Ray namespace: they are detached, so they outlive the replicas by design."""
    try:
        ray_driver(addr, node_ip, ns, (
            "from ray.util.placement_group import get_placement_group, placement_group_table, "
            "remove_placement_group\n"
            "for a in ray.util.list_named_actors(all_namespaces=True):\n"
            "    if a['namespace'] == sys.argv[3]:\n"
            "        ray.kill(ray.get_actor(a['name'], namespace=a['namespace']))\n"
            "for t in placement_group_table().values():\n"
            "    if t.get('name', '').startswith('veilface-shards-') and t.get('state') != 'REMOVED':\n"
            "        try:\n"
            "            remove_placement_group(get_placement_group(t['name']))\n"
            "        except ValueError:\n"
            "            pass\n"), timeout=120)
    except (RuntimeError, OSError):
        pass


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and every process descended from it, at once (a Ray node: ``ray start``, its
    raylet and the raylet's workers, which run in sessions of their own, so killing the node's
    process group would leave its actors running). Returns how many processes were signalled."""
    import signal
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [int(pid)]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += kids.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(tree)
