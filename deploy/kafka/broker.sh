#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft: broker + controller in one JVM) on loopback,
# for tests and local development. Nothing but java 17, mvn and python3 is needed.
#
#   broker.sh fetch    download Kafka and its dependencies from Maven Central (once)
#   broker.sh start    format fresh storage, start, wait until it answers metadata requests
#   broker.sh stop     stop it (SIGTERM, then SIGKILL after a bound) and delete its data
#   broker.sh halt     stop it but keep its data (an outage; ``resume`` brings it back)
#   broker.sh resume   start it again on the data a ``halt`` kept
#   broker.sh status   say whether it runs
#
# Environment: KAFKA_PORT (default 19092), KAFKA_CONTROLLER_PORT (default KAFKA_PORT+1),
# KAFKA_HEAP (default 512m), KAFKA_START_TIMEOUT_S (default 120).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIB="$HERE/.cache/lib"
PORT="${KAFKA_PORT:-19092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
RUN="$HERE/.run/$PORT"
PIDFILE="$RUN/broker.pid"
HEAP="${KAFKA_HEAP:-512m}"
START_TIMEOUT_S="${KAFKA_START_TIMEOUT_S:-120}"
REPO="$(cd "$HERE/../.." && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY=python3

log() { printf 'kafka: %s\n' "$*" >&2; }

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

fetch() {
  if [ -f "$LIB/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { log "mvn is required to fetch the broker"; exit 1; }
  log "fetching Apache Kafka from Maven Central into deploy/kafka/.cache/lib"
  rm -rf "$LIB"
  mvn -q -B -f "$HERE/pom.xml" package
  touch "$LIB/.complete"
}

write_config() {
  cat >"$RUN/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$RUN/data
num.partitions=3
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
log.retention.hours=24
log.segment.bytes=67108864
EOF
  cat >"$RUN/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $RUN/broker.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
EOF
}

java_cmd() {
  java "-Xmx$HEAP" "-Xms$HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$RUN/log4j2.properties" \
    -cp "$LIB/*" "$@"
}

answers() {
  # A metadata round trip, not just an open port: the broker must be able to serve.
  "$PY" - "$PORT" <<'EOF' 2>/dev/null
import sys
from confluent_kafka.admin import AdminClient
import logging
quiet = logging.getLogger("broker-check")
quiet.addHandler(logging.NullHandler())
quiet.propagate = False
admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{sys.argv[1]}", "logger": quiet})
md = admin.list_topics(timeout=2)
sys.exit(0 if md.brokers else 1)
EOF
}

start() {
  fetch
  if running; then
    log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
    echo "KAFKA_BOOTSTRAP=127.0.0.1:$PORT"
    return 0
  fi
  command -v java >/dev/null || { log "java 17+ is required"; exit 1; }
  rm -rf "$RUN"
  mkdir -p "$RUN/data"
  write_config
  local cluster_id
  cluster_id="$(java_cmd kafka.tools.StorageTool random-uuid)"
  java_cmd kafka.tools.StorageTool format --standalone -t "$cluster_id" \
    -c "$RUN/server.properties" >"$RUN/format.log" 2>&1 || {
    log "storage format failed:"; cat "$RUN/format.log" >&2; exit 1; }
  launch
}

launch() {
  nohup java "-Xmx$HEAP" "-Xms$HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$RUN/log4j2.properties" \
    -cp "$LIB/*" kafka.Kafka "$RUN/server.properties" >>"$RUN/stdout.log" 2>&1 &
  echo $! >"$PIDFILE"
  local waited=0
  until answers; do
    if ! running; then
      log "broker exited during start-up; last lines of its logs:"
      tail -n 30 "$RUN/stdout.log" "$RUN/broker.log" >&2 || true
      rm -f "$PIDFILE"
      exit 1
    fi
    if [ "$waited" -ge "$START_TIMEOUT_S" ]; then
      log "broker did not answer within ${START_TIMEOUT_S}s; stopping it"
      tail -n 30 "$RUN/broker.log" >&2 || true
      stop
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  log "ready on 127.0.0.1:$PORT after ${waited}s (pid $(cat "$PIDFILE"))"
  echo "KAFKA_BOOTSTRAP=127.0.0.1:$PORT"
}

terminate() {
  if running; then
    local pid
    pid="$(cat "$PIDFILE")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "broker did not stop in 30s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped (pid $pid)"
  fi
  rm -f "$PIDFILE"
}

stop() {
  terminate
  rm -rf "$RUN"
}

halt() {
  running || { log "not running on 127.0.0.1:$PORT"; exit 1; }
  terminate
}

resume() {
  if running; then
    log "already running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
    return 0
  fi
  [ -f "$RUN/server.properties" ] || { log "nothing to resume on port $PORT (use start)"; exit 1; }
  launch
}

status() {
  if running; then
    echo "running (pid $(cat "$PIDFILE")) on 127.0.0.1:$PORT"
  else
    echo "not running"
    return 1
  fi
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  halt) halt ;;
  resume) resume ;;
  status) status ;;
  *) echo "usage: $0 fetch|start|stop|halt|resume|status" >&2; exit 2 ;;
esac
