"""python -m services.inference"""
from services.common.runtime import main
from services.inference.config import Settings
from services.inference.server import build_app

if __name__ == "__main__":
    main("inference", Settings, build_app)
