"""Admin-side tool for a running pFedSAM FLARE deployment (POC or production).

Talks to the FLARE server through the FLARE API with an admin's startup kit (mutual TLS)::

    python -m pfedsam.flare.admin submit JOB --startup-kit KIT [--username NAME] [--timeout S] [--download DIR]
    python -m pfedsam.flare.admin abort JOB_ID --startup-kit KIT
    python -m pfedsam.flare.admin status --startup-kit KIT
    python -m pfedsam.flare.admin list --startup-kit KIT
    python -m pfedsam.flare.admin download JOB_ID --startup-kit KIT --download DIR
    python -m pfedsam.flare.admin wait-ready --clients site-1,site-2 --startup-kit KIT [--timeout S]
    python -m pfedsam.flare.admin shutdown --startup-kit KIT       # aborts running jobs first
    python -m pfedsam.flare.admin report PATH                      # table from report.json (no server)

``--startup-kit`` defaults to ``$PFEDSAM_ADMIN_KIT``; ``--username`` to ``$PFEDSAM_ADMIN_USER``, else
the kit folder's name (provisioning names an admin's kit folder after the admin).

``submit`` prints one line per status change (and the training round, read from the server's
job log), downloads the finished job into ``--download`` (default ``./results``), prints the
per-site table from the server's ``report.json`` and exits 0 only for FINISHED:COMPLETED.

Exit codes: 0 ok, 1 the job ended in another state, 2 usage / bad input, 3 cannot reach or log
in to the server, 4 timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_TIMEOUT = 4

COMPLETED = "FINISHED:COMPLETED"
REPORT_NAME = "report.json"
_ROUND_RE = re.compile(r"Round (\d+) started")


class AdminError(Exception):
    """A failure with a message meant for the user and the exit code to end with."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# report.json -> table (no nvflare needed)
# ------------------------------------------------------------------------------------------------


def find_report(path: str | os.PathLike) -> Path | None:
    """``report.json`` at ``path`` (a file, a downloaded job folder or a run folder), else None.

    A downloaded job holds the server's run folder in ``<job>/workspace/``; the report the server
    wrote there (or in its ``app_server/``) is the shallowest one.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        return None
    found = sorted(p.rglob(REPORT_NAME), key=lambda f: (len(f.parts), str(f)))
    return found[0] if found else None


def _fmt(v, digits: int) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    if v != v:  # NaN
        return "nan"
    return f"{v:.{digits}f}"


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def format_report_table(report: dict) -> str:
    """The per-site table of a report: personalized and global Dice / HD95, and the mean row.

    Sites whose final entry carries an ``error`` instead of metrics are listed with it and left out
    of the mean.
    """
    final = report.get("final") if isinstance(report, dict) else None
    if not isinstance(final, dict) or not final:
        return "report.json has no 'final' per-site results"
    cols = [("personalized", "dice"), ("personalized", "hd95"), ("global", "dice"), ("global", "hd95")]
    head = ["site", "pers. Dice", "pers. HD95", "global Dice", "global HD95"]
    rows, notes, sums = [], [], {c: [] for c in cols}
    for site in sorted(final):
        entry = final[site] if isinstance(final[site], dict) else {}
        row = [site]
        for kind, metric in cols:
            part = entry.get(kind)
            v = part.get(metric) if isinstance(part, dict) else None
            if _num(v) is not None:
                sums[(kind, metric)].append(_num(v))
            row.append(_fmt(v, 4 if metric == "dice" else 2))
        rows.append(row)
        if entry.get("error"):
            notes.append(f"{site}: {entry['error']}")
    if len(rows) > 1:
        mean = ["mean"]
        for kind, metric in cols:
            vals = sums[(kind, metric)]
            mean.append(_fmt(sum(vals) / len(vals), 4 if metric == "dice" else 2) if vals else "-")
        rows.append(mean)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    rounds = report.get("rounds")
    if isinstance(rounds, list):
        out.append(f"({len(rounds)} round(s) in report)")
    out += [f"error at {n}" for n in notes]
    return "\n".join(out)


def report_errors(report: dict) -> list[str]:
    """Sites whose final entry is an error or has no Dice at all (empty list = every site reported)."""
    final = report.get("final") if isinstance(report, dict) else None
    if not isinstance(final, dict):
        return ["no final results"]
    bad = []
    for site, entry in sorted(final.items()):
        entry = entry if isinstance(entry, dict) else {}
        has = any(isinstance(entry.get(k), dict) and "dice" in entry[k] for k in ("personalized", "global"))
        if entry.get("error") or not has:
            bad.append(f"{site}: {entry.get('error') or 'no metrics'}")
    return bad


def print_report(path: str | os.PathLike) -> bool:
    """Print the table of the report under ``path``; say so (and return False) when there is none."""
    rep = find_report(path)
    if rep is None:
        print(f"no {REPORT_NAME} under {path}: the job wrote no report (or it did not get that far)")
        return False
    try:
        report = json.loads(rep.read_text())
    except (OSError, ValueError) as e:
        print(f"{rep}: unreadable report ({e})")
        return False
    print(f"per-site results ({rep}):")
    print(format_report_table(report))
    return True


# ------------------------------------------------------------------------------------------------
# FLARE API
# ------------------------------------------------------------------------------------------------


def _admin_endpoint(kit: Path) -> str:
    try:
        cfg = json.loads((kit / "startup" / "fed_admin.json").read_text())["admin"]
        return f"{cfg.get('host')}:{cfg.get('port')}"
    except Exception:
        return "?"


def resolve_kit(startup_kit: str | None, username: str | None) -> tuple[Path, str]:
    """The admin startup kit folder and user name, checked; AdminError when unusable."""
    kit_s = startup_kit or os.environ.get("PFEDSAM_ADMIN_KIT")
    if not kit_s:
        raise AdminError("no admin startup kit: pass --startup-kit KIT (or set PFEDSAM_ADMIN_KIT)")
    kit = Path(kit_s).expanduser().resolve()
    if kit.name == "startup" and (kit / "fed_admin.json").is_file():
        kit = kit.parent
    if not (kit / "startup" / "fed_admin.json").is_file():
        raise AdminError(f"{kit} is not an admin startup kit (no startup/fed_admin.json); use the folder the "
                         f"provisioning wrote for the admin (it holds startup/fl_admin.sh)")
    user = username or os.environ.get("PFEDSAM_ADMIN_USER") or kit.name
    return kit, user


def connect(startup_kit: str | None, username: str | None, timeout: float = 10.0):
    """A logged-in FLARE API session; AdminError (exit 3) with the reason when that fails."""
    kit, user = resolve_kit(startup_kit, username)
    try:
        from nvflare.fuel.flare_api.api_spec import AuthenticationError, AuthorizationError, NoConnection
        from nvflare.fuel.flare_api.flare_api import new_secure_session
    except ImportError as e:
        raise AdminError(f"nvflare is not installed in this Python ({sys.executable}): {e}; "
                         f"pip install nvflare==2.9.0") from e
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # FLARE prints "Connecting to FLARE ..." each time
            return new_secure_session(user, str(kit), timeout=timeout)
    except NoConnection as e:
        raise AdminError(f"cannot reach the FLARE server at {_admin_endpoint(kit)} (admin kit {kit}) within "
                         f"{timeout:g} s: {e}. Is the server running?", EXIT_CONNECT) from e
    except (AuthenticationError, AuthorizationError) as e:
        raise AdminError(f"server at {_admin_endpoint(kit)} refused admin '{user}' (kit {kit}): {e}. The user "
                         f"name must be the one the kit was provisioned for", EXIT_CONNECT) from e
    except Exception as e:  # config errors, TLS errors, ...
        raise AdminError(f"cannot open an admin session with kit {kit} as '{user}': {type(e).__name__}: {e}",
                         EXIT_CONNECT) from e


def _close(sess) -> None:
    try:
        sess.close()
    except Exception:
        pass


@contextlib.contextmanager
def session(a):
    """An admin session from the command's --startup-kit / --username / --connect-timeout, always closed."""
    sess = connect(a.startup_kit, a.username, a.connect_timeout)
    try:
        yield sess
    finally:
        _close(sess)


def _latest_round(sess, job_id: str) -> int | None:
    try:
        logs = sess.get_job_logs(job_id, target="server").get("logs", {})
    except Exception:
        return None
    text = "\n".join(v for v in logs.values() if isinstance(v, str))
    found = _ROUND_RE.findall(text)
    return int(found[-1]) if found else None


