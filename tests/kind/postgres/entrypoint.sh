#!/bin/sh
# First start: a cluster whose superuser is $POSTGRES_USER with $POSTGRES_PASSWORD (password
# authentication over TCP, trust on the local socket), and the database $POSTGRES_DB.
set -eu
for bin in /usr/lib/postgresql/*/bin; do :; done
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:?}" >"$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "${POSTGRES_USER:?}" --pwfile="$pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust >/dev/null
    rm -f "$pwfile"
    echo "host all all 0.0.0.0/0 scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE \"${POSTGRES_DB:?}\";" | "$bin/postgres" --single -D "$PGDATA" -j postgres >/dev/null
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql
