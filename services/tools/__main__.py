"""python -m services.tools"""
from services.common.runtime import main
from services.tools.config import Settings
from services.tools.server import build_app

if __name__ == "__main__":
    main("tools", Settings, build_app)
