"""Real deployment tests: provisioning kits, a loopback POC driven by poc_setup.sh, the admin API.

All tests here carry the ``slow`` marker (each POC start/stop costs about half a minute).

* ``test_provision_kits``: ``nvflare provision`` of ``provisioning/project.yml`` into tmp; every
  participant's startup kit is complete.
* ``test_auto_port_lies_below_the_ephemeral_range_and_a_given_one_there_is_warned_about`` and
  ``test_start_gives_up_at_once_when_the_server_port_is_taken``: the server port
  ``poc_setup.sh`` chooses cannot go to a FLARE process's own listener (a ``--port`` that can
  is kept, with a warning), and a port taken after start's check ends the start long before its timeout
  with an error that names the port.
* ``test_job_completes``: ``poc_setup.sh submit`` runs the ``pfedsam-tiny`` variant of
  ``jobs/pfedsam`` to FINISHED:COMPLETED, downloads it and prints the per-site table from
  ``report.json`` (every site must have metrics), once per code route (``deploy_job``): the
  installed package without custom code, the same marked bring-your-own-code, and the bundled
  package. ``PFEDSAM_DEPLOY_JOB=DIR`` runs that job instead, ``PFEDSAM_DEPLOY_JOB=hello`` the
  numpy-only job written by :func:`write_hello_job`.
* ``test_abort_job``: a deliberately slow numpy job is aborted through the admin API and ends
  FINISHED:ABORTED.
* ``test_stop_leaves_no_process``: ``poc_setup.sh stop`` ends every process the POC started
  (found by the marker environment variable the script gives them) and nothing is left.

One POC (2 sites, loopback, a free port, its own HOME) serves the module's job tests; a finalizer stops it
and kills leftovers even when a test fails.

``python tests/test_deployment.py hello DIR [--rounds N] [--delay S]`` writes the numpy hello
job for manual use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# The numpy-only hello job (ScatterAndGather + a reporting InTime aggregator + a trivial executor)
# ------------------------------------------------------------------------------------------------

_HELLO_CUSTOM = '''\
"""Numpy-only stand-in for the pFedSAM job: same workflow shape, no torch."""

import json
import os
import time

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AppConstants


class HelloTrainer(Executor):
    """Adds 1 to every weight after ``delay`` seconds (abortable); reports fake metrics."""

    def __init__(self, delay=0.0):
        super().__init__()
        self.delay = float(delay)

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        if task_name != "train":
            return make_reply(ReturnCode.TASK_UNKNOWN)
        dxo = from_shareable(shareable)
        rnd = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0)
        end = time.time() + self.delay
        while time.time() < end:
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            time.sleep(0.1)
        ws = fl_ctx.get_engine().get_workspace()
        site_cfg = ws.get_file_path_in_site_config("pfedsam_site.yaml")
        weights = {k: np.asarray(v) + 1.0 for k, v in dxo.data.items()}
        metrics = {
            "personalized": {"dice": round(0.5 + 0.1 * rnd, 4), "hd95": 10.0 - rnd},
            "global": {"dice": round(0.4 + 0.1 * rnd, 4), "hd95": 12.0 - rnd},
            "site_config": site_cfg if site_cfg and os.path.isfile(site_cfg) else None,
        }
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: 1, "hello_metrics": metrics}
        return DXO(DataKind.WEIGHTS, weights, meta=meta).to_shareable()


class ReportingAggregator(InTimeAccumulateWeightedAggregator):
    """FedAvg that also writes ``report.json`` (rounds + final per-site metrics) into the app dir."""

    def __init__(self):
        super().__init__(expected_data_kind=DataKind.WEIGHTS)
        self._rounds = {}

    def accept(self, shareable, fl_ctx):
        ok = super().accept(shareable, fl_ctx)
        try:
            metrics = from_shareable(shareable).get_meta_prop("hello_metrics")
        except Exception:
            metrics = None
        if ok and metrics:
            site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
            rnd = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0)
            self._rounds.setdefault(rnd, {})[site] = metrics
        return ok

    def handle_event(self, event_type, fl_ctx):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.END_RUN and self._rounds:
            engine = fl_ctx.get_engine()
            app_dir = engine.get_workspace().get_app_dir(fl_ctx.get_job_id())
            rounds = [{"round": r, "sites": s} for r, s in sorted(self._rounds.items())]
            final = {site: {k: v for k, v in m.items() if k in ("personalized", "global")}
                     for site, m in rounds[-1]["sites"].items()}
            with open(os.path.join(app_dir, "report.json"), "w") as f:
                json.dump({"rounds": rounds, "final": final,
                           "site_configs": {s: m.get("site_config") for s, m in rounds[-1]["sites"].items()}},
                          f, indent=1)
'''


def write_hello_job(dest: str | os.PathLike, rounds: int = 2, delay: float = 0.0, min_clients: int = 2,
                    name: str | None = None) -> Path:
    """Write the numpy hello job to ``dest`` (a job folder; its name is the job name) and return it."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "app" / "config").mkdir(parents=True)
    (dest / "app" / "custom").mkdir()
    meta = {"name": name or dest.name, "resource_spec": {}, "min_clients": min_clients,
            "deploy_map": {"app": ["@ALL"]}}
    server = {
        "format_version": 2,
        "num_rounds": rounds,
        "components": [
            {"id": "persistor", "path": "nvflare.app_common.np.np_model_persistor.NPModelPersistor", "args": {}},
            {"id": "shareable_generator",
             "path": "nvflare.app_common.shareablegenerators.full_model_shareable_generator."
                     "FullModelShareableGenerator", "args": {}},
            {"id": "aggregator", "path": "hello_np.ReportingAggregator", "args": {}},
        ],
        "workflows": [{
            "id": "scatter_and_gather",
            "path": "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather",
            "args": {"min_clients": min_clients, "num_rounds": "{num_rounds}", "start_round": 0,
                     "wait_time_after_min_received": 0, "aggregator_id": "aggregator",
                     "persistor_id": "persistor", "shareable_generator_id": "shareable_generator",
                     "train_task_name": "train", "train_timeout": 0},
        }],
    }
    client = {
        "format_version": 2,
        "executors": [{"tasks": ["train"], "executor": {"path": "hello_np.HelloTrainer", "args": {"delay": delay}}}],
        "components": [],
    }
    (dest / "meta.json").write_text(json.dumps(meta, indent=1))
    (dest / "app" / "config" / "config_fed_server.json").write_text(json.dumps(server, indent=1))
    (dest / "app" / "config" / "config_fed_client.json").write_text(json.dumps(client, indent=1))
    (dest / "app" / "custom" / "hello_np.py").write_text(_HELLO_CUSTOM)
    return dest



# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.slow

POC_SH = ROOT / "poc_setup.sh"
PROJECT_YML = ROOT / "provisioning" / "project.yml"
ADMIN_USER = "admin@pfedsam.poc"  # poc_setup.sh's project admin

needs_nvflare = pytest.mark.skipif(shutil.which("nvflare") is None, reason="nvflare is not installed")


def _env(**extra) -> dict:
    """Environment for poc_setup.sh / nvflare: this interpreter first on PATH, FLARE never sees ~."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHON"] = sys.executable
    env.pop("PFEDSAM_POC_MARKER", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def marked_procs(marker: str) -> dict[int, str]:
    """Live (non-zombie) processes whose environment carries ``PFEDSAM_POC_MARKER=marker``: pid -> cmdline."""
    want = f"PFEDSAM_POC_MARKER={marker}".encode()
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{d}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if want in env and state != b"Z":
            out[int(d)] = cmd
    return out


def procs_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains ``text`` (independent of the marker)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != b"Z":
            out[int(d)] = cmd
    return out


def wait_until(pred, timeout: float, step: float = 0.5) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


class Poc:
    """A POC started with poc_setup.sh in its own state folder."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.env = _env(PFEDSAM_POC_DIR=state_dir)
        self.marker: str | None = None
        self.kit = state_dir / "workspace" / "pfedsam_poc" / "prod_00" / ADMIN_USER

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(POC_SH), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)

    def start(self, sites: int = 2) -> None:
        r = self.run("start", "--sites", str(sites), "--start-timeout", "120", timeout=240)
        pid_file = self.state_dir / "pids"
        if pid_file.is_file():
            for line in pid_file.read_text().splitlines():
                if line.startswith("marker "):
                    self.marker = line.split()[1]
        assert r.returncode == 0, f"poc_setup.sh start failed:\n{r.stdout}\n{r.stderr}"
        assert self.marker, "poc_setup.sh start wrote no marker into its pid file"

    def stop(self) -> subprocess.CompletedProcess:
        return self.run("stop", timeout=180)

    def leftovers(self) -> dict[int, str]:
        found = marked_procs(self.marker) if self.marker else {}
        found.update(procs_mentioning(str(self.state_dir / "workspace")))
        return found

    def kill_leftovers(self) -> dict[int, str]:
        """SIGKILL whatever of this POC is still alive (only marked / state-folder processes)."""
        import signal

        left = self.leftovers()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return left


