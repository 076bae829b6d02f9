#!/usr/bin/env bash
# pFedSAM-FLARE: a local proof-of-concept FLARE deployment (one server + N sites) on loopback.
#
#   ./poc_setup.sh start --sites 3          # provision (if needed) and start server + 3 sites
#   ./poc_setup.sh submit jobs/pfedsam      # submit, follow, download, print the per-site table
#   ./poc_setup.sh stop                     # stop exactly what start started
#
# Subcommands: prepare | start | submit JOB | status | stop | clean
# Options:
#   --sites N            number of sites (default 2; prepare/start)
#   --port P             server port for sites and admin (default: a free one below the kernel's ephemeral range; error if taken, warning if in that range)
#   --data-root DIR      give the sites the sub-folders of DIR as data (sorted, one per site);
#                        default: data_dir null = the job's own data settings (synthetic set)
#   --device D           device written into each site's config (auto, cpu, cuda, cuda:N; default auto)
#   --threads T          torch CPU threads per site (default: CPU cores / sites, at least 1)
#   --timeout S          submit: seconds to wait for the job (default 0 = no limit)
#   --set KEY=VALUE      submit: override a key of the job's pfedsam.yaml, written through into its FLARE
#                        config (repeatable; e.g. resume: --set federation.resume_from=JOB_ID
#                        --set federation.start_round=N)
#   --start-timeout S    start: seconds for server + sites to come up (default 90)
#   --stop-timeout S     stop: seconds for a graceful stop before processes are killed (default 40)
#
# Everything lives in the state folder ${PFEDSAM_POC_DIR:-/tmp/pfedsam-poc}: its own HOME and
# NVFLARE_POC_WORKSPACE (the user's ~/.nvflare is never read or written), the kits, logs, the
# pid file and downloaded results. The server is named localhost: it listens on 127.0.0.1 only.
# Processes started here carry PFEDSAM_POC_MARKER=<random id> in their environment (the FLARE
# job processes inherit it); stop and status only look at, and only signal, processes with the
# marker of this state folder.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE_DIR="${PFEDSAM_POC_DIR:-/tmp/pfedsam-poc}"
PYTHON="${PYTHON:-python3}"
PROJECT_NAME="pfedsam_poc"
ADMIN_USER="admin@pfedsam.poc"
SERVER_NAME="localhost"
ORG="pfedsam"

SITES=""
PORT=""
DATA_ROOT=""
DEVICE="auto"
THREADS=""
JOB_TIMEOUT=0
START_TIMEOUT=90
STOP_TIMEOUT=40

die() { echo "poc_setup.sh: error: $*" >&2; exit 1; }
info() { echo "[poc $(date +%H:%M:%S)] $*"; }

usage() { awk 'NR > 1 && /^set -euo/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }

# ---------------------------------------------------------------------------------------- args
CMD="${1:-}"
[[ -n "$CMD" ]] || { usage; exit 2; }
shift
JOB=""
SETS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sites) SITES="${2:?--sites needs a number}"; shift 2 ;;
    --port) PORT="${2:?--port needs a number}"; shift 2 ;;
    --data-root) DATA_ROOT="${2:?--data-root needs a folder}"; shift 2 ;;
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --threads) THREADS="${2:?--threads needs a number}"; shift 2 ;;
    --timeout) JOB_TIMEOUT="${2:?--timeout needs seconds}"; shift 2 ;;
    --set) SETS+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --start-timeout) START_TIMEOUT="${2:?}"; shift 2 ;;
    --stop-timeout) STOP_TIMEOUT="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z "$JOB" ]] || die "unexpected argument $1"; JOB="$1"; shift ;;
  esac
