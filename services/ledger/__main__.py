from services.ledger.service import run
from services.runner import run_service

run_service("ledger", run)