@pytest.fixture(scope="module")
def poc(tmp_path_factory, request):
    if shutil.which("nvflare") is None:
        pytest.skip("nvflare is not installed")
    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is not available")
    p = Poc(tmp_path_factory.mktemp("poc"))

    def finalize():
        r = p.stop()
        left = p.kill_leftovers()
        assert not left, f"processes left after poc_setup.sh stop (killed now): {left}\n{r.stdout}\n{r.stderr}"

    request.addfinalizer(finalize)
    p.start(sites=2)
    return p


CODE_ROUTES = ("none", "installed", "bundle")  # see pfedsam.jobs: no custom folder / README-only / bundled package


@pytest.fixture(params=CODE_ROUTES)
def deploy_job(tmp_path, request) -> Path:
    """The job test (a) runs, once per way the code reaches the participants.

    ``none``: no ``app/custom`` (the production route without custom code): the installed
    package, allowed by ``pfedsam.flare.`` in every participant's class allow-list (which
    ``poc_setup.sh`` writes). ``installed``: the same code, the job marked bring-your-own-code
    by a README-only ``app/custom``. ``bundle``: ``pfedsam job make --bundle-code``, checked
    against the imported package by digest. ``$PFEDSAM_DEPLOY_JOB`` (a job folder, or ``hello``
    for the numpy job) replaces all three.
    """
    override = os.environ.get("PFEDSAM_DEPLOY_JOB", "")
    if override and request.param != CODE_ROUTES[0]:
        pytest.skip("PFEDSAM_DEPLOY_JOB is set: one run of that job")
    if override == "hello":
        return write_hello_job(tmp_path / "hello-np", rounds=2)
    if override:
        job = Path(override)
        assert (job / "meta.json").is_file(), f"PFEDSAM_DEPLOY_JOB={override} is not a job folder (no meta.json)"
        return job
    from pfedsam.jobs import make_variant

    return make_variant("pfedsam-tiny", tmp_path, ROOT / "jobs" / "pfedsam", code=request.param)


# ------------------------------------------------------------------------------------------------
# (c) provisioning
# ------------------------------------------------------------------------------------------------


