#!/usr/bin/env bash
# Take the README's Temporal UI screenshots: docs/temporal-ui-job.png and docs/temporal-ui-list.png.
#
# Starts the embedded stack on non-default ports (so it does not collide with `keel dev`), runs
# four jobs for tenant "acme" (the main demo job, one refined after a failed verification, one
# left waiting for input, one that runs out of steps), photographs the UI with headless Chromium
# driven over the DevTools protocol (a stdlib-only Python helper; no extra packages), then stops
# the stack and deletes its state.
#
# Needs Chromium: on Debian/Ubuntu `apt-get install -y chromium` (or set CHROMIUM=/path/to/it).
# Ports can be changed with SHOT_TEMPORAL_PORT, SHOT_UI_PORT, SHOT_REDIS_PORT, SHOT_SIM_PORT,
# SHOT_CODEC_PORT, SHOT_DEVTOOLS_PORT.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/keel ]; then
  source scripts/bootstrap.sh
fi

chromium="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
if [ -z "$chromium" ]; then
  echo "Chromium not found: apt-get install -y chromium (or set CHROMIUM=...)" >&2
  exit 1
fi

temporal_port="${SHOT_TEMPORAL_PORT:-27433}"
ui_port="${SHOT_UI_PORT:-28433}"
redis_port="${SHOT_REDIS_PORT:-26479}"
sim_port="${SHOT_SIM_PORT:-28189}"
codec_port="${SHOT_CODEC_PORT:-28234}"
api_port="${SHOT_API_PORT:-28235}"
devtools_port="${SHOT_DEVTOOLS_PORT:-29333}"
ui="http://127.0.0.1:$ui_port"

work="$(mktemp -d)"
dev_pid=""
chrome_pid=""
cleanup() {
  if [ -n "$chrome_pid" ]; then kill "$chrome_pid" 2>/dev/null || true; wait "$chrome_pid" 2>/dev/null || true; fi
  if [ -n "$dev_pid" ]; then kill -TERM "$dev_pid" 2>/dev/null || true; wait "$dev_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() {  # wait_port PORT SECONDS
  for _ in $(seq "$2"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 1
  done
  echo "nothing listening on port $1" >&2
  return 1
}

# 1. The embedded stack: Temporal dev server + UI, Redis, LLM simulator, codec server, a worker.
.venv/bin/keel dev --state-dir "$work/state" --temporal-port "$temporal_port" --ui-port "$ui_port" \
  --redis-port "$redis_port" --sim-port "$sim_port" --codec-port "$codec_port" --api-port "$api_port" >"$work/dev.log" 2>&1 &
dev_pid=$!
for port in "$temporal_port" "$ui_port" "$redis_port" "$sim_port" "$codec_port" "$api_port"; do wait_port "$port" 60; done
export TEMPORAL_ADDRESS="127.0.0.1:$temporal_port" TEMPORAL_NAMESPACE=default

# 2. Jobs.
job_id() { .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["job_id"])'; }
goal='What is 17 * (23 + 4)? Use the calculator, use search_docs to find how Keel budgets a job, and record what you found with write_note.'
main_tools=(--tool calculator --tool search_docs --tool write_note --docs docs/corpus)
main=$(.venv/bin/keel submit "$goal" --tenant acme "${main_tools[@]}" --json | job_id)
refined=$(.venv/bin/keel submit "What is 12 * 12? Use the calculator. [sim: fail_verify=1]" --tenant acme \
  --tool calculator --json | job_id)
asking=$(.venv/bin/keel submit "Write a summary of the report. [sim: ask]" --tenant acme --ask-timeout 3600 \
  --json | job_id)
exhausted=$(.venv/bin/keel submit "$goal" --tenant acme "${main_tools[@]}" --max-steps 3 --json | job_id)
for job in "$main" "$refined" "$exhausted"; do
  out=$(.venv/bin/keel result "$job" --timeout 60)
  sed -n 1,2p <<<"$out"
done
out=$(.venv/bin/keel status "$asking")
sed -n 1,2p <<<"$out"

# 3. Screenshots, 1600x1000, through the DevTools protocol (so the list can show Keel's columns).
cat >"$work/cdp_shot.py" <<'PY'
"""cdp_shot.py DEVTOOLS_PORT URL OUT.png WAIT_TEXT [LOCALSTORAGE_JSON]

Opens URL in a new tab; with LOCALSTORAGE_JSON ({"key": "value", ...}) sets those localStorage
items on the page's origin and loads URL again; waits until WAIT_TEXT is in the page's text;
saves a 1600x1000 PNG of the viewport. Standard library only.
"""
import base64, json, os, socket, struct, sys, time, urllib.request

port, url, out, wait_text = sys.argv[1:5]
storage = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
new_tab = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
ws_path = json.load(urllib.request.urlopen(new_tab))["webSocketDebuggerUrl"].split(f":{port}", 1)[1]
sock = socket.create_connection(("127.0.0.1", int(port)))
key = base64.b64encode(os.urandom(16)).decode()
sock.sendall((f"GET {ws_path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += sock.recv(4096)
if b" 101 " not in buf.split(b"\r\n", 1)[0]:
    sys.exit(f"websocket handshake refused: {buf[:200]!r}")
buf = buf.split(b"\r\n\r\n", 1)[1]


def recv_exact(n):
    global buf
    while len(buf) < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError("DevTools closed the connection")
        buf += chunk
    data, buf = buf[:n], buf[n:]
    return data


def recv_message():
    parts = []
    while True:
        b0, b1 = recv_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", recv_exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", recv_exact(8))[0]
        parts.append(recv_exact(n))
        if b0 & 0x80:  # FIN
            return json.loads(b"".join(parts))


next_id = 0


def call(method, **params):
    global next_id
    next_id += 1
    data = json.dumps({"id": next_id, "method": method, "params": params}).encode()
    n, mask = len(data), os.urandom(4)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", n)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
    while True:
        message = recv_message()
        if message.get("id") == next_id:
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            return message["result"]


def evaluate(expression):
    return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


call("Page.enable")
call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
call("Page.navigate", url=url)
if storage:
    time.sleep(2)
    for k, v in storage.items():
        evaluate(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)})")
    call("Page.navigate", url=url)