class Conn:
    """An admin session that can be re-opened (the server may restart while a job is followed)."""

    def __init__(self, startup_kit: str | None, username: str | None, connect_timeout: float = 10.0):
        self.kit, self.user = resolve_kit(startup_kit, username)
        self.connect_timeout = connect_timeout
        self.sess = connect(str(self.kit), self.user, connect_timeout)

    def reopen(self, deadline: float) -> None:
        """Re-open the session, retrying until ``deadline`` (AdminError EXIT_CONNECT after it)."""
        _close(self.sess)
        while True:
            try:
                self.sess = connect(str(self.kit), self.user, min(self.connect_timeout, 5.0))
                return
            except AdminError as e:
                if e.code != EXIT_CONNECT or time.time() > deadline:
                    raise
                time.sleep(2.0)

    def close(self) -> None:
        _close(self.sess)


def _engine_job_ids(sess) -> set[str] | None:
    try:
        return {j.job_id for j in sess.get_system_info().job_info}
    except Exception:
        return None


def follow_job(conn: Conn, job_id: str, timeout: float = 0.0, poll: float = 2.0, show_rounds: bool = True,
               reconnect: float = 120.0, stale_after: float = 15.0) -> str:
    """Print a line at each status change until the job finishes; return its final status.

    ``timeout`` 0 = no limit (AdminError EXIT_TIMEOUT when it passes). A lost connection is retried
    for ``reconnect`` seconds. A job the job store still calls RUNNING while the server engine no
    longer runs it for ``stale_after`` seconds (what a server restart mid-job leaves behind in
    FLARE 2.9) ends the wait with status ``STALE:RUNNING``.
    """
    from nvflare.fuel.flare_api.api_spec import NoConnection

    t0 = time.time()
    last, last_round, last_line, missing_since = None, None, 0.0, None
    while True:
        try:
            meta = conn.sess.get_job_meta(job_id)
        except (NoConnection, ConnectionError) as e:
            _log(f"server unreachable ({e}); retrying for up to {reconnect:g} s")
            conn.reopen(time.time() + reconnect)
            _log("reconnected")
            continue
        except Exception as e:
            raise AdminError(f"lost track of job {job_id}: {type(e).__name__}: {e}", EXIT_CONNECT) from e
        status = str(meta.get("status", "?"))
        elapsed = time.time() - t0
        rnd = _latest_round(conn.sess, job_id) if (show_rounds and status == "RUNNING") else None
        if status != last or (rnd is not None and rnd != last_round) or time.time() - last_line > 60:
            extra = f", round {rnd}" if rnd is not None else ""
            _log(f"job {job_id}: {status} ({elapsed:.0f} s{extra})")
            last, last_line = status, time.time()
            last_round = rnd if rnd is not None else last_round
        if status.startswith("FINISHED") or status in ("ABORTED", "ABANDONED", "FAILED"):
            return status
        if status == "RUNNING":
            ids = _engine_job_ids(conn.sess)
            if ids is not None and job_id not in ids:
                missing_since = missing_since or time.time()
                if time.time() - missing_since >= stale_after:
                    return "STALE:RUNNING"
            else:
                missing_since = None
        if timeout and elapsed > timeout:
            raise AdminError(f"job {job_id} still {status} after {timeout:g} s (timeout); it keeps running: "
                             f"abort it with 'abort {job_id}'", EXIT_TIMEOUT)
        time.sleep(poll)


STALE_HELP = """\
job {job_id} is listed as RUNNING but no longer runs on the server:
the server was restarted while it ran. FLARE 2.9 does not resume such a job, and the entry cannot
be aborted, deleted or downloaded. Resume it with a new job: the server and every site keep the
last completed round's state in <workspace>/pfedsam_state/{job_id}/ (outside the job folder).
Submit the same job again with --set federation.resume_from={job_id}
(README: "Resuming after a crash")."""


