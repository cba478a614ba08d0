# Sourced by the scripts: offline, no telemetry, and the project's virtual environment.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export TOKENIZERS_PARALLELISM=false
export PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/${FIN_TASKS_VENV:-.venv}/bin:$PATH"
export PREFECT_LOGGING_EXTRA_LOGGERS="${PREFECT_LOGGING_EXTRA_LOGGERS:-fin_tasks}"  # library logs in run views
