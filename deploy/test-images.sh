#!/usr/bin/env bash
# Build fedseg's images and run the compose federation on this machine, then tear it all down.
#
#   sudo deploy/test-images.sh [--json FILE] [--rounds N] [--drills] [--rebuild] [--keep-work]
#
# Needs root (apt-get, dockerd). Installs docker.io (+ docker-compose, debootstrap) if missing and starts dockerd
# if none answers (and stops the one it started, by PID, on exit). Makes the base image fedseg-base:bookworm with
# debootstrap (minbase + python3, from the apt mirror of this host) if it is missing, serves the host's local pip
# indexes (file:// in pip's config) on 127.0.0.1 for the build, builds fedseg:test and fedseg-prometheus:test,
# runs deploy/compose.yaml (server + 2 sites + Prometheus, host network on 127.0.0.1, TLS and node authentication)
# on tiny phantoms, and prints one row per check. --json FILE writes
#   {"checks": [{"name": str, "ok": bool, "seconds": float, "detail": str}]}
# Exit 0 only when every check passed. Not part of the default test run (slow: minutes on 2 cores).
# Images are kept (a second run reuses the build cache); containers, volumes, networks and temporary files go.
# --drills (8 rounds by default) also checks from a site container that the fleet port serves no Control API,
# kills site-2 after round 1 (the round completes with quorum or times out, the site rejoins when started again),
# runs site-2 from an image of the next version (0.1.0 -> 0.1.1, built for the drill) after round 3 until its gate
# refuses the older server's app (gate.log says why), and kills the server as soon as round 5 is recorded
# and resumes it with --resume on the same SuperLink database (the history must stay continuous).
# --rebuild first removes the test images, the base image and debootstrap's cached root file system
# (BASE_CACHE, default /var/tmp/fedseg-base), so everything is made from scratch.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
JSON=""
ROUNDS=3
KEEP_WORK=0
REBUILD=0
DRILLS=0
ROUNDS_SET=0
while [ $# -gt 0 ]; do
    case "$1" in
        --json) JSON=${2:?--json needs a file}; shift 2 ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; ROUNDS_SET=1; shift 2 ;;
        --keep-work) KEEP_WORK=1; shift ;;
        --rebuild) REBUILD=1; shift ;;
        --drills) DRILLS=1; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$DRILLS" = 1 ] && [ "$ROUNDS_SET" = 0 ]; then ROUNDS=8; fi