def download(sess, job_id: str, dest: str | os.PathLike) -> Path:
    """Download the job's result folder into ``dest``; return the job's folder there."""
    dest = Path(dest).expanduser().resolve()
    target = dest / job_id
    if target.exists():  # download_job_result moves the folder and refuses to overwrite it
        shutil.rmtree(target)
    dest.mkdir(parents=True, exist_ok=True)
    loc = sess.download_job_result(job_id, destination=str(dest))
    if not loc or not Path(loc).exists():
        raise AdminError(f"download of job {job_id} returned no folder ({loc!r})", EXIT_JOB_FAILED)
    return Path(loc)


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AdminError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def job_with_overrides(job: Path, sets: dict, workdir: Path) -> Path:
    """A copy of ``job`` under ``workdir`` with ``sets`` applied; the job folder itself is untouched.

    A key without a dot that the server config (``<app>/config/config_fed_server.json``) has at top
    level (the values its components reference as ``"{key}"``) is set there. Any other key is a
    (dotted) key of the job's ``pfedsam.yaml`` (e.g. ``federation.rounds``), checked with the
    pfedsam config loader, so a typo is an error instead of a silent no-op.
    """
    dst = workdir / job.name
    shutil.copytree(job, dst, symlinks=False)
    server_cfgs = sorted(dst.glob("*/config/config_fed_server.json"))
    yamls = sorted(dst.glob("*/config/pfedsam.yaml"))
    for key, value in sets.items():
        cfgs = [(c, json.loads(c.read_text())) for c in server_cfgs]
        if "." not in key and cfgs and all(key in cfg for _, cfg in cfgs):
            for path, cfg in cfgs:
                cfg[key] = value
                path.write_text(json.dumps(cfg, indent=2))
        elif yamls:
            for path in yamls:
                _set_yaml_key(path, key, value, dst)
        else:
            keys = sorted({k for _, cfg in cfgs for k, v in cfg.items()
                           if not isinstance(v, (dict, list)) and k != "format_version"})
            raise AdminError(f"{job.name}: no server config key '{key}' (top-level keys: {', '.join(keys) or 'none'})"
                             f" and no pfedsam.yaml")
    return dst


def _set_yaml_key(path: Path, key: str, value, job: Path) -> None:
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise AdminError(f"{path.relative_to(job.parent)}: no section '{part}' for --set {key}")
        node = node[part]
    node[parts[-1]] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    from pfedsam.config import ConfigError
    from pfedsam.jobs import sync_job

    try:
        sync_job(job)  # FLARE runs what the JSON says: rounds, min_clients, ... follow the YAML
    except (ConfigError, ValueError) as e:
        raise AdminError(f"--set {key}={value!r}: {e}") from e


def check_sites(sess, job: Path) -> None:
    """AdminError unless the sites the job needs (meta.json min_clients, named deploy targets) are connected.

    FLARE itself would keep such a job SUBMITTED until enough sites join, silently.
    """
    meta = json.loads((job / "meta.json").read_text())
    try:
        connected = {c.name for c in sess.get_system_info().client_info}
    except Exception:
        return  # the server will judge
    named = {t for targets in (meta.get("deploy_map") or {}).values() for t in targets
             if isinstance(t, str) and not t.startswith("@") and t != "server"}
    missing = sorted(named - connected)
    if missing:
        raise AdminError(f"job {job.name} is deployed to {', '.join(missing)}, not connected (connected: "
                         f"{', '.join(sorted(connected)) or 'none'})")
    need = int(meta.get("min_clients") or 0)
    if need > len(connected):
        hint = "start more sites"
        if list(job.glob("*/config/pfedsam.yaml")):
            hint += f", or submit with --set federation.min_clients={max(len(connected), 1)}"
        raise AdminError(f"job {job.name} needs {need} sites (meta.json min_clients) but {len(connected)} are "
                         f"connected ({', '.join(sorted(connected)) or 'none'}): {hint}")