done
[[ -z "$SITES" || "$SITES" =~ ^[1-9][0-9]*$ ]] || die "--sites must be a positive integer, got '$SITES'"
[[ -z "$PORT" || ( "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1024 && "$PORT" -le 65535 ) ]] \
  || die "--port must be a number in 1024..65535, got '$PORT'"
[[ -z "$THREADS" || "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer, got '$THREADS'"
for v in "$JOB_TIMEOUT" "$START_TIMEOUT" "$STOP_TIMEOUT"; do
  [[ "$v" =~ ^[0-9]+$ ]] || die "timeouts are whole seconds, got '$v'"
done

[[ "$STATE_DIR" = /* ]] || STATE_DIR="$PWD/$STATE_DIR"
STATE_DIR="${STATE_DIR%/}"
STATE_MARK="$STATE_DIR/.pfedsam-poc-state"
SETTINGS="$STATE_DIR/settings.env"
PID_FILE="$STATE_DIR/pids"
POC_WS="$STATE_DIR/workspace"
RESULTS="$STATE_DIR/results"

# The FLARE CLI and runtime only ever see the state folder.
USER_HOME="${HOME:-}"
export HOME="$STATE_DIR/home"
export NVFLARE_POC_WORKSPACE="$POC_WS"
unset NVFLARE_HOME NVFL_WORKSPACE 2>/dev/null || true

# ------------------------------------------------------------------------------------- helpers
require_nvflare() {
  command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found (set PYTHON=/path/to/python)"
  command -v nvflare >/dev/null 2>&1 \
    || die "nvflare is not installed (no 'nvflare' command on PATH): pip install nvflare==2.9.0"
  "$PYTHON" -c 'import nvflare' 2>/dev/null \
    || die "nvflare is not importable by $PYTHON: pip install nvflare==2.9.0 (into the same environment)"
  command -v setsid >/dev/null 2>&1 || die "'setsid' (util-linux) is needed to start the services"
}

port_free() {  # exit 0 when nothing listens on / holds 127.0.0.1:$1 (TIME_WAIT leftovers are fine)
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}

# The kernel's ephemeral port range, "LOW HIGH" (Linux's default where it cannot be read). bind(port 0)
# returns a port inside it, and FLARE's processes pick their internal listener ports that way, so a
# server port there can go to a site before the server binds it (seen in CI: site-1 listened on it).
ephemeral_range() {
  local range
  range="$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true)"
  if [[ "$range" =~ ^([0-9]+)[[:space:]]+([0-9]+)$ ]]; then
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
  else
    echo "32768 60999"
  fi
}

free_port() {  # a free port below the ephemeral range
  local low _
  read -r low _ <<<"$(ephemeral_range)"
  "$PYTHON" - "$low" <<'EOF'
import random, socket, sys
low = int(sys.argv[1])
ports = list(range(max(1025, low - 12000), low))
random.SystemRandom().shuffle(ports)
for port in ports[:500]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    sys.exit(0)
sys.exit(f"no free port below the ephemeral range (it starts at {low}); pass --port")
EOF
}

load_settings() {
  [[ -f "$SETTINGS" ]] || return 1
  # shellcheck disable=SC1090
  source "$SETTINGS"
}

prod_dir() { echo "$POC_WS/$PROJECT_NAME/prod_00"; }
site_names() { local i; for ((i = 1; i <= P_SITES; i++)); do echo "site-$i"; done; }

admin_exec() {  # replace this (sub)shell by the admin tool (from this repository) with this deployment's admin kit
  PYTHONPATH="$SCRIPT_DIR/custom${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m pfedsam.flare.admin "$@" --startup-kit "$(prod_dir)/$ADMIN_USER" --username "$ADMIN_USER"
}
admin() { (admin_exec "$@"); }

# live processes carrying this state folder's marker, one per line: "PID PGID KIND", KIND = flare
# (a FLARE python process: server, site, job) or other (service loop shell, its sleep)
marked_procs() {
  [[ -n "${P_MARKER:-}" ]] || return 0
  "$PYTHON" - "$P_MARKER" <<'EOF'
import os, sys
want = ("PFEDSAM_POC_MARKER=" + sys.argv[1]).encode()
me = os.getpid()
for d in os.listdir("/proc"):
    if not d.isdigit() or int(d) == me:
        continue
    try:
        with open(f"/proc/{d}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{d}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{d}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        continue
    if want in env and fields[0] != b"Z":
        print(d, int(fields[2]), "flare" if b"nvflare" in cmd else "other")
EOF
}

marker_pids() { marked_procs | cut -d' ' -f1; }

load_pids() {  # P_MARKER, and P_GROUPS: the recorded service-loop pids (= their process groups)
  P_MARKER=""
  P_GROUPS=""
  [[ -f "$PID_FILE" ]] || return 0
  P_MARKER="$(sed -n 's/^marker //p' "$PID_FILE" | head -n1)"
  P_GROUPS="$(awk '$1 == "proc" {print $3}' "$PID_FILE" | paste -sd' ' -)"
}

has_marker() { { tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null | grep -x "PFEDSAM_POC_MARKER=$P_MARKER" >/dev/null; }

signal_marked() {  # signal every live marked process (re-checking the marker right before)
  local sig="$1" pid
  for pid in $(marker_pids); do
    if has_marker "$pid"; then kill "-$sig" "$pid" 2>/dev/null || true; fi
  done
}

signal_groups() {  # signal the recorded process groups that still hold a marked process
  local sig="$1" pid pgid kind g
  marked_procs | while read -r pid pgid kind; do
    for g in $P_GROUPS; do
      if [[ "$pgid" == "$g" ]] && has_marker "$pid"; then kill "-$sig" -- "-$pgid" 2>/dev/null || true; fi
    done
  done
}

wait_marked_gone() {  # wait_marked_gone SECONDS [flare]: until no marked (FLARE) process is left
  local deadline=$((SECONDS + $1)) kind="${2:-}"
  while :; do
    if [[ -n "$kind" ]]; then
      marked_procs | grep " $kind\$" >/dev/null || return 0
    else
      [[ -n "$(marked_procs)" ]] || return 0
    fi
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

is_running() { load_pids; [[ -n "$P_MARKER" && -n "$(marker_pids)" ]]; }

write_site_configs() {
  local -a dirs=()
  if [[ -n "$DATA_ROOT" ]]; then
    [[ -d "$DATA_ROOT" ]] || die "--data-root $DATA_ROOT is not a folder"
    DATA_ROOT="$(cd "$DATA_ROOT" && pwd)"
    mapfile -t dirs < <(find "$DATA_ROOT" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | sort)
    ((${#dirs[@]} >= P_SITES)) \
      || die "--data-root $DATA_ROOT has ${#dirs[@]} site folder(s), $P_SITES site(s) asked for"
  fi
  local threads="$THREADS"
  if [[ -z "$threads" ]]; then
    threads=$(($(nproc 2>/dev/null || echo 1) / P_SITES))
    ((threads >= 1)) || threads=1
  fi
  local i=0 site data
  for site in $(site_names); do
    data="null"
    [[ ${#dirs[@]} -eq 0 ]] || data="\"${dirs[$i]}\""
    cat >"$(prod_dir)/$site/local/pfedsam_site.yaml" <<EOF
# pFedSAM settings of site '$site'. Read by the pFedSAM executor at this site only; never sent
# anywhere. Edit and restart the site to change them.
#
# data_dir: this site's data folder (<data_dir>/images/<id>.<jpg|png>, <data_dir>/masks/<id>.png,
#           optional <data_dir>/split.json); null = the job's own data settings (by default the
#           generated synthetic sites, where this site's folder is '$site').
data_dir: $data
# device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N
device: $DEVICE
# num_threads: torch CPU threads of this site's training process (0 = torch's default)
num_threads: $threads
EOF
    i=$((i + 1))
  done
}

allow_pfedsam_classes() {  # every participant: FLARE's default class allow-list + pfedsam.flare. (local/resources.json)
  # What a production site without custom code does (docs/deploy.md): jobs made with --no-custom then run
  # from the installed package; jobs with an app/custom folder (bring-your-own-code) skip the list anyway.
  local kit
  for kit in "$(prod_dir)/$SERVER_NAME" $(for s in $(site_names); do echo "$(prod_dir)/$s"; done); do
    "$PYTHON" - "$kit/local" <<'EOF'
import json, os, sys
local = sys.argv[1]
src = os.path.join(local, "resources.json")
if not os.path.isfile(src):
    src = os.path.join(local, "resources.json.default")
with open(src) as f:
    resources = json.load(f)
if "class_allow_list" not in resources:
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    resources["class_allow_list"] = list(DEFAULT_CLASS_ALLOW_LIST)
if "pfedsam.flare." not in resources["class_allow_list"]:
    resources["class_allow_list"].append("pfedsam.flare.")
with open(os.path.join(local, "resources.json"), "w") as f:
    json.dump(resources, f, indent=2)
EOF
  done
}

# ------------------------------------------------------------------------------------ commands
do_prepare() {
  require_nvflare
  if is_running; then die "the POC in $STATE_DIR is running; ./poc_setup.sh stop first"; fi
  local sites="${SITES:-}"
  if [[ -z "$sites" ]]; then
    if load_settings; then sites="$P_SITES"; else sites=2; fi
  fi
  local port="$PORT"
  if [[ -n "$port" ]]; then
    port_free "$port" || die "port $port is already in use on 127.0.0.1; pick another with --port or leave it out"
    local low high
    read -r low high <<<"$(ephemeral_range)"
    if ((port >= low && port <= high)); then
      info "warning: port $port lies in the kernel's ephemeral range ($low-$high), where FLARE's processes" \
        "take their own listener ports: one may take it before the server; a port below $low cannot be taken that way"
    fi
  else
    port="$(free_port)"
  fi
  if [[ -e "$STATE_DIR" && ! -f "$STATE_MARK" ]] && [[ -n "$(ls -A "$STATE_DIR" 2>/dev/null)" ]]; then
    die "$STATE_DIR exists and is not a pfedsam POC state folder; set PFEDSAM_POC_DIR to another folder"
  fi
  mkdir -p "$STATE_DIR" "$HOME"
  touch "$STATE_MARK"
  P_SITES="$sites"
  local project="$STATE_DIR/project.yml"
  {
    echo "# generated by poc_setup.sh: a loopback-only POC project ($sites sites)"
    echo "api_version: 3"
    echo "name: $PROJECT_NAME"
    echo "description: pFedSAM-FLARE local proof of concept"
    echo "participants:"
    echo "  - name: $SERVER_NAME"
    echo "    type: server"
    echo "    org: $ORG"
    echo "    fed_learn_port: $port"
    echo "  - name: $ADMIN_USER"
    echo "    type: admin"
    echo "    org: $ORG"
    echo "    role: project_admin"
    local s
    for s in $(site_names); do
      echo "  - name: $s"
      echo "    type: client"
      echo "    org: $ORG"
    done
    echo "builders:"
    echo "  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder"
    echo "  - path: nvflare.lighter.impl.static_file.StaticFileBuilder"
    echo "    args:"
    echo "      config_folder: config"
    echo "  - path: nvflare.lighter.impl.cert.CertBuilder"
    echo "  - path: nvflare.lighter.impl.signature.SignatureBuilder"
    echo "  - path: pfedsam.flare.provision.SitePolicyBuilder"
  } >"$project"
  info "provisioning $sites site(s), server localhost:$port, into $POC_WS"
  rm -rf "$POC_WS"
  if ! (cd "$STATE_DIR" && nvflare poc prepare -i "$project" --force) >"$STATE_DIR/prepare.log" 2>&1; then
    tail -n 20 "$STATE_DIR/prepare.log" >&2
    die "nvflare poc prepare failed (full log: $STATE_DIR/prepare.log)"
  fi
  [[ -d "$(prod_dir)/$ADMIN_USER/startup" ]] || die "provisioning wrote no admin kit under $(prod_dir)"
  write_site_configs
  allow_pfedsam_classes
  cat >"$SETTINGS" <<EOF
P_SITES=$sites
P_PORT=$port
EOF
  info "prepared: kits in $(prod_dir); site configs in <site kit>/local/pfedsam_site.yaml; pfedsam.flare. allow-listed"
}

start_one() {  # start_one NAME: the kit's service loop in its own session, marked
  local name="$1" kit
  kit="$(prod_dir)/$name"
  rm -f "$kit/pid.fl" "$kit/daemon_pid.fl" "$kit/shutdown.fl" "$kit/restart.fl"
  PFEDSAM_POC_MARKER="$P_MARKER" setsid "$kit/startup/sub_start.sh" >"$kit/console.log" 2>&1 </dev/null &
  local pid=$!
  echo "proc $name $pid" >>"$PID_FILE"
}

do_start() {
  require_nvflare
  if is_running; then
    die "the POC in $STATE_DIR is already running ($(marker_pids | wc -l) processes); ./poc_setup.sh stop first"
  fi
  local need_prepare=0
  if ! load_settings || [[ ! -d "$(prod_dir)/$ADMIN_USER" ]]; then need_prepare=1; fi
  if [[ -n "$SITES" && "${P_SITES:-}" != "$SITES" ]]; then need_prepare=1; fi
  if [[ -n "$PORT" && "${P_PORT:-}" != "$PORT" ]]; then need_prepare=1; fi
  if [[ -n "$DATA_ROOT" || "$DEVICE" != auto || -n "$THREADS" ]]; then need_prepare=1; fi
  if ((need_prepare)); then do_prepare; load_settings; fi
  port_free "$P_PORT" || die "port $P_PORT (from $SETTINGS) is in use on 127.0.0.1: another server runs there; \
stop it, or re-provision on another port with: ./poc_setup.sh prepare --port P (or without --port for a free one)"

  P_MARKER="pfedsam-$(date +%s)-$$-$RANDOM$RANDOM"
  {
    echo "# processes started by poc_setup.sh start: 'proc NAME PID' (PID = its session/process group id)"
    echo "marker $P_MARKER"
    echo "state_dir $STATE_DIR"
  } >"$PID_FILE"
  local t0=$SECONDS s
  start_one "$SERVER_NAME"
  for s in $(site_names); do start_one "$s"; done
  info "started server and $P_SITES site(s) (pid file $PID_FILE); waiting for them to connect"
  # Wait for the sites, but give up at once when the server cannot bind its port: it would only
  # retry until the timeout.
  local server_log waiter ready_rc=0 port_taken=0
  server_log="$(prod_dir)/$SERVER_NAME/log.txt"
  admin_exec wait-ready --clients "$(site_names | paste -sd, -)" --timeout "$START_TIMEOUT" &
  waiter=$!  # the admin tool's own pid (admin_exec), so that kill ends it
  while kill -0 "$waiter" 2>/dev/null; do
    if grep -qsF "', $P_PORT): address already in use" "$server_log"; then
      port_taken=1
      kill "$waiter" 2>/dev/null || true
      break
    fi
    sleep 1
  done
  wait "$waiter" || ready_rc=$?
  if ((port_taken || ready_rc)); then
    echo "--- last lines of the server log ($server_log):" >&2
    tail -n 15 "$server_log" >&2 2>/dev/null || true
    if ((port_taken)); then
      echo "poc_setup.sh: error: the server cannot listen on port $P_PORT: another process holds it" \
        "(address already in use); provision another port with ./poc_setup.sh prepare (a free one" \
        "is chosen without --port), then start again; stopping it" >&2
    else
      echo "poc_setup.sh: error: the deployment did not come up within ${START_TIMEOUT} s; stopping it" >&2
    fi
    # the port answers for another process: no graceful shutdown through it
    STOP_TIMEOUT=10 STOP_GRACEFUL=$((!port_taken)) do_stop || true
    exit 1
  fi
  info "up in $((SECONDS - t0)) s: server localhost:$P_PORT, sites $(site_names | paste -sd' ' -)"
  info "admin kit: $(prod_dir)/$ADMIN_USER (console: $(prod_dir)/$ADMIN_USER/startup/fl_admin.sh, user $ADMIN_USER)"
  info "next: ./poc_setup.sh submit jobs/pfedsam ; ./poc_setup.sh stop"
}

do_submit() {
  require_nvflare
  [[ -n "$JOB" ]] || die "submit needs a job folder: ./poc_setup.sh submit jobs/pfedsam"
  [[ -f "$JOB/meta.json" ]] || die "$JOB is not a FLARE job folder (no meta.json)"
  load_settings || die "no POC prepared in $STATE_DIR: ./poc_setup.sh start --sites N first"
  is_running || die "the POC in $STATE_DIR is not running: ./poc_setup.sh start first"
  mkdir -p "$RESULTS"
  admin submit "$(cd "$JOB" && pwd)" --timeout "$JOB_TIMEOUT" --download "$RESULTS" ${SETS[@]+"${SETS[@]}"}
}

do_status() {
  echo "state folder: $STATE_DIR"
  if ! load_settings; then echo "not prepared"; return 0; fi
  echo "sites: $P_SITES   server: localhost:$P_PORT   kits: $(prod_dir)"
  load_pids
  if [[ -z "$P_MARKER" ]]; then echo "not started"; return 0; fi
  local name pid n
  while read -r _ name pid; do
    if kill -0 "$pid" 2>/dev/null; then echo "  $name: service loop pid $pid running"; else echo "  $name: pid $pid gone"; fi
  done < <(grep '^proc ' "$PID_FILE")
  n="$(marker_pids | wc -l)"
  echo "processes of this POC alive: $n"
  if ((n > 0)); then admin status --connect-timeout 5 || true; fi
}

do_stop() {
  load_settings || { info "nothing prepared in $STATE_DIR"; return 0; }
  load_pids
  if [[ -z "$P_MARKER" ]] || [[ -z "$(marker_pids)" ]]; then
    info "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  local t0=$SECONDS grace=$STOP_TIMEOUT left name
  if [[ "${STOP_GRACEFUL:-1}" == 1 ]]; then
    info "stopping (graceful: abort jobs, shut down sites and server; up to ${grace} s)"
  else
    info "stopping (the server is not reachable: shutdown files, then signals; up to ${grace} s)"
  fi
  if [[ "${STOP_GRACEFUL:-1}" == 1 ]] && marked_procs | grep ' flare$' >/dev/null; then
    admin shutdown --timeout "$((grace > 10 ? grace - 10 : grace))" --connect-timeout 5 || true
  fi
  # the service loops restart a missing FLARE process unless shutdown.fl is there
  for name in $(awk '$1 == "proc" {print $2}' "$PID_FILE"); do
    [[ ! -d "$(prod_dir)/$name" ]] || touch "$(prod_dir)/$name/shutdown.fl"
  done
  left=$((grace - (SECONDS - t0)))
  if ! wait_marked_gone "$((left > 5 ? left : 5))" flare; then
    info "FLARE processes still running after ${grace} s: SIGTERM to $(marker_pids | paste -sd' ' -)"
    signal_marked TERM
    wait_marked_gone 5 flare || { info "SIGKILL to $(marker_pids | paste -sd' ' -)"; signal_marked KILL; }
  fi
  # what is left are the service loops (sleeping between checks): end their process groups
  signal_groups TERM
  if ! wait_marked_gone 5; then
    info "SIGKILL to $(marker_pids | paste -sd' ' -)"
    signal_marked KILL
    wait_marked_gone 5 || die "processes $(marker_pids | paste -sd' ' -) survive SIGKILL"
  fi
  for name in $(awk '$1 == "proc" {print $2}' "$PID_FILE"); do
    rm -f "$(prod_dir)/$name/pid.fl" "$(prod_dir)/$name/daemon_pid.fl" "$(prod_dir)/$name/shutdown.fl" \
      "$(prod_dir)/$name/restart.fl"
  done
  rm -f "$PID_FILE"
  info "stopped in $((SECONDS - t0)) s; no process of this POC is left"
}

do_clean() {
  if [[ ! -e "$STATE_DIR" ]]; then info "nothing to clean at $STATE_DIR"; return 0; fi
  [[ -f "$STATE_MARK" ]] || die "$STATE_DIR is not a pfedsam POC state folder; not removing it"
  case "$STATE_DIR" in /|"$SCRIPT_DIR"|"$USER_HOME") die "refusing to remove $STATE_DIR" ;; esac
  do_stop
  rm -rf "$STATE_DIR"
  info "removed $STATE_DIR"
}

case "$CMD" in
  prepare) do_prepare ;;
  start) do_start ;;
  submit) do_submit ;;
  status) do_status ;;
  stop) do_stop ;;
  clean) do_clean ;;
  -h|--help|help) usage ;;
  *) die "unknown subcommand '$CMD' (prepare, start, submit JOB, status, stop, clean)" ;;
esac
