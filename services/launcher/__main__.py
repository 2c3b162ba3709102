from services.launcher.service import run
from services.runner import run_service

run_service("launcher", run)