def cmd_submit(a) -> int:
    job = Path(a.job).expanduser().resolve()
    if not (job / "meta.json").is_file():
        raise AdminError(f"{job} is not a FLARE job folder (no meta.json)")
    sets = _parse_sets(a.set)
    conn = Conn(a.startup_kit, a.username, a.connect_timeout)
    tmp = None
    try:
        if sets:
            tmp = Path(tempfile.mkdtemp(prefix="pfedsam-job-"))
            job = job_with_overrides(job, sets, tmp)
            _log("config overrides: " + ", ".join(f"{k}={v!r}" for k, v in sets.items()))
        check_sites(conn.sess, job)
        t0 = time.time()
        try:
            job_id = conn.sess.submit_job(str(job))
        except Exception as e:
            raise AdminError(f"submission of {job} refused: {type(e).__name__}: {e}", EXIT_JOB_FAILED) from e
        _log(f"submitted {job.name} as job {job_id}")
        if a.no_wait:
            print(job_id)
            return EXIT_OK
        status = follow_job(conn, job_id, timeout=a.timeout, poll=a.poll)
        if status == "STALE:RUNNING":
            print(STALE_HELP.format(job_id=job_id), file=sys.stderr)
            return EXIT_JOB_FAILED
        _log(f"job {job_id} ended {status} after {time.time() - t0:.0f} s")
        folder = None
        if not a.no_download:
            try:
                folder = download(conn.sess, job_id, a.download)
                _log(f"result downloaded to {folder}")
            except Exception as e:
                print(f"download of job {job_id} failed: {type(e).__name__}: {e}", file=sys.stderr)
        if folder is not None:
            print_report(folder)
        if status != COMPLETED:
            print(f"job {job_id} did not complete: {status} (see the server and site logs: "
                  f"{'the downloaded folder' if folder else 'download_job ' + job_id})", file=sys.stderr)
            return EXIT_JOB_FAILED
        return EXIT_OK
    finally:
        conn.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_abort(a) -> int:
    conn = Conn(a.startup_kit, a.username, a.connect_timeout)
    try:
        try:
            info = conn.sess.abort_job(a.job_id)
        except Exception as e:
            raise AdminError(f"abort of job {a.job_id} failed: {type(e).__name__}: {e}", EXIT_JOB_FAILED) from e
        _log(f"abort requested for job {a.job_id}{': ' + str(info) if info else ''}")
        if a.wait:
            status = follow_job(conn, a.job_id, timeout=a.timeout, poll=1.0, show_rounds=False)
            return EXIT_OK if status.startswith("FINISHED") else EXIT_JOB_FAILED
        return EXIT_OK
    finally:
        conn.close()


def _jname(j: dict) -> str:
    return str(j.get("job_name") or j.get("name") or "")


def _active_jobs(sess) -> tuple[list[dict], list[dict]]:
    """(jobs the server really runs or will run, stale RUNNING entries left by a server restart)."""
    engine_ids = _engine_job_ids(sess) or set()
    live, stale = [], []
    for j in sess.list_jobs():
        st = str(j.get("status", ""))
        if st == "RUNNING" and j.get("job_id") not in engine_ids:
            stale.append(j)
        elif st in ("SUBMITTED", "APPROVED", "DISPATCHED", "RUNNING"):
            live.append(j)
    return live, stale


def cmd_status(a) -> int:
    with session(a) as sess:
        info = sess.get_system_info()
        print(f"server: reachable, {'running a job' if info.job_info else 'idle'}")
        names = sorted(c.name for c in info.client_info)
        print(f"sites connected ({len(names)}): {', '.join(names) or 'none'}")
        live, stale = _active_jobs(sess)
        for j in live:
            print(f"job {j.get('job_id')} {_jname(j)}: {j.get('status')}")
        for j in stale:
            print(f"job {j.get('job_id')} {_jname(j)}: RUNNING in the job store only (stale: the server "
                  f"was restarted while it ran; it will not continue)")
        if not live:
            print("no job running or waiting")
        return EXIT_OK


def cmd_list(a) -> int:
    with session(a) as sess:
        for j in sess.list_jobs():
            print(f"{j.get('job_id')}  {_jname(j):24s}  {j.get('status', '?'):24s}  "
                  f"{j.get('submit_time', '')}  {j.get('duration', '')}")
        return EXIT_OK


def cmd_download(a) -> int:
    with session(a) as sess:
        folder = download(sess, a.job_id, a.download)
        print(f"downloaded to {folder}")
        print_report(folder)
        return EXIT_OK


def cmd_wait_ready(a) -> int:
    """Wait until the server answers and every listed site is connected."""
    expected = {c for c in (a.clients or "").split(",") if c}
    deadline = time.time() + a.timeout
    last_err = "server not reachable"
    while time.time() < deadline:
        try:
            sess = connect(a.startup_kit, a.username, min(5.0, max(deadline - time.time(), 0.5)))
        except AdminError as e:
            if e.code != EXIT_CONNECT:
                raise
            last_err = str(e)
            time.sleep(1.0)
            continue
        try:
            while time.time() < deadline:
                names = {c.name for c in sess.get_system_info().client_info}
                missing = sorted(expected - names)
                if not missing:
                    _log(f"ready: server up, sites connected: {', '.join(sorted(names)) or 'none'}")
                    return EXIT_OK
                last_err = f"sites not connected yet: {', '.join(missing)}"
                time.sleep(1.0)
        except Exception as e:
            last_err = f"{type(e).__name__}: {e}"
        finally:
            _close(sess)
    raise AdminError(f"deployment not ready after {a.timeout:g} s: {last_err}", EXIT_TIMEOUT)


