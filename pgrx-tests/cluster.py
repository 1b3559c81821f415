"""A throwaway Postgres cluster with pg_queue preloaded, for the real-cluster suites.

initdb/postgres refuse to run as root, so when we are root every server command runs as
the `postgres` user (runuser). The cluster listens only on a Unix socket in its own data
directory.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time

import psycopg

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


def _as_postgres(cmd):
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


class Cluster:
    def __init__(self, settings=None, base="/var/tmp"):
        self.dir = tempfile.mkdtemp(prefix="pg_queue-", dir=base)
        self.data = os.path.join(self.dir, "data")
        self.port = 5433 + os.getpid() % 1000
        self.settings = {
            "shared_preload_libraries": "'pg_queue'",
            "queue.databases": "'postgres'",  # other databases the tests create are not served
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.dir}'",
            "port": str(self.port),
            "max_worker_processes": "16",
            "fsync": "off",  # crash tests kill processes, not the machine
            "log_line_prefix": "'%m [%p] %b: '",
            "queue.max_workers": "2",
            "queue.maintenance_interval": "'200ms'",
        }
        self.settings.update(settings or {})
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            _as_postgres([f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres",
                          "--auth=trust", "--no-sync", "--locale=C.UTF-8", "-E", "UTF8"]),
            check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")
        self.log = os.path.join(self.dir, "server.log")

    def pg_ctl(self, *args, check=True):
        return subprocess.run(
            _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", self.log, *args]),
            check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def start(self):
        self.pg_ctl("-w", "-t", "60", "start")
        self.wait_ready()

    def stop(self, mode="fast", timeout=60):
        return self.pg_ctl("-w", "-t", str(timeout), "-m", mode, "stop", check=False)

    def restart(self):
        self.stop()
        self.start()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect() as c:
                    c.execute("SELECT 1")
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def dsn(self, dbname="postgres", user="postgres"):
        return f"host={self.dir} port={self.port} dbname={dbname} user={user}"

    def connect(self, autocommit=True, dbname="postgres", user="postgres"):
        return psycopg.connect(host=self.dir, port=self.port, dbname=dbname, user=user,
                               autocommit=autocommit)

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    def kill9(self, pid):
        os.kill(pid, signal.SIGKILL)

    def log_text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def destroy(self):
        self.stop(mode="immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
