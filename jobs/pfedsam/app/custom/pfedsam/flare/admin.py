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
import json
import os
import re
import sys
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

    In a downloaded job the server's copy sits in ``<job>/workspace/app_server/``; that one wins
    over any copy a site may have written.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        return None
    found = sorted(p.rglob(REPORT_NAME))
    if not found:
        return None
    server = [f for f in found if "app_server" in f.parts or f.parent.name == "app_server"]
    return (server or found)[0]


def _fmt(v, digits: int) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)
    if v != v:  # NaN
        return "nan"
    return f"{v:.{digits}f}"


def format_report_table(report: dict) -> str:
    """The per-site table of a report: personalized and global Dice / HD95, and the mean row."""
    final = report.get("final") if isinstance(report, dict) else None
    if not isinstance(final, dict) or not final:
        return "report.json has no 'final' per-site results"
    cols = [("personalized", "dice"), ("personalized", "hd95"), ("global", "dice"), ("global", "hd95")]
    head = ["site", "pers. Dice", "pers. HD95", "global Dice", "global HD95"]
    rows, sums = [], {c: [] for c in cols}
    for site in sorted(final):
        entry = final[site] if isinstance(final[site], dict) else {}
        row = [site]
        for kind, metric in cols:
            v = (entry.get(kind) or {}).get(metric) if isinstance(entry.get(kind), dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
                sums[(kind, metric)].append(float(v))
            row.append(_fmt(v, 4 if metric == "dice" else 2))
        rows.append(row)
    if len(rows) > 1:
        mean = ["mean"]
        for kind, metric in cols:
            vals = sums[(kind, metric)]
            mean.append(_fmt(sum(vals) / len(vals), 4 if metric == "dice" else 2) if vals else "-")
        rows.append(mean)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    rounds = report.get("rounds")
    if isinstance(rounds, list):
        out.append(f"({len(rounds)} round(s) in report)")
    return "\n".join(out)


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


def _latest_round(sess, job_id: str) -> int | None:
    try:
        logs = sess.get_job_logs(job_id, target="server").get("logs", {})
    except Exception:
        return None
    text = "\n".join(v for v in logs.values() if isinstance(v, str))
    found = _ROUND_RE.findall(text)
    return int(found[-1]) if found else None


def follow_job(sess, job_id: str, timeout: float = 0.0, poll: float = 2.0, show_rounds: bool = True) -> str:
    """Print a line at each status change until the job finishes; return its final status.

    ``timeout`` 0 = no limit; raises AdminError(EXIT_TIMEOUT) when it passes.
    """
    t0 = time.time()
    last, last_round, last_line = None, None, 0.0
    while True:
        try:
            meta = sess.get_job_meta(job_id)
        except Exception as e:
            raise AdminError(f"lost track of job {job_id}: {type(e).__name__}: {e}", EXIT_CONNECT) from e
        status = str(meta.get("status", "?"))
        elapsed = time.time() - t0
        rnd = _latest_round(sess, job_id) if (show_rounds and status == "RUNNING") else None
        if status != last or (rnd is not None and rnd != last_round) or time.time() - last_line > 60:
            extra = f", round {rnd}" if rnd is not None else ""
            _log(f"job {job_id}: {status} ({elapsed:.0f} s{extra})")
            last, last_line = status, time.time()
            last_round = rnd if rnd is not None else last_round
        if status.startswith("FINISHED") or status in ("ABORTED", "ABANDONED", "FAILED"):
            return status
        if timeout and elapsed > timeout:
            raise AdminError(f"job {job_id} still {status} after {timeout:g} s (timeout); it keeps running: "
                             f"abort it with 'abort {job_id}'", EXIT_TIMEOUT)
        time.sleep(poll)


def download(sess, job_id: str, dest: str | os.PathLike) -> Path:
    """Download the job's result folder into ``dest``; return the job's folder there."""
    dest = Path(dest).expanduser().resolve()
    target = dest / job_id
    if target.exists():  # download_job_result moves the folder and refuses to overwrite it
        import shutil

        shutil.rmtree(target)
    dest.mkdir(parents=True, exist_ok=True)
    loc = sess.download_job_result(job_id, destination=str(dest))
    if not loc or not Path(loc).exists():
        raise AdminError(f"download of job {job_id} returned no folder ({loc!r})", EXIT_JOB_FAILED)
    return Path(loc)


def cmd_submit(a) -> int:
    job = Path(a.job).expanduser().resolve()
    if not (job / "meta.json").is_file():
        raise AdminError(f"{job} is not a FLARE job folder (no meta.json)")
    sess = connect(a.startup_kit, a.username, a.connect_timeout)
    try:
        t0 = time.time()
        try:
            job_id = sess.submit_job(str(job))
        except Exception as e:
            raise AdminError(f"submission of {job} refused: {type(e).__name__}: {e}", EXIT_JOB_FAILED) from e
        _log(f"submitted {job.name} as job {job_id}")
        if a.no_wait:
            print(job_id)
            return EXIT_OK
        status = follow_job(sess, job_id, timeout=a.timeout, poll=a.poll)
        _log(f"job {job_id} ended {status} after {time.time() - t0:.0f} s")
        folder = None
        if not a.no_download:
            try:
                folder = download(sess, job_id, a.download)
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
        _close(sess)


def cmd_abort(a) -> int:
    sess = connect(a.startup_kit, a.username, a.connect_timeout)
    try:
        try:
            info = sess.abort_job(a.job_id)
        except Exception as e:
            raise AdminError(f"abort of job {a.job_id} failed: {type(e).__name__}: {e}", EXIT_JOB_FAILED) from e
        _log(f"abort requested for job {a.job_id}{': ' + str(info) if info else ''}")
        if a.wait:
            status = follow_job(sess, a.job_id, timeout=a.timeout, poll=1.0, show_rounds=False)
            return EXIT_OK if status.startswith("FINISHED") else EXIT_JOB_FAILED
        return EXIT_OK
    finally:
        _close(sess)


def cmd_status(a) -> int:
    sess = connect(a.startup_kit, a.username, a.connect_timeout)
    try:
        info = sess.get_system_info()
        print(f"server: {info.server_info.status}")
        names = sorted(c.name for c in info.client_info)
        print(f"sites connected ({len(names)}): {', '.join(names) or 'none'}")
        jobs = [j for j in sess.list_jobs() if str(j.get("status", "")) in ("SUBMITTED", "DISPATCHED", "RUNNING")]
        for j in jobs:
            print(f"job {j.get('job_id')} {j.get('name', '')}: {j.get('status')}")
        if not jobs:
            print("no job running or waiting")
        return EXIT_OK
    finally:
        _close(sess)


def cmd_list(a) -> int:
    sess = connect(a.startup_kit, a.username, a.connect_timeout)
    try:
        for j in sess.list_jobs():
            print(f"{j.get('job_id')}  {j.get('name', ''):24s}  {j.get('status', '?'):24s}  "
                  f"{j.get('submit_time', '')}  {j.get('duration', '')}")
        return EXIT_OK
    finally:
        _close(sess)


def cmd_download(a) -> int:
    sess = connect(a.startup_kit, a.username, a.connect_timeout)
    try:
        folder = download(sess, a.job_id, a.download)
        print(f"downloaded to {folder}")
        print_report(folder)
        return EXIT_OK
    finally:
        _close(sess)


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

        running = [j for j in sess.list_jobs() if str(j.get("status")) in ("RUNNING", "DISPATCHED")]
        for j in running:
            _log(f"aborting running job {j.get('job_id')}")
            try:
                sess.abort_job(j["job_id"])
            except Exception as e:
                _log(f"abort of {j.get('job_id')} failed: {e}")
        deadline = time.time() + a.timeout
        for j in running:
            while time.time() < deadline:
                if str(sess.get_job_meta(j["job_id"]).get("status", "")).startswith("FINISHED"):
                    break
                time.sleep(0.5)
        try:
            sess.shutdown(TargetType.ALL, wait=True, timeout=max(deadline - time.time(), 5.0))
        except TimeoutError as e:
            raise AdminError(f"shutdown requested but the server is still up: {e}", EXIT_TIMEOUT) from e
        _log("shutdown of server and sites requested")
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