@needs_nvflare
def test_provision_kits(tmp_path):
    import yaml
    from cryptography import x509

    project = yaml.safe_load(PROJECT_YML.read_text())
    assert project["api_version"] == 3
    parts = project["participants"]
    server = next(p for p in parts if p["type"] == "server")
    clients = [p for p in parts if p["type"] == "client"]
    admins = [p for p in parts if p["type"] == "admin"]
    assert {"hospital-a", "hospital-b", "hospital-c"} <= {c["name"] for c in clients}
    assert any(a.get("role") == "project_admin" for a in admins)
    builders = [b["path"].rsplit(".", 1)[1] for b in project["builders"]]
    assert builders == ["WorkspaceBuilder", "StaticFileBuilder", "CertBuilder", "SignatureBuilder", "SitePolicyBuilder"]

    home = tmp_path / "home"
    home.mkdir()
    ws = tmp_path / "ws"
    r = subprocess.run(["nvflare", "provision", "-p", str(PROJECT_YML), "-w", str(ws), "--force"],
                       env=_env(HOME=home), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not any(home.iterdir()), "provisioning wrote into HOME"
    prod = ws / project["name"] / "prod_00"
    root_ca = x509.load_pem_x509_certificate((prod / server["name"] / "startup" / "rootCA.pem").read_bytes())
    port = server["fed_learn_port"]

    def check_cert(kit: Path, crt: str, key: str, name: str):
        cert = x509.load_pem_x509_certificate((kit / "startup" / crt).read_bytes())
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == name, f"{kit}: certificate for {cn}, expected {name}"
        cert.verify_directly_issued_by(root_ca)  # raises when not signed by the project's root CA
        assert (kit / "startup" / "rootCA.pem").read_bytes() == (
            prod / server["name"] / "startup" / "rootCA.pem").read_bytes()
        assert (kit / "startup" / key).stat().st_mode & 0o077 == 0, f"{kit}/startup/{key} readable by others"

    kit = prod / server["name"]
    for f in ("fed_server.json", "server.crt", "server.key", "rootCA.pem", "start.sh", "sub_start.sh", "stop_fl.sh"):
        assert (kit / "startup" / f).is_file(), f"server kit lacks startup/{f}"
    check_cert(kit, "server.crt", "server.key", server["name"])
    assert json.loads((kit / "startup" / "fed_server.json").read_text())["servers"][0]["service"]["target"] == \
        f"{server['name']}:{port}"
    assert (kit / "local" / "resources.json.default").is_file()
    from pfedsam.flare.provision import AUTHORIZATION_FILE, PRIVACY_FILE

    assert (kit / "local" / "authorization.json").read_text() == AUTHORIZATION_FILE.read_text()

    for c in clients:
        kit = prod / c["name"]
        for shipped in (PRIVACY_FILE, AUTHORIZATION_FILE):  # the site policy, in every hospital kit
            assert (kit / "local" / shipped.name).read_text() == shipped.read_text(), f"{c['name']}: {shipped.name}"
        for f in ("fed_client.json", "client.crt", "client.key", "rootCA.pem", "start.sh", "sub_start.sh"):
            assert (kit / "startup" / f).is_file(), f"{c['name']} kit lacks startup/{f}"
        assert os.access(kit / "startup" / "start.sh", os.X_OK)
        check_cert(kit, "client.crt", "client.key", c["name"])
        cfg = json.loads((kit / "startup" / "fed_client.json").read_text())
        assert cfg["servers"][0]["service"]["target"] == f"{server['name']}:{port}"
        assert cfg["client"]["fqsn"] == c["name"]

    for a in admins:
        kit = prod / a["name"]
        for f in ("fed_admin.json", "client.crt", "client.key", "rootCA.pem", "fl_admin.sh"):
            assert (kit / "startup" / f).is_file(), f"admin kit {a['name']} lacks startup/{f}"
        assert os.access(kit / "startup" / "fl_admin.sh", os.X_OK)
        assert not (kit / "startup" / "start.sh").exists()
        check_cert(kit, "client.crt", "client.key", a["name"])
        cfg = json.loads((kit / "startup" / "fed_admin.json").read_text())["admin"]
        assert (cfg["host"], int(cfg["port"])) == (server["name"], port)


# ------------------------------------------------------------------------------------------------
# (d) the POC's server port
# ------------------------------------------------------------------------------------------------

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def prepared_poc(state_dir: Path, *args: str) -> tuple[Poc, int, str]:
    """A 1-site POC provisioned (not started) by ``poc_setup.sh prepare ARGS``; returns it, its port and
    what prepare printed."""
    p = Poc(state_dir)
    r = p.run("prepare", "--sites", "1", *args, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    settings = dict(line.split("=", 1) for line in (state_dir / "settings.env").read_text().split())
    return p, int(settings["P_PORT"]), r.stdout + r.stderr


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@needs_nvflare
@pytest.mark.skipif(not EPHEMERAL_RANGE.is_file(), reason=f"{EPHEMERAL_RANGE} is absent (not Linux)")
def test_auto_port_lies_below_the_ephemeral_range_and_a_given_one_there_is_warned_about(tmp_path):
    # FLARE's processes take their internal listener ports from the kernel's ephemeral range; a
    # server port from that range can go to a site first (CI: site-1 listened on the server's port).
    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    _, port, printed = prepared_poc(tmp_path / "auto")
    assert 1024 < port < low, f"auto-chosen port {port} is not below the ephemeral range starting at {low}"
    assert "ephemeral range" not in printed
    # a port the user gives is kept, with a warning when it lies in that range
    given = next(q for q in range(low + 1000, low + 2000) if _port_is_free(q))
    _, port, printed = prepared_poc(tmp_path / "given", "--port", str(given))
    assert port == given
    assert f"warning: port {given} lies in the kernel's ephemeral range" in printed, printed


@needs_nvflare
def test_start_gives_up_at_once_when_the_server_port_is_taken(tmp_path):
    """The port passes start's own check, then another process binds it before the server does."""
    import socket
    import threading

    if shutil.which("setsid") is None:
        pytest.skip("setsid (util-linux) is not available")
    p, port, _ = prepared_poc(tmp_path)
    holder = socket.socket()
    taken: list[BaseException | str] = []

    def take_port_after_the_check():
        # start writes its pid file right after checking the port, before it launches the server
        if not wait_until((tmp_path / "pids").exists, 120, step=0.01):
            taken.append("start wrote no pid file")
            return
        p.marker = next((ln.split()[1] for ln in (tmp_path / "pids").read_text().splitlines()
                         if ln.startswith("marker ")), None)
        try:
            holder.bind(("127.0.0.1", port))
            holder.listen()
            taken.append("ok")
        except OSError as exc:
            taken.append(exc)

    thread = threading.Thread(target=take_port_after_the_check)
    thread.start()
    t0 = time.time()
    try:
        r = p.run("start", "--start-timeout", "120", timeout=240)
        elapsed = time.time() - t0
    finally:
        thread.join()
        holder.close()
        left = p.kill_leftovers()
    assert taken == ["ok"], f"the test could not take port {port}: {taken}"
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"the server cannot listen on port {port}: another process holds it" in r.stderr, r.stderr
    assert elapsed < 90, f"start took {elapsed:.0f} s to give up (its timeout is 120 s):\n{r.stdout}{r.stderr}"
    assert not left, f"processes left after the failed start: {left}"


# ------------------------------------------------------------------------------------------------
# (a) a job to FINISHED:COMPLETED, (b) abort, then a clean stop
# ------------------------------------------------------------------------------------------------


def _check_report(folder: Path, sites: list[str]) -> Path | None:
    from pfedsam.flare.admin import find_report, report_errors

    rep = find_report(folder)
    if rep is None:
        import warnings

        warnings.warn(f"the job wrote no report.json under {folder}", stacklevel=2)
        return None
    report = json.loads(rep.read_text())
    assert isinstance(report.get("rounds"), list) and report["rounds"], "report.json has no rounds"
    final = report["final"]
    assert sorted(final) == sorted(sites), f"report.json final sites {sorted(final)} != {sorted(sites)}"
    errors = report_errors(report)
    assert not errors, (f"sites failed: {errors}; their logs: {folder}/workspace/ (server) and "
                        f"<state dir>/workspace/pfedsam_poc/prod_00/<site>/{folder.name}/log.txt")
    for site, entry in final.items():
        for kind in ("personalized", "global"):
            dice = entry[kind]["dice"]
            assert dice is None or dice != dice or 0.0 <= dice <= 1.0, f"{site} {kind} dice {dice}"
            hd95 = entry[kind].get("hd95")
            assert hd95 is None or hd95 != hd95 or hd95 >= 0.0, f"{site} {kind} hd95 {hd95}"
    return rep


def test_job_completes(deploy_job, poc):
    before = set((poc.state_dir / "results").glob("*")) if (poc.state_dir / "results").is_dir() else set()
    t0 = time.time()
    r = poc.run("submit", str(deploy_job), "--timeout", "900", timeout=1000)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"poc_setup.sh submit failed ({time.time() - t0:.0f} s):\n{out}"
    assert "FINISHED:COMPLETED" in out
    new = sorted(set((poc.state_dir / "results").glob("*")) - before)
    assert len(new) == 1, f"expected one downloaded job under results/, got {new}"
    job_dir = new[0]
    assert (job_dir / "workspace").is_dir(), f"downloaded job {job_dir} has no server workspace"
    if _check_report(job_dir, ["site-1", "site-2"]) is not None:
        assert "pers. Dice" in out and "site-1" in out, "submit printed no per-site table"
    else:
        assert "no report.json" in out
    if not os.environ.get("PFEDSAM_DEPLOY_JOB"):  # the server says which code it ran (jobs.check_code)
        bundled = (deploy_job / "app" / "custom" / "pfedsam_bundle.json").is_file()
        want = "same as the job's bundle" if bundled else "installed; the job bundles no code"
        logs = "".join(f.read_text(errors="replace") for f in job_dir.rglob("log*.txt"))
        assert want in logs, f"the server log of {job_dir} does not say '{want}'"
    # the job's own processes (server job process, one per site) end with it
    job_id = job_dir.name
    assert wait_until(lambda: not {p: c for p, c in marked_procs(poc.marker).items() if job_id in c}, 30), \
        f"processes of finished job {job_id} still alive"


def test_abort_job(poc, tmp_path):
    from pfedsam.flare.admin import Conn, follow_job

    job = write_hello_job(tmp_path / "hello-slow", rounds=100, delay=2.0)
    conn = Conn(str(poc.kit), ADMIN_USER)
    try:
        job_id = conn.sess.submit_job(str(job))
        assert wait_until(lambda: conn.sess.get_job_meta(job_id).get("status") == "RUNNING", 60), \
            f"job {job_id} never reached RUNNING: {conn.sess.get_job_meta(job_id).get('status')}"
        assert wait_until(lambda: len([c for c in marked_procs(poc.marker).values() if job_id in c]) >= 3, 30), \
            "the job's server and site processes did not start"
        conn.sess.abort_job(job_id)
        status = follow_job(conn, job_id, timeout=90, poll=0.5, show_rounds=False)
        assert status == "FINISHED:ABORTED"
    finally:
        conn.close()
    assert wait_until(lambda: not [c for c in marked_procs(poc.marker).values() if job_id in c], 30), \
        f"processes of aborted job {job_id} still alive"


def test_resume_after_killed_site(poc, tmp_path):
    """Issue 12 item 7: a site's job process is killed mid-job; the same job resumed by id finishes it.

    FLARE ends the job FINISHED:EXECUTION_EXCEPTION and deletes its run folders; the server's and
    the sites' pfedsam_state/<job id>/ folders outlive them, and federation.resume_from=<job id>
    continues from the last completed round up to the same total.
    """
    from pfedsam.flare.admin import Conn, follow_job
    from pfedsam.jobs import make_variant

    rounds = 5
    common = {"data": {"synthetic_dir": str(tmp_path / "synthetic")},
              "train": {"local_steps": 20, "global_steps": 20}}
    first = make_variant("pfedsam-tiny", tmp_path / "a", ROOT / "jobs" / "pfedsam", extra={
        **common, "federation": {"rounds": rounds, "export_format": "none", "task_timeout_s": 120}})
    prod = poc.state_dir / "workspace" / "pfedsam_poc" / "prod_00"
    conn = Conn(str(poc.kit), ADMIN_USER)
    try:
        job_id = conn.sess.submit_job(str(first))
        progress = prod / "localhost" / "pfedsam_state" / job_id / "progress.json"

        def done() -> int:
            return json.loads(progress.read_text())["completed_rounds"] if progress.is_file() else 0

        assert wait_until(lambda: done() >= 1, 300, 0.1), f"job {job_id} completed no round"
        site_procs = {p: c for p, c in marked_procs(poc.marker).items() if job_id in c and "site-2" in c}
        assert site_procs, f"no job process of site-2 for {job_id}"
        for pid in site_procs:
            os.kill(pid, 9)
        killed_after = done()
        assert killed_after < rounds, "the job finished before the site was killed"
        status = follow_job(conn, job_id, timeout=300, poll=0.5, show_rounds=False)
        assert status.startswith("FINISHED") and status != "FINISHED:COMPLETED", status
        completed = done()
        assert 1 <= completed < rounds
        for site in ("site-1", "site-2"):
            assert (prod / site / "pfedsam_state" / job_id / "pfedsam_local_state.pt").is_file(), site

        second = make_variant("pfedsam-tiny", tmp_path / "b", ROOT / "jobs" / "pfedsam", extra={
            **common, "federation": {"rounds": rounds, "export_format": "none", "resume_from": job_id,
                                     "start_round": completed}})
        job2 = conn.sess.submit_job(str(second))
        status = follow_job(conn, job2, timeout=600, poll=0.5, show_rounds=False)
        assert status == "FINISHED:COMPLETED", status
        report = json.loads((prod / "localhost" / "pfedsam_state" / job2 / "report.json").read_text())
        assert [r["round"] for r in report["rounds"]] == list(range(completed, rounds))
        assert set(report["final"]) == {"site-1", "site-2"}
        for entry in report["rounds"]:
            assert all(c["accepted"] for c in entry["sites"].values()), entry
    finally:
        conn.close()


def test_stop_leaves_no_process(poc):
    assert poc.leftovers(), "the POC is not running before stop"
    t0 = time.time()
    r = poc.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no process of this POC is left" in r.stdout
    assert not poc.leftovers(), f"left after stop ({time.time() - t0:.0f} s): {poc.leftovers()}"
    assert not (poc.state_dir / "pids").exists()
    r = poc.stop()  # idempotent
    assert r.returncode == 0 and "not running" in r.stdout


if __name__ == "__main__":  # pragma: no cover - manual helper
    import argparse

    p = argparse.ArgumentParser(description="write the numpy hello job")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hello")
    h.add_argument("dest")
    h.add_argument("--rounds", type=int, default=2)
    h.add_argument("--delay", type=float, default=0.0)
    h.add_argument("--min-clients", type=int, default=2)
    a = p.parse_args()
    print(write_hello_job(a.dest, rounds=a.rounds, delay=a.delay, min_clients=a.min_clients))
