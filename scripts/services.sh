#!/usr/bin/env bash
# Start whichever of the local services (PostgreSQL, RabbitMQ, Redis) is not listening.
set -u

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # port, name, seconds
  for _ in $(seq 1 "$3"); do listening "$1" && return 0; sleep 1; done
  echo "$2 did not come up on port $1" >&2
  return 1
}

status=0
if ! listening 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  wait_for 5432 PostgreSQL 30 || status=1
fi
if ! listening 6379; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  wait_for 6379 Redis 15 || status=1
fi
if ! listening 5672; then
  echo "starting RabbitMQ"
  ERL_EPMD_ADDRESS=127.0.0.1 rabbitmq-server -detached
  wait_for 5672 RabbitMQ 60 || status=1
fi
exit $status