# the server drill kills after round 5 and needs rounds left to resume into, on a slow machine too
if [ "$DRILLS" = 1 ] && [ "$ROUNDS" -lt 8 ]; then echo "error: --drills needs --rounds >= 8" >&2; exit 2; fi
if [ "$(id -u)" != 0 ]; then echo "error: run as root (apt-get, dockerd)" >&2; exit 2; fi
case "$JSON" in ""|/*) ;; *) JSON="$PWD/$JSON" ;; esac

BASE_IMAGE=${FEDSEG_BASE_IMAGE:-fedseg-base:bookworm}
IMAGE=${FEDSEG_TEST_IMAGE:-fedseg:test}
PROM_IMAGE=${FEDSEG_TEST_PROMETHEUS_IMAGE:-fedseg-prometheus:test}
PROJECT=fedseg-images-test
BASE_CACHE=${FEDSEG_BASE_CACHE:-/var/tmp/fedseg-base}
WORK=$(mktemp -d /var/tmp/fedseg-images.XXXXXX)
CHECKS="$WORK/checks.tsv"
LOG="$WORK/test-images.log"
: >"$CHECKS"
STARTED_DOCKERD=""
PIP_SERVER=""
COMPOSE_UP=0
T_START=$(date +%s)
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

say() { printf '%s\n' "$*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- checks
record() {  # name ok seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\t\n' '  ' | cut -c1-400)" >>"$CHECKS"
}
check() {  # check NAME FUNCTION [ARGS...]: the function's last stdout line is the detail; rc 0 = passed
    local name=$1; shift
    local out="$WORK/check.out" t0 t1 rc detail
    say "== $name"
    t0=$(date +%s.%N)
    "$@" >"$out" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    cat "$out" >>"$LOG"
    detail=$(grep -v '^\s*$' "$out" | tail -n 1)
    if [ $rc -eq 0 ]; then
        record "$name" true "$(awk "BEGIN{print $t1 - $t0}")" "$detail"
    else
        record "$name" false "$(awk "BEGIN{print $t1 - $t0}")" "${detail:-exit $rc}"
        say "-- $name FAILED (rc $rc); last lines:"; tail -n 25 "$out" | sed 's/^/   /' >&2
    fi
    return $rc
}
skip() { record "$1" false 0 "not run: $2"; }

report() {
    python3 - "$CHECKS" "$JSON" "$(( $(date +%s) - T_START ))" <<'EOF'
import json, sys
rows = []
for line in open(sys.argv[1], encoding="utf-8"):
    name, ok, seconds, detail = line.rstrip("\n").split("\t", 3)
    rows.append({"name": name, "ok": ok == "true", "seconds": round(float(seconds or 0), 1), "detail": detail})
width = max([len(r["name"]) for r in rows] + [5])
print(f"\n{'check':<{width}}  ok    seconds  detail")
for r in rows:
    print(f"{r['name']:<{width}}  {'PASS' if r['ok'] else 'FAIL'}  {r['seconds']:>8.1f}  {r['detail']}")
passed = sum(r["ok"] for r in rows)
print(f"{passed}/{len(rows)} passed in {sys.argv[3]} s")
if sys.argv[2]:
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump({"checks": rows}, handle, indent=2)
        handle.write("\n")
sys.exit(0 if rows and passed == len(rows) else 1)
EOF
}

# ---------------------------------------------------------------- teardown (trap)
compose() {
    (cd "$HERE" && $COMPOSE -p "$PROJECT" -f "$HERE/compose.yaml" "$@")
}
teardown() {
    if [ "$COMPOSE_UP" = 1 ]; then
        compose down -v --remove-orphans >>"$LOG" 2>&1
        COMPOSE_UP=0
    fi
    for c in $(docker ps -aq --filter "label=fedseg-images-test" 2>/dev/null); do docker rm -f "$c" >>"$LOG" 2>&1; done
    if [ -n "$PIP_SERVER" ]; then kill "$PIP_SERVER" 2>/dev/null; wait "$PIP_SERVER" 2>/dev/null; PIP_SERVER=""; fi
}
on_exit() {
    local rc=$?
    teardown
    if [ -n "$STARTED_DOCKERD" ]; then
        kill "$STARTED_DOCKERD" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
        say "stopped the dockerd this script started (pid $STARTED_DOCKERD)"
    fi
    if [ "$KEEP_WORK" = 1 ] || [ $rc -ne 0 ]; then
        say "work folder kept: $WORK (log: $LOG)"
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 1. docker
docker_up() {
    local need=()
    command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    if [ ${#need[@]} -gt 0 ]; then
        echo "installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" \
            || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"; } \
            || return 1
    fi
    local how="already running"
    docker_bin
    if ! timeout 10 "$DOCKER_BIN" info >/dev/null 2>&1; then
        dockerd >"$WORK/dockerd.log" 2>&1 &
        STARTED_DOCKERD=$!
        echo "$STARTED_DOCKERD" >"$WORK/dockerd.pid"
        for _ in $(seq 120); do timeout 5 "$DOCKER_BIN" info >/dev/null 2>&1 && break; sleep 0.5; done
        timeout 10 "$DOCKER_BIN" info >/dev/null 2>&1 || { tail -n 20 "$WORK/dockerd.log"; return 1; }
        how="started here, pid $STARTED_DOCKERD"
    fi
    echo "docker $(docker version --format '{{.Server.Version}}' 2>/dev/null) ($how, $(docker info --format '{{.Driver}}' 2>/dev/null)); compose: $COMPOSE_NAME${need:+; installed ${need[*]}}"
}
# Debian's docker client matches its daemon; a newer one elsewhere on PATH would need buildx for `docker build`.
docker_bin() { if [ -x /usr/bin/docker ]; then DOCKER_BIN=/usr/bin/docker; else DOCKER_BIN=$(type -P docker || echo docker); fi; }
docker_bin
docker() { command "$DOCKER_BIN" "$@"; }
compose_pick() {
    if command -v docker-compose >/dev/null 2>&1; then COMPOSE=docker-compose; COMPOSE_NAME="docker-compose $(docker-compose version --short 2>/dev/null)"
    else COMPOSE="docker compose"; COMPOSE_NAME="docker compose $(docker compose version --short 2>/dev/null)"; fi
}
COMPOSE=docker-compose; COMPOSE_NAME=docker-compose
check "docker daemon" docker_up || { report; exit 1; }
if [ "$REBUILD" = 1 ]; then
    docker rmi -f "$IMAGE" "$PROM_IMAGE" "$BASE_IMAGE" >>"$LOG" 2>&1
    docker builder prune -af >>"$LOG" 2>&1; docker image prune -f >>"$LOG" 2>&1
    rm -rf "$BASE_CACHE/rootfs"
    say "--rebuild: removed $IMAGE, $PROM_IMAGE, $BASE_IMAGE and $BASE_CACHE/rootfs"
fi
# docker_up ran in this shell (check calls it directly), so STARTED_DOCKERD is set here.
compose_pick

# ---------------------------------------------------------------- 2. base image
apt_mirror() {
    # the Debian mirror this host's apt uses (sources.list or deb822 .sources)
    { grep -hE '^deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'
      grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'; } \
        | grep -v security | head -n 1
}
base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "$BASE_IMAGE present ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
        return 0
    fi
    local mirror rootfs="$BASE_CACHE/rootfs"
    mirror=$(apt_mirror); mirror=${mirror:-http://deb.debian.org/debian}
    if [ ! -x "$rootfs/usr/bin/python3" ]; then
        rm -rf "$rootfs"; mkdir -p "$BASE_CACHE"
        nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$mirror" || return 1
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    fi
    tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null || return 1
    echo "$BASE_IMAGE made: debootstrap minbase bookworm + python3 from $mirror ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
}
check "base image" base_image || { report; exit 1; }

# ---------------------------------------------------------------- 3. pip indexes for the build
pip_mirror() {
    # pip's configuration on this host, with every local (file://) find-links / index served over 127.0.0.1
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$WORK/pip"
    python3 - "$WORK/pip" "$port" >"$WORK/pip.env" <<'EOF' || return 1
import os, subprocess, sys
served, port = sys.argv[1], sys.argv[2]
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}
for line in out.splitlines():
    key, _, value = line.partition("=")
    name = key.split(".", 1)[-1]
    if name in ("index-url", "extra-index-url", "find-links"):
        conf.setdefault(name, []).extend(value.strip().strip("'\"").split())
for env, name in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"), ("PIP_FIND_LINKS", "find-links")):
    if os.environ.get(env):
        conf[name] = os.environ[env].split()
n = 0
result = {}
for name, values in conf.items():
    urls = []
    for value in dict.fromkeys(values):
        path = value[7:] if value.startswith("file://") else value if value.startswith("/") else None
        if path is None:
            urls.append(value)
            continue
        path = path.rstrip("/")
        if not os.path.isdir(path):
            continue
        link = os.path.join(served, f"d{n}")
        n += 1
        if name == "find-links":  # a folder of files: serve it (the listing is the link page)
            os.symlink(path, link)
            urls.append(f"http://127.0.0.1:{port}/d{n-1}/")
        else:  # a simple index whose pages link ../../files: serve its parent
            os.symlink(os.path.dirname(path), link)
            urls.append(f"http://127.0.0.1:{port}/d{n-1}/{os.path.basename(path)}/")
    if urls:
        result[name] = " ".join(urls)
for env, name in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"), ("PIP_FIND_LINKS", "find-links")):
    if name in result:
        print(f"{env}={result[name]}")
EOF
    (cd "$WORK/pip" && exec python3 -m http.server --bind 127.0.0.1 "$port" >"$WORK/pip-server.log" 2>&1) &
    PIP_SERVER=$!
    for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
    # torch: the PyTorch CPU index when it answers, else the main index (+ the local wheels above)
    if curl -fs -m 15 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
        echo "TORCH_INDEX=https://download.pytorch.org/whl/cpu" >>"$WORK/pip.env"
    else
        local main; main=$(sed -n 's/^PIP_INDEX_URL=//p' "$WORK/pip.env" | awk '{print $1}')
        echo "TORCH_INDEX=${main:-https://pypi.org/simple}" >>"$WORK/pip.env"
    fi
    cat "$WORK/pip.env"
    echo "pip for the build: $(tr '\n' ' ' <"$WORK/pip.env")"
}
check "pip index for the build" pip_mirror || { report; exit 1; }
BUILD_ARGS=()
while IFS= read -r line; do
    [ -n "$line" ] && BUILD_ARGS+=(--build-arg "$line")
done <"$WORK/pip.env"

# ---------------------------------------------------------------- 4. images
context() {
    # the committed sources (git archive HEAD) with deploy/ of the working tree on top: others' uncommitted work
    # in the checkout stays out of the image
    mkdir -p "$WORK/context"
    git -C "$REPO" archive HEAD | tar -x -C "$WORK/context" || return 1
    rm -rf "$WORK/context/deploy"; cp -a "$HERE" "$WORK/context/deploy"
    cp /usr/local/share/ca-certificates/*.crt "$WORK/context/deploy/ca-certificates/" 2>/dev/null || true
    echo "context: HEAD $(git -C "$REPO" rev-parse --short HEAD) + deploy/ of the working tree"
}
image_mb() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'; }
build_fedseg() {
    context || return 1
    nice -n 10 docker build --network host -f "$WORK/context/deploy/Dockerfile" --build-arg BASE="$BASE_IMAGE" \
        "${BUILD_ARGS[@]}" -t "$IMAGE" "$WORK/context" || return 1
    local torch
    torch=$(docker run --rm --network host "$IMAGE" python -c 'import torch; print(torch.__version__)') || return 1
    echo "$IMAGE: $(image_mb "$IMAGE") (base $BASE_IMAGE, torch $torch)"
}
check "build fedseg image" build_fedseg || { report; exit 1; }
image_user() {
    docker run -i --rm --network host "$IMAGE" python - <<'EOF'
import importlib.metadata as md, json, os, pathlib
import fedseg.server
dist = md.distribution("fedseg")
direct = dist.read_text("direct_url.json")
editable = bool(direct and json.loads(direct).get("dir_info", {}).get("editable"))
where = pathlib.Path(fedseg.server.__file__)
assert os.getuid() != 0, "runs as root"
assert not editable and "site-packages" in str(where), (editable, where)
print(f"uid {os.getuid()}, fedseg {dist.version} installed non-editable in {where.parent.parent.parent}")
EOF
}
check "image: non-root, non-editable" image_user
help_check() {
    local out; out=$(docker run --rm --network host "$IMAGE" fed-server --help) || return 1
    echo "$out" | grep -q "start" || { echo "$out"; return 1; }
    echo "docker run $IMAGE fed-server --help: $(echo "$out" | grep -cE '^\s*│ +[a-z]') commands listed, exit 0"
}
check "docker run fed-server --help" help_check
IMAGE_NEXT="${IMAGE}-next"
build_next() {
    # the same sources with the version bumped (package and Flower app), as an upgrade would ship them
    rm -rf "$WORK/context-next"; cp -a "$WORK/context" "$WORK/context-next"
    local old new
    old=$(sed -n 's/^version = "\(.*\)"/\1/p' "$WORK/context-next/pyproject.toml")
    new=$(python3 -c 'import sys; v = sys.argv[1].split("."); v[-1] = str(int(v[-1]) + 1); print(".".join(v))' "$old")
    sed -i "s/^version = \"$old\"/version = \"$new\"/" "$WORK/context-next/pyproject.toml" \
        "$WORK/context-next/server/flwr_app/pyproject.toml"
    nice -n 10 docker build --network host -f "$WORK/context-next/deploy/Dockerfile" --build-arg BASE="$BASE_IMAGE" \
        "${BUILD_ARGS[@]}" -t "$IMAGE_NEXT" "$WORK/context-next" || return 1
    echo "$IMAGE_NEXT: fedseg $(docker run --rm "$IMAGE_NEXT" python -c 'import importlib.metadata as m; print(m.version("fedseg"))') (was $old), $(image_mb "$IMAGE_NEXT")"
}
[ "$DRILLS" = 1 ] && check "build upgraded image (next version)" build_next
build_prometheus() {
    nice -n 10 docker build --network host --build-arg PROMETHEUS_FROM="$BASE_IMAGE" -t "$PROM_IMAGE" \
        "$WORK/context/deploy/prometheus" || return 1
    echo "$PROM_IMAGE: $(image_mb "$PROM_IMAGE"), $(docker run --rm "$PROM_IMAGE" --version 2>&1 | head -n 1)"
}
check "build Prometheus image (Debian package)" build_prometheus
grafana_json() {
    python3 - "$HERE/grafana/dashboards" <<'EOF'
import json, pathlib, sys
boards = sorted(pathlib.Path(sys.argv[1]).glob("*.json"))
assert boards, "no dashboard JSON"
for path in boards:
    board = json.load(path.open(encoding="utf-8"))
    panels = board.get("panels", [])
    assert panels and board.get("title"), f"{path.name}: no title or panels"
print("; ".join(f"{p.name}: valid JSON, {len(json.load(p.open()).get('panels', []))} panels" for p in boards)
      + " (no Grafana image here: not provisioned)")
EOF
}
check "Grafana board JSON" grafana_json

# ---------------------------------------------------------------- 5. the compose federation
free_ports() {
    python3 - <<'EOF'
import socket
socks = []
for _ in range(5):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
in_image() {  # run a command in the image as uid 1000 with $WORK mounted at /w
    docker run --rm --network host --label fedseg-images-test -v "$WORK:/w" "$IMAGE" "$@"
}
prepare() {
    read -r FLEET METRICS M1 M2 PROM <<<"$(free_ports)"
    export FLEET METRICS M1 M2 PROM
    mkdir -p "$WORK/secrets" "$WORK/data" && chown 1000:1000 "$WORK" "$WORK/secrets" "$WORK/data" || return 1
    in_image fed-server certs --out /w/secrets/certs --host 127.0.0.1 || return 1
    for s in site-1 site-2; do
        in_image fed-client keygen --out "/w/secrets/$s" --site "$s" || return 1
        in_image fed-server sites add "$s" "/w/secrets/$s/site-key.pub" --file /w/secrets/sites.toml || return 1
    done
    in_image fed-eval phantoms --out /w/data/phantoms --sites 2 --cases-per-site 2 --val-cases 1 --size 32,32,32 || return 1
    mv "$WORK/data/phantoms/"* "$WORK/data/" && rmdir "$WORK/data/phantoms"
    cat >"$WORK/server.toml" <<EOF
# deploy/test-images.sh: a tiny federation, TLS and node authentication on
rounds = $ROUNDS
min_sites = 2
round_timeout = $([ "$DRILLS" = 1 ] && echo 60 || echo 600)
site_wait_timeout = 600
output_dir = "/work/runs/fed"
database = "/work/state/superlink.db"
host = "127.0.0.1"
port = $FLEET
supernode_auth = true
sites_file = "/config/sites.toml"

[tls]
ca = "/certs/ca.crt"
cert = "/certs/server.pem"
key = "/certs/server.key"

[model]
feature_scale = 16

[train]
steps = 5
batch_size = 2
patch_size = [32, 32, 32]
amp = false

[validation]
data = "/data/validation"
EOF
    cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 2s
scrape_configs:
  - job_name: fedseg-server
    static_configs:
      - targets: ["127.0.0.1:$METRICS"]
  - job_name: fedseg-sites
    static_configs:
      - targets: ["127.0.0.1:$M1", "127.0.0.1:$M2"]
EOF
    chown -R 1000:1000 "$WORK/data" "$WORK/secrets"
    echo "certs (fed-server certs), keys for site-1/site-2 (fed-client keygen) in sites.toml (fed-server sites add), phantoms 2x2 cases + 1 validation at 32^3; ports fleet $FLEET, metrics $METRICS/$M1/$M2, prometheus $PROM"
}
check "certificates, site keys, phantoms" prepare || { report; exit 1; }
export FEDSEG_IMAGE="$IMAGE" FEDSEG_PROMETHEUS_IMAGE="$PROM_IMAGE" FEDSEG_CONFIG="$WORK/server.toml" \
    FEDSEG_SECRETS="$WORK/secrets" FEDSEG_DATA="$WORK/data" FEDSEG_PROMETHEUS_CONFIG="$WORK/prometheus.yml" \
    FEDSEG_PORT="$FLEET" FEDSEG_METRICS_PORT="$METRICS" FEDSEG_SITE1_METRICS_PORT="$M1" \
    FEDSEG_SITE2_METRICS_PORT="$M2" FEDSEG_PROMETHEUS_PORT="$PROM" FEDSEG_THREADS=1

up() {
    COMPOSE_UP=1
    compose up -d --no-build server site-1 site-2 prometheus || return 1
    compose ps
    echo "compose up: $(compose ps -q | wc -l) containers (server, site-1, site-2, prometheus), network_mode host"
}
check "compose up" up || { report; exit 1; }
RESUMED=""
server_container() { if [ -n "$RESUMED" ]; then echo "$RESUMED"; else compose ps -q server; fi; }
last_round() {  # the last round in metrics.csv of the running server (0 before the first)
    docker exec "$(server_container)" python -c '
import csv, os
p = "/work/runs/fed/metrics.csv"
rows = list(csv.DictReader(open(p))) if os.path.exists(p) else []
print(max([int(r["round"]) for r in rows] or [0]))' 2>/dev/null || echo -1
}
wait_round() {  # wait_round N SECONDS: until metrics.csv has round N (rc 1 on timeout or a dead server)
    local deadline=$(( $(date +%s) + $2 )) r
    while [ "$(date +%s)" -lt "$deadline" ]; do
        r=$(last_round); [ "$r" -ge "$1" ] 2>/dev/null && return 0
        [ "$(docker inspect -f '{{.State.Running}}' "$(server_container)" 2>/dev/null)" = true ] || return 1
        sleep 1
    done
    return 1
}
round_sites() {  # round_sites N: "n_sites failures seconds" of round N, read from the runs volume
    docker run -i --rm --label fedseg-images-test -v "${PROJECT}_runs:/work/runs:ro" "$IMAGE" python - "$1" <<'EOF'
import csv, sys
row = next(r for r in csv.DictReader(open("/work/runs/fed/metrics.csv")) if r["round"] == sys.argv[1])
print(row["n_sites"], row["failures"], row["seconds"], row["sites"])
EOF
}
drill_site() {
    wait_round 1 600 || { echo "round 1 never finished"; return 1; }
    local site2 info
    site2=$(compose ps -q site-2)
    docker kill "$site2" >/dev/null || return 1
    echo "site-2 killed after round 1"
    local how="ended with site-2 down"
    if ! wait_round 2 90; then  # the round may wait for min_sites connected sites instead: start site-2 again
        how="waited for min_sites, ended after site-2 was started again"
        docker start "$site2" >/dev/null || return 1
        wait_round 2 300 || { echo "round 2 did not end within 390 s of the kill (round_timeout 60)"; return 1; }
    fi
    info=$(round_sites 2)
    docker start "$site2" >/dev/null || return 1
    echo "round 2: $info ($how)"
    wait_round 3 300 || { echo "round 3 never finished after site-2 was started again"; return 1; }
    local r3; r3=$(round_sites 3)
    echo "round 3: $r3"
    case "$r3" in 2\ *) ;; *) echo "site-2 did not rejoin: round 3 had $r3"; return 1 ;; esac
    echo "docker kill site-2 after round 1: round 2 $how (n_sites failures seconds sites: $info); docker start: site-2 back in round 3 ($r3)"
}
drill_server() {
    local server at out
    server=$(compose ps -q server)
    wait_round 5 600 || { echo "round 5 never finished"; return 1; }
    docker kill "$server" >/dev/null || return 1
    "$DOCKER_BIN" wait "$server" >/dev/null 2>&1  # gone before the resumed one binds its ports
    at=$(docker run -i --rm -v "${PROJECT}_runs:/work/runs:ro" "$IMAGE" python -c 'import csv; print(max(int(r["round"]) for r in csv.DictReader(open("/work/runs/fed/metrics.csv"))))')
    [ "$at" -lt "$ROUNDS" ] || { echo "the run had finished all $ROUNDS rounds before the kill: nothing to resume"; return 1; }
    out=$(compose run -d --no-deps server fed-server start --resume /work/runs/fed --metrics-port "$METRICS") || { echo "$out"; return 1; }
    RESUMED=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.oneoff=True" | head -n 1)
    [ -n "$RESUMED" ] || { echo "no resumed server container: $out"; return 1; }
    wait_round $(( at + 1 )) 600 || { docker logs --tail 30 "$RESUMED"; echo "the resumed server did not finish round $(( at + 1 ))"; return 1; }
    echo "docker kill server after round $at; fed-server start --resume /work/runs/fed went on: round $(( at + 1 )) done with the sites reconnected ($(round_sites $(( at + 1 ))))"
}
drill_upgrade() {
    # after round 3, site-2 is recreated from the next version's image (its workdir volume kept) until its gate
    # refuses a task of the older server's run (or round 5 ends); then it goes back to the current image
    wait_round 3 600 || { echo "round 3 never finished"; return 1; }
    FEDSEG_IMAGE="$IMAGE_NEXT" compose up -d --no-deps site-2 || return 1
    echo "site-2 now runs $IMAGE_NEXT"
    local log="" deadline=$(( $(date +%s) + 300 )) r
    while [ "$(date +%s)" -lt "$deadline" ]; do
        log=$(docker exec "$(compose ps -q site-2)" sh -c 'grep -h "refused: " /work/site/logs/gate.log 2>/dev/null | tail -n 1')
        [ -n "$log" ] && break
        r=$(last_round); [ "$r" -ge 5 ] 2>/dev/null && break
        sleep 2
    done
    wait_round 5 300 || { echo "round 5 did not end with the upgraded site-2"; return 1; }
    compose up -d --no-deps site-2 || return 1
    [ -n "$log" ] || { echo "site-2 on $IMAGE_NEXT logged no refusal in gate.log (rounds 4-5: $(round_sites 4) / $(round_sites 5))"; return 1; }
    echo "site-2 on the next version refused the older server's run, gate.log: ${log#*] }; rounds 4, 5 (n_sites failures seconds sites): $(round_sites 4) / $(round_sites 5); site-2 back on $IMAGE"
}
control_api() {
    docker exec -i "$(compose ps -q site-1)" python - "$FLEET" <<'EOF'
import sys, httpx
port = sys.argv[1]
base = f"https://127.0.0.1:{port}"
codes = {}
with httpx.Client(verify="/certs/ca.crt", timeout=10) as client:
    for path in ("/flwr.proto.Control/ListRuns", "/api/v0/control/list-runs", "/v1/control/list-runs", "/health", "/docs"):
        codes[path] = client.post(base + path, content=b"").status_code
    fleet = client.get(base + "/v1/fleet/pull-messages").status_code
assert all(c == 404 for c in codes.values()), codes
assert fleet == 405, fleet
print(f"from site-1 over TLS to the fleet port {port}: Control/Runtime/health paths 404 ({len(codes)} tried), fleet GET 405 "
      "(the SuperLink's own Control port is on loopback: with host networking a container on the same host shares it)")
EOF
}
cat >"$WORK/targets.py" <<'EOF'
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
up = [t for t in targets if t["health"] == "up"]
where = lambda t: t["labels"]["job"] + "@" + t["scrapeUrl"].split("/")[2] + "=" + t["health"]
print(f"{len(up)}/{len(targets)} targets up: " + ", ".join(where(t) for t in targets))
sys.exit(0 if len(targets) == 3 and len(up) == 3 else 1)
EOF
targets_up() {
    # every Prometheus target healthy at the same scrape, asked on 127.0.0.1 while the run goes on
    local deadline=$(( $(date +%s) + 600 )) last=""
    while [ "$(date +%s)" -lt $deadline ]; do
        last=$(curl -fs -m 5 "http://127.0.0.1:$PROM/api/v1/targets" | python3 "$WORK/targets.py") \
            && { echo "$last"; return 0; }
        [ "$(docker inspect -f '{{.State.Running}}' "$(server_container)" 2>/dev/null)" = true ] || break
        sleep 2
    done
    echo "${last:-Prometheus API did not answer on 127.0.0.1:$PROM}"
    return 1
}
check "Prometheus targets up" targets_up
if [ "$DRILLS" = 1 ]; then
    check "drill: Control API not on the fleet port" control_api
    check "drill: site killed, round ends, site rejoins" drill_site
    check "drill: upgrade site-2 to the next version" drill_upgrade
    check "drill: server killed, resumed with --resume" drill_server
fi
rounds_done() {
    local server rc
    server=$(server_container)
    rc=$(timeout 1200 "$DOCKER_BIN" wait "$server") || { echo "server still running after 20 min"; return 1; }
    docker logs "$server" 2>&1 | tail -n 30
    [ "$rc" = 0 ] || { echo "server exited $rc"; return 1; }
    docker run -i --rm --label fedseg-images-test -v "${PROJECT}_runs:/work/runs:ro" -v "${PROJECT}_state:/work/state:ro" \
        "$IMAGE" python - "$ROUNDS" "$DRILLS" <<'EOF'
import csv, os, sys
rounds, drills = int(sys.argv[1]), sys.argv[2] == "1"
rows = list(csv.DictReader(open("/work/runs/fed/metrics.csv")))
done = [r for r in rows if int(r["round"]) >= 1]
assert [int(r["round"]) for r in done] == list(range(1, rounds + 1)), [r["round"] for r in rows]
assert all(r.get("dice_mean") not in (None, "") for r in done), "a round without central Dice"
assert all(int(r["n_sites"]) == 2 for r in done) or (drills and all(int(r["n_sites"]) >= 1 for r in done)), [r["sites"] for r in done]
db = "/work/state/superlink.db"
size = os.path.getsize(db) if os.path.exists(db) else 0
assert size > 0, "no SuperLink database on the state volume"
print(f"{len(done)}/{rounds} rounds, sites per round " + ",".join(r["n_sites"] for r in done) + ", central dice_mean " + " ".join(f"{float(r['dice_mean']):.3f}" for r in done)
      + f"; SuperLink database on the volume ({size // 1024} KiB)")
EOF
}
check "rounds complete, central Dice in metrics.csv" rounds_done
down() {
    [ -n "$RESUMED" ] && docker rm -f "$RESUMED" >/dev/null 2>&1
    for c in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.oneoff=True"); do
        docker rm -f "$c" >/dev/null
    done
    compose down -v --remove-orphans || return 1
    COMPOSE_UP=0
    local left vols
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
    vols=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
    [ "$left" = 0 ] && [ "$vols" = 0 ] || { echo "$left containers, $vols volumes left"; return 1; }
    echo "compose down -v: no container, volume or network of $PROJECT left"
}
check "teardown" down
report