def cmd_shutdown(a) -> int:
    """Abort running jobs, then shut down the sites and the server."""
    try:
        sess = connect(a.startup_kit, a.username, a.connect_timeout)
    except AdminError as e:
        if e.code == EXIT_CONNECT:
            _log(f"server not reachable, nothing to shut down ({e})")
            return EXIT_CONNECT
        raise
    try:
        from nvflare.fuel.flare_api.api_spec import TargetType

        live, _ = _active_jobs(sess)
        aborted = []
        for j in live:
            _log(f"aborting job {j.get('job_id')} ({j.get('status')})")
            try:
                sess.abort_job(j["job_id"])
                aborted.append(j["job_id"])
            except Exception as e:
                _log(f"abort of {j.get('job_id')} failed: {e}")
        deadline = time.time() + a.timeout
        while aborted and time.time() < deadline:
            running = _engine_job_ids(sess) or set()
            if not running.intersection(aborted):
                break
            time.sleep(0.5)
        # wait=False: the API's own wait treats some errors of a server going down as "still up";
        # callers (poc_setup.sh) watch the processes instead
        try:
            sess.shutdown(TargetType.ALL, wait=False)
        except Exception as e:
            raise AdminError(f"shutdown refused: {type(e).__name__}: {e}", EXIT_JOB_FAILED) from e
        _log("shutdown of sites and server requested")
        return EXIT_OK
    finally:
        _close(sess)


def cmd_report(a) -> int:
    return EXIT_OK if print_report(a.path) else EXIT_JOB_FAILED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pfedsam.flare.admin",
                                description="Submit, follow, abort and inspect pFedSAM jobs on a FLARE deployment.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--startup-kit", help="admin startup kit folder (default $PFEDSAM_ADMIN_KIT)")
        sp.add_argument("--username", help="admin user name (default $PFEDSAM_ADMIN_USER, else the kit folder name)")
        sp.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach the server")
        return sp

    s = common(sub.add_parser("submit", help="submit a job folder, follow it, download it, print its table"))
    s.add_argument("job", help="job folder (with meta.json)")
    s.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for the job (0 = no limit)")
    s.add_argument("--download", default="results", help="folder for the downloaded result (default ./results)")
    s.add_argument("--no-download", action="store_true", help="do not download the result")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    s.add_argument("--poll", type=float, default=2.0, help="seconds between status polls")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="submit a copy of the job with KEY set to VALUE (JSON or text): a top-level key of "
                        "config_fed_server.json, or a dotted key of pfedsam.yaml (e.g. federation.rounds=5); "
                        "repeatable; the job folder itself is not changed")
    s.set_defaults(fn=cmd_submit)

    s = common(sub.add_parser("abort", help="abort a job"))
    s.add_argument("job_id")
    s.add_argument("--wait", action="store_true", help="wait until the job is finished")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait with --wait")
    s.set_defaults(fn=cmd_abort)

    common(sub.add_parser("status", help="server state, connected sites, running jobs")).set_defaults(fn=cmd_status)
    common(sub.add_parser("list", help="all jobs")).set_defaults(fn=cmd_list)

    s = common(sub.add_parser("download", help="download a finished job and print its table"))
    s.add_argument("job_id")
    s.add_argument("--download", default="results", help="destination folder (default ./results)")
    s.set_defaults(fn=cmd_download)

    s = common(sub.add_parser("wait-ready", help="wait for the server and the given sites"))
    s.add_argument("--clients", default="", help="comma-separated site names that must be connected")
    s.add_argument("--timeout", type=float, default=60.0)
    s.set_defaults(fn=cmd_wait_ready)

    s = common(sub.add_parser("shutdown", help="abort running jobs, shut down sites and server"))
    s.add_argument("--timeout", type=float, default=30.0)
    s.set_defaults(fn=cmd_shutdown)

    s = sub.add_parser("report", help="print the per-site table of a report.json or downloaded job folder")
    s.add_argument("path")
    s.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not os.environ.get("PFEDSAM_ADMIN_DEBUG"):
        # the FLARE client stack logs every failed connection attempt at ERROR level; this tool's own
        # messages say what matters (PFEDSAM_ADMIN_DEBUG=1 shows the FLARE log lines)
        logging.disable(logging.CRITICAL)
    try:
        return a.fn(a)
    except AdminError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted (a submitted job keeps running on the server)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
