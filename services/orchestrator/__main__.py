"""python -m services.orchestrator"""
from services.common.runtime import main
from services.orchestrator.config import Settings
from services.orchestrator.server import build_app

if __name__ == "__main__":
    main("orchestrator", Settings, build_app)
