from services.proposer.service import run
from services.runner import run_service

run_service("proposer", run)