ready = f"document.readyState === 'complete' && document.body.innerText.includes({json.dumps(wait_text)})"
deadline = time.time() + 30
while not evaluate(ready):
    if time.time() > deadline:
        text = str(evaluate("document.body.innerText"))[:300]
        sys.exit(f"timed out waiting for {wait_text!r} on {url}; page says: {text!r}")
    time.sleep(0.5)
time.sleep(2)  # let the timeline and transitions settle
png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
with open(out, "wb") as f:
    f.write(png)
print(f"{out}: {len(png)} bytes")
PY

"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$work/chromium" --window-size=1600,1000 --remote-debugging-port="$devtools_port" \
  about:blank >"$work/chromium.log" 2>&1 &
chrome_pid=$!
for _ in $(seq 30); do
  curl -sf "http://127.0.0.1:$devtools_port/json/version" >/dev/null && break
  sleep 0.5
done

mkdir -p docs
# The workflow detail page of the main job: summary, input/result, timeline of activity summaries.
.venv/bin/python "$work/cdp_shot.py" "$devtools_port" "$ui/namespaces/default/workflows/$main" \
  docs/temporal-ui-job.png "plan · iteration 1"
# The workflow list filtered with a visibility query on Keel's search attributes, with Keel's
# search attributes as columns (the UI keeps its column choice in localStorage).
columns='{"default":[{"label":"Status"},{"label":"Workflow ID"},{"label":"KeelState"},{"label":"KeelOutcome"},{"label":"KeelTokens"},{"label":"KeelCostUsd"}]}'
storage=$(.venv/bin/python -c 'import json, sys; print(json.dumps({"namespace-workflow-table-columns": sys.argv[1]}))' "$columns")
.venv/bin/python "$work/cdp_shot.py" "$devtools_port" \
  "$ui/namespaces/default/workflows?query=$(.venv/bin/python -c 'import urllib.parse; print(urllib.parse.quote("KeelTenant=\"acme\""))')" \
  docs/temporal-ui-list.png "$asking" "$storage"

# 4. cleanup (trap): stop Chromium, SIGTERM `keel dev`, delete the state directory.
