from services.evaluator.service import run
from services.runner import run_service

run_service("evaluator", run)
