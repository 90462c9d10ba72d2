#!/usr/bin/env bash
# MLflow tracking server for a VM cluster (run it on the Ray head or a VM in the same VPC).
#
# Needs: a PostgreSQL server with databases `mlflow` and `mlflow_auth` owned by user `mlflow`,
# an S3 or GCS bucket for artifacts (the VM's instance profile / service account grants access),
# and `pip install "mlflow[auth]" psycopg2-binary boto3` (or google-cloud-storage).
#
#   export MLFLOW_DB_HOST=10.0.1.20 MLFLOW_DB_PASSWORD=... MLFLOW_ADMIN_PASSWORD=...
#   export MLFLOW_ARTIFACTS=s3://my-bucket/mlflow-artifacts
#   cluster/mlflow/mlflow-server.sh
#
# It listens on this VM's private address only (MLFLOW_HOST, default: the first address of
# `hostname -I`), never 0.0.0.0: the security group / firewall that admits cluster members is
# the only way in, and basic auth guards every request on top.
set -euo pipefail

: "${MLFLOW_DB_HOST:?set MLFLOW_DB_HOST to the PostgreSQL host}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD for database user mlflow}"
: "${MLFLOW_ADMIN_PASSWORD:?set MLFLOW_ADMIN_PASSWORD for the MLflow admin user}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to s3://bucket/prefix or gs://bucket/prefix}"
MLFLOW_HOST="${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
STATE_DIR="${MLFLOW_STATE_DIR:-$HOME/.mlflow-server}"

mkdir -p "$STATE_DIR"
chmod 700 "$STATE_DIR"
umask 077
db="postgresql://mlflow:${MLFLOW_DB_PASSWORD}@${MLFLOW_DB_HOST}:5432"
cat > "$STATE_DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${db}/mlflow_auth
admin_username = admin
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
INI
# The Flask session/CSRF key must survive restarts, or logged-in UI sessions break.
[ -s "$STATE_DIR/flask_secret" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$STATE_DIR/flask_secret"

export MLFLOW_AUTH_CONFIG_PATH="$STATE_DIR/basic_auth.ini"
export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE_DIR/flask_secret")"
# Background GenAI job runners are not used by uml-ray; skipping them saves a dozen processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

exec mlflow server \
  --app-name basic-auth \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" \
  --backend-store-uri "${db}/mlflow" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" --serve-artifacts \
  --allowed-hosts "${MLFLOW_HOST}:${MLFLOW_PORT},$(hostname):${MLFLOW_PORT},localhost:${MLFLOW_PORT}" \
  --workers "${MLFLOW_WORKERS:-4}"
